"""A container's environment and command line, as the node agent builds them. Pure.

env, envFrom, valueFrom (config maps, secrets, fields of the downward API, resources), the
KUBERNETES_SERVICE_* variables and IMAGEBATCH_PATH_MAP (see pathmap.py). Config maps and secrets
come through `lookup`, so these functions never talk to the API themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagebatch_testing.pathmap import map_path

JSON = dict[str, Any]
# (kind "configmaps"|"secrets", name, optional) -> the object's data; raises ConfigError.
Lookup = Callable[[str, str, bool], dict[str, bytes]]

# Variables of the agent's own environment that containers inherit (besides PATH and HOME).
PASS_ENV = (
    "LANG",
    "LC_ALL",
    "TZ",
    "PYTHONPATH",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_HUB_CACHE",
    "TRANSFORMERS_OFFLINE",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
    "CUDA_VISIBLE_DEVICES",
    "AWS_EC2_METADATA_DISABLED",
)


class ConfigError(Exception):
    """The pod cannot start yet (a missing config map, secret, ...); retried."""


@dataclass(frozen=True)
class NodeContext:
    """What every container of the node sees: the API server's address, PATH, capacity."""

    api_host: str
    api_port: int
    path: str
    capacity: Mapping[str, str]


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, $$ escapes a $."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


def field_value(pod: JSON, path: str) -> str:
    """The downward API: a fieldRef's value for this pod."""
    meta = pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
    }
    if path not in values:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return str(values[path])


def base_env(
    node: NodeContext, pod_dir: Path, pod_name: str, kubeconfig: str | None, host: Mapping[str, str]
) -> dict[str, str]:
    """The variables every container of the pod starts with, before its own env and envFrom."""
    env = {k: host[k] for k in PASS_ENV if k in host}
    env.update(
        {
            "PATH": node.path,
            "HOME": host.get("HOME", str(pod_dir / "work")),
            "TMPDIR": str(pod_dir / "tmp"),
            "HOSTNAME": pod_name,
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": node.api_host,
            "KUBERNETES_SERVICE_PORT": str(node.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(node.api_port),
            "KUBERNETES_PORT": f"tcp://{node.api_host}:{node.api_port}",
            "IMAGEBATCH_POD_DIR": str(pod_dir),
        }
    )
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    return env


def env_from(spec: JSON, lookup: Lookup) -> dict[str, str]:
    """A container's envFrom: whole config maps and secrets, each with its prefix."""
    env: dict[str, str] = {}
    for source in spec.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            data = lookup("configmaps", ref["name"], bool(ref.get("optional")))
        elif "secretRef" in source:
            ref = source["secretRef"]
            data = lookup("secrets", ref["name"], bool(ref.get("optional")))
        else:
            continue
        env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
    return env


def value_from(
    source: JSON, spec: JSON, pod: JSON, lookup: Lookup, capacity: Mapping[str, str]
) -> str | None:
    """One env var's valueFrom; None when an optional key is missing (the variable is unset)."""
    if "fieldRef" in source:
        return field_value(pod, source["fieldRef"]["fieldPath"])
    if "configMapKeyRef" in source or "secretKeyRef" in source:
        kind = "configmaps" if "configMapKeyRef" in source else "secrets"
        ref = source.get("configMapKeyRef") or source["secretKeyRef"]
        data = lookup(kind, ref["name"], bool(ref.get("optional")))
        if ref["key"] in data:
            return data[ref["key"]].decode(errors="replace")
        if not ref.get("optional"):
            raise ConfigError(f"key {ref['key']!r} not in {kind[:-1]} {ref['name']!r}")
        return None
    if "resourceFieldRef" in source:
        kind, _, res = source["resourceFieldRef"]["resource"].partition(".")
        value = (spec.get("resources") or {}).get(kind, {}).get(res)
        return str(value if value is not None else capacity.get(res, "0"))
    return None


def mount_map(spec: JSON, volumes: Mapping[str, str]) -> dict[str, str]:
    """{mountPath: local folder} for the container's volumeMounts (subPath folders are made)."""
    mounts: dict[str, str] = {}
    for mount in spec.get("volumeMounts") or []:
        local = volumes.get(mount["name"])
        if local is None:
            continue
        if mount.get("subPath"):
            local = os.path.join(local, mount["subPath"])
            Path(local).mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = local
    return mounts


def container_env(
    spec: JSON,
    pod: JSON,
    base: Mapping[str, str],
    lookup: Lookup,
    volumes: Mapping[str, str],
    node: NodeContext,
) -> dict[str, str]:
    """The container's whole environment, in Kubernetes' order: envFrom, then env (expanded)."""
    env = dict(base)
    env.update(env_from(spec, lookup))
    for var in spec.get("env") or []:
        if "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        value = value_from(var["valueFrom"], spec, pod, lookup, node.capacity)
        if value is not None:
            env[var["name"]] = value
    env["IMAGEBATCH_PATH_MAP"] = json.dumps(mount_map(spec, volumes))
    return env


def container_argv(spec: JSON, env: Mapping[str, str]) -> list[str]:
    """command + args, expanded; `python`/`python3` is this Python (images are ignored)."""
    if not spec.get("command"):
        raise ConfigError("the node agent ignores images: the container needs a command")
    argv = [expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
    if re.fullmatch(r"python(3(\.\d+)?)?", argv[0]):
        argv[0] = sys.executable
    elif "/" not in argv[0]:
        found = shutil.which(argv[0], path=env["PATH"])
        if found:
            argv[0] = found
    return argv


def container_cwd(spec: JSON, env: Mapping[str, str], default: str) -> str:
    """workingDir through the pod's mounts, when that folder exists; else the pod's work dir."""
    working_dir = spec.get("workingDir")
    if working_dir:
        mapped = map_path(working_dir, {"IMAGEBATCH_PATH_MAP": env["IMAGEBATCH_PATH_MAP"]})
        if os.path.isdir(mapped):
            return mapped
    return default
