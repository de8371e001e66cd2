"""`imagebatch submit --local`: a job made runnable on the local test cluster (`make cluster-up`),
whose one node runs pods as local processes on a CPU, with no GPU, no storage provisioner and no
object store. Pure: a job document in, the changed document and what changed out.

- a model other than `builtin:*` becomes `builtin:tiny` (random weights, no download), at
  LOCAL_SIZE x LOCAL_SIZE and LOCAL_STEPS steps (a 512x512, 25-step image of a real model takes
  minutes on a CPU core; the tiny model makes about 10 such small images a second);
  `batchSize: auto` becomes LOCAL_BATCH;
- `gpusPerWorker: 0`, at most LOCAL_MAX_WORKERS workers, and `OMP_NUM_THREADS=1` in the workers'
  env unless the job sets it (torch would start one thread per core in every worker: two workers
  on two cores would each want both);
- every PersistentVolumeClaim volume becomes a hostPath folder `<root>/<claimName>`, mounted at
  that same path, and `output.uri` and `promptsFrom.uri` under its old mount path are mapped the
  same way (so the workers write where `fetch` and you read); an `s3://bucket/key` output goes to
  `<root>/s3/bucket/key`, any other path output to `<root>/paths/<path>`; those get a hostPath
  volume too. `root` is `<cluster dir>/volumes`, the cluster dir `$IMAGEBATCH_CLUSTER_DIR` or
  /tmp/imagebatch-cluster (`make cluster-up`'s), so nothing is written outside it.
"""

from __future__ import annotations

import copy
import os
import posixpath
from typing import Any

JSON = dict[str, Any]
DEFAULT_CLUSTER_DIR = "/tmp/imagebatch-cluster"
LOCAL_SIZE = 64
LOCAL_STEPS = 8
LOCAL_BATCH = 8
LOCAL_MAX_WORKERS = 2
LOCAL_VOLUME = "local-cluster-data"


def volumes_root(env: dict[str, str] | None = None) -> str:
    e = os.environ if env is None else env
    return posixpath.join(e.get("IMAGEBATCH_CLUSTER_DIR") or DEFAULT_CLUSTER_DIR, "volumes")


def _under(path: str, mount: str) -> str | None:
    """The rest of `path` below `mount`, or None when it is not below it."""
    norm, base = posixpath.normpath(path), posixpath.normpath(mount)
    if norm == base:
        return ""
    if norm.startswith(base.rstrip("/") + "/"):
        return norm[len(base.rstrip("/")) + 1 :]
    return None


def _map(path: str, mounts: dict[str, str]) -> str | None:
    """`path` through {old mountPath: new folder}, by the longest mount that holds it."""
    for mount in sorted(mounts, key=len, reverse=True):
        rest = _under(path, mount)
        if rest is not None:
            return posixpath.join(mounts[mount], rest) if rest else mounts[mount]
    return None


def _model(spec: JSON, changes: list[str]) -> None:
    if str(spec["model"].get("name", "")).startswith("builtin:"):
        return
    changes.append(
        f"model {spec['model'].get('name')} -> builtin:tiny at {LOCAL_SIZE}x{LOCAL_SIZE}, {LOCAL_STEPS} steps"
    )
    spec["model"] = {"name": "builtin:tiny"}
    gen = spec.setdefault("generation", {})
    gen.update({"width": LOCAL_SIZE, "height": LOCAL_SIZE, "steps": LOCAL_STEPS})
    for prompt in spec.get("promptItems") or []:  # per-prompt sizes of a real model's scale
        for key in ("width", "height"):
            prompt.pop(key, None)


def _workers(spec: JSON, changes: list[str]) -> JSON:
    workers: JSON = spec.setdefault("workers", {})
    workers["gpusPerWorker"] = 0
    if workers.get("maxReplicas", LOCAL_MAX_WORKERS + 1) > LOCAL_MAX_WORKERS:  # the default is 4
        changes.append(f"maxReplicas {workers.get('maxReplicas', 'default')} -> {LOCAL_MAX_WORKERS}")
        workers["maxReplicas"] = LOCAL_MAX_WORKERS
    workers["minReplicas"] = min(workers.get("minReplicas", 0), workers.get("maxReplicas", LOCAL_MAX_WORKERS))
    env = workers.setdefault("env", [])
    if not any(e.get("name") == "OMP_NUM_THREADS" for e in env):
        env.append({"name": "OMP_NUM_THREADS", "value": "1"})
    workers.pop("resources", None)  # GPU limits, memory sized for a real model
    batching = spec.setdefault("batching", {})
    if batching.get("batchSize", "auto") == "auto":
        batching["batchSize"] = LOCAL_BATCH
    return workers


def _volumes(workers: JSON, root: str, changes: list[str]) -> dict[str, str]:
    """PVC volumes -> hostPath folders under root; returns {old mountPath: new folder}."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in workers.get("volumes") or []
        if "persistentVolumeClaim" in v
    }
    workers["volumes"] = [v for v in workers.get("volumes") or [] if v["name"] not in claims]
    mounts: dict[str, str] = {}
    kept = []
    for m in workers.get("volumeMounts") or []:
        if m["name"] in claims:
            folder = posixpath.join(root, claims[m["name"]], m.get("subPath", "")).rstrip("/")
            mounts[m["mountPath"]] = folder
            changes.append(f"volume {m['name']} (claim {claims[m['name']]}) at {m['mountPath']} -> {folder}")
        else:
            kept.append(m)
    workers["volumeMounts"] = kept
    return mounts


def for_local_cluster(doc: JSON, root: str) -> tuple[JSON, list[str]]:
    """The job document for the local cluster, and one line per change (for the user)."""
    doc = copy.deepcopy(doc)
    spec: JSON = doc["spec"]
    changes: list[str] = []
    _model(spec, changes)
    workers = _workers(spec, changes)
    mounts = _volumes(workers, root, changes)
    out = spec["output"]
    uri = str(out["uri"])
    if uri.startswith("s3://"):
        local = posixpath.join(root, "s3", uri[len("s3://") :])
        for key in ("credentialsSecret", "endpointUrl"):
            out.pop(key, None)
    else:
        local = _map(uri, mounts) or posixpath.join(root, "paths", posixpath.normpath(uri).lstrip("/"))
    if local != uri:
        changes.append(f"output.uri {uri} -> {local}")
    out["uri"] = local
    source = spec.get("promptsFrom") or {}
    if source.get("uri") and (mapped := _map(str(source["uri"]), mounts)) is not None:
        changes.append(f"promptsFrom.uri {source['uri']} -> {mapped}")
        source["uri"] = mapped
    # One hostPath volume holds every folder above, mounted at its own path: the worker, a local
    # process of the node, reads and writes the same paths as everything else on this machine.
    workers["volumes"].append({"name": LOCAL_VOLUME, "hostPath": {"path": root, "type": "DirectoryOrCreate"}})
    workers["volumeMounts"].append({"name": LOCAL_VOLUME, "mountPath": root})
    return doc, changes
