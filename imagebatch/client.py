"""The Python API under the `imagebatch` CLI: submit, watch, inspect and fetch ImageBatchJobs.

    from imagebatch import Client
    result = Client(namespace="team-a").submit("job.yaml").wait()

This is the client side's one module that talks to the Kubernetes API. Submitting is a
server-side apply under one field manager, so submitting the same file again changes nothing.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imagebatch.api import GROUP, KIND, VERSION, ImageBatchJob
from imagebatch.contact_sheet import PAGES
from imagebatch.errors import ImageBatchError
from imagebatch.jobfile import load_job, parse_job
from imagebatch.names import JOB_PLURAL, LABEL_COMPONENT, LABEL_JOB
from imagebatch.reasons import ConditionType, State
from imagebatch.storage import HF_METADATA, INDEX_HTML, MANIFEST, MANIFEST_PARQUET, Storage

FIELD_MANAGER = "imagebatch-cli"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
JSON = dict[str, Any]
# retry-failed puts the failed items' prompts into the new job's spec: etcd takes objects of a
# few MB at most, so this many bytes of them at most.
RETRY_PROMPT_BYTES = 1_000_000


class JobFailedError(ImageBatchError):
    """The job reached its Failed condition; the message holds its reason and message."""


class JobDeletedError(JobFailedError):
    """The job was deleted (or replaced by another of its name) before it completed."""


@dataclass(frozen=True)
class Progress:
    """What a waiting caller sees of a job's status, each time it changes."""

    name: str
    done: int
    total: int
    failed: int
    images_per_second: str
    eta: str
    active_replicas: int
    desired_replicas: int
    state: str  # Pending, Running, Suspended, Complete or Failed
    reason: str = ""
    message: str = ""

    @classmethod
    def of(cls, job: JSON) -> Progress:
        st = job.get("status") or {}
        items = st.get("items") or {}
        state, reason, message = job_state(job)
        return cls(
            name=job["metadata"]["name"],
            done=int(items.get("done", 0)),
            total=int(items.get("total", 0)),
            failed=int(items.get("failed", 0)),
            images_per_second=str(st.get("imagesPerSecond") or ""),
            eta=str(st.get("eta") or ""),
            active_replicas=int(st.get("activeReplicas", 0)),
            desired_replicas=int(st.get("desiredReplicas", 0)),
            state=state,
            reason=reason,
            message=message,
        )


def condition(job: JSON, type_: str) -> JSON | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


def job_state(job: JSON) -> tuple[str, str, str]:
    """(state, reason, message) from the conditions the operator writes."""
    for type_, state in (
        (ConditionType.FAILED, State.FAILED),
        (ConditionType.COMPLETE, State.COMPLETE),
        (ConditionType.SUSPENDED, State.SUSPENDED),
    ):
        c = condition(job, type_)
        if c is not None:
            return state, str(c.get("reason", "")), str(c.get("message", ""))
    counted = (job.get("status") or {}).get("items", {}).get("total")
    return (State.RUNNING if counted else State.PENDING), "", ""


@dataclass(frozen=True)
class LogLine:
    pod: str
    text: str
    error: bool = False  # the API gave no log for this pod; text says why


@dataclass
class Result:
    """A finished job: its last status and where its outputs are."""

    job: JSON
    progress: Progress

    @property
    def ok(self) -> bool:
        return self.progress.state == State.COMPLETE

    @property
    def output(self) -> str:
        return str(self.job["spec"]["output"]["uri"])


@dataclass
class SubmittedJob:
    client: Client
    name: str
    namespace: str
    applied: JSON = field(repr=False)

    @property
    def changed(self) -> bool:
        """False when the apply changed nothing (the same file submitted again)."""
        return bool(self.applied.get("_changed", True))

    def wait(
        self,
        on_progress: Callable[[Progress], None] | None = None,
        timeout: float | None = None,
        poll_seconds: float = 1.0,
        raise_on_failure: bool = True,
    ) -> Result:
        return self.client.wait(self.name, on_progress, timeout, poll_seconds, raise_on_failure)


def _load_kube(config_file: str | None, context: str | None) -> tuple[Any, str]:
    """The API client and the namespace of the kubeconfig's context (default: "default")."""
    import kubernetes

    from imagebatch.kubeclient import TimeoutApiClient

    config_file = config_file or os.environ.get("KUBECONFIG")
    try:
        kubernetes.config.load_kube_config(config_file=config_file, context=context)
        _, active = kubernetes.config.list_kube_config_contexts(config_file=config_file)
        if context:
            contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=config_file)
            active = next((c for c in contexts if c["name"] == context), active)
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
    except (kubernetes.config.ConfigException, FileNotFoundError, TypeError) as e:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            raise ImageBatchError(
                f"no Kubernetes credentials: {e}; set KUBECONFIG or --kubeconfig to a kubeconfig file"
            ) from None
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        namespace = ns_file.read_text().strip() if ns_file.exists() else "default"
    return TimeoutApiClient(), namespace


class Client:
    def __init__(
        self,
        namespace: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        api_client: Any = None,
    ) -> None:
        import kubernetes

        if api_client is None:
            api_client, default_ns = _load_kube(kubeconfig, context)
        else:
            default_ns = "default"
        self.namespace = namespace or default_ns
        self.api = api_client
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)

    # -- the job object ------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except ApiException as e:
            raise ImageBatchError(f"{what}: {_api_message(e)}") from None

    def submit(
        self, job: str | Path | ImageBatchJob | JSON, transform: Callable[[JSON], JSON] | None = None
    ) -> SubmittedJob:
        """Server-side apply of a job (a YAML path, a model or a dict), validated here first.

        A file's other documents (the Secret or ConfigMap the examples carry) are applied first,
        the same way, so that one file is one command. `transform` changes the job document
        before that (`submit --local`: imagebatch.localcluster).
        """
        doc = _job_doc(job)
        if transform is not None:
            doc = transform(doc)
            parse_job(doc)
        if isinstance(job, (str, Path)):
            for other in _other_docs(job):
                self.apply_object(other, doc.get("metadata", {}).get("namespace") or self.namespace)
        meta = doc.setdefault("metadata", {})
        ns = meta.get("namespace") or self.namespace
        meta["namespace"] = ns
        name = meta["name"]
        before = self.get_or_none(name, ns)
        resp = self._call(
            f"submitting ImageBatchJob {ns}/{name}",
            lambda: self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                ns,
                JOB_PLURAL,
                name,
                doc,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY_PATCH,
                _preload_content=False,  # the generated client drops apply responses' bodies
            ),
        )
        applied: JSON = json.loads(resp.data)
        # Not the resourceVersion: the operator's status writes move it. A spec change moves the
        # generation; labels and annotations are compared as they are.
        changed = before is None or any(
            before["metadata"].get(k) != applied["metadata"].get(k)
            for k in ("generation", "labels", "annotations")
        )
        return SubmittedJob(self, name, ns, {**applied, "_changed": changed})

    def apply_object(self, obj: JSON, namespace: str) -> None:
        """Server-side apply of any namespaced object (through API discovery)."""
        from kubernetes.dynamic import DynamicClient

        what = f"applying {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        dyn = self._call(what, lambda: DynamicClient(self.api))
        res = self._call(what, lambda: dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]))
        ns = obj.get("metadata", {}).get("namespace") or namespace
        self._call(
            what,
            lambda: dyn.server_side_apply(
                res,
                body=obj,
                name=obj["metadata"]["name"],
                namespace=ns,
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            ),
        )

    def get_or_none(self, name: str, namespace: str | None = None) -> JSON | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: JSON = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace or self.namespace, JOB_PLURAL, name
            )
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise ImageBatchError(f"reading ImageBatchJob {name}: {_api_message(e)}") from None

    def get(self, name: str) -> JSON:
        job = self.get_or_none(name)
        if job is None:
            raise ImageBatchError(
                f"no ImageBatchJob {name!r} in namespace {self.namespace!r}; `imagebatch status` lists them"
            )
        return job

    def list_jobs(self) -> list[JSON]:
        out = self._call(
            f"listing ImageBatchJobs in {self.namespace}",
            lambda: self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, JOB_PLURAL),
        )
        return sorted(out.get("items", []), key=lambda j: j["metadata"]["name"])

    def set_suspend(self, name: str, suspend: bool) -> JSON:
        self.get(name)  # a clear error for a wrong name
        # A merge patch, not an apply: spec.suspend must not become owned by a second manager.
        obj: JSON = self._call(
            f"{'suspending' if suspend else 'resuming'} {name}",
            lambda: self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                JOB_PLURAL,
                name,
                {"spec": {"suspend": suspend}},
                _content_type=MERGE_PATCH,
            ),
        )
        return obj

    def delete(self, name: str) -> None:
        self.get(name)
        self._call(
            f"deleting {name}",
            lambda: self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, JOB_PLURAL, name, propagation_policy="Background"
            ),
        )

    def wait(
        self,
        name: str,
        on_progress: Callable[[Progress], None] | None = None,
        timeout: float | None = None,
        poll_seconds: float = 1.0,
        raise_on_failure: bool = True,
    ) -> Result:
        """Until the job is Complete or Failed; `on_progress` sees every change of its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Progress | None = None
        uid = None
        while True:
            job = self.get(name) if last is None else self.get_or_none(name)
            if job is None or (uid is not None and job["metadata"].get("uid") != uid):
                raise JobDeletedError(
                    f"ImageBatchJob {name} was deleted before it completed ({last.done if last else 0}/"
                    f"{last.total if last else 0} images); what its workers stored stays in spec.output.uri"
                )
            uid = job["metadata"].get("uid")
            p = Progress.of(job)
            if p != last and on_progress is not None:
                on_progress(p)
            last = p
            if p.state == State.FAILED and raise_on_failure:
                raise JobFailedError(f"ImageBatchJob {name} failed: {p.reason}: {p.message}")
            if State(p.state).finished:
                return Result(job, p)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"ImageBatchJob {name} is still {p.state} after {timeout:.0f}s")
            time.sleep(poll_seconds)

    def retry_failed(
        self,
        name: str,
        new_name: str | None = None,
        source: str | None = None,
        endpoint_url: str | None = None,
    ) -> SubmittedJob:
        """Submits a new job that makes the failed items of a finished job (its errors.jsonl) into
        the same output, with each item's own prompt, seed and sizes; the output's job.json lets
        it in because its settings and items are those recorded. Once it is Complete, the joined
        manifest holds every item of the first job once. `source`/`endpoint_url`: as in fetch."""
        from imagebatch.manifest import ERRORS, read_errors
        from imagebatch.planning import expand_items
        from imagebatch.prompts import iter_prompts

        job = self.get(name)
        p = Progress.of(job)
        if not State(p.state).finished:
            raise ImageBatchError(
                f"{name} is {p.state}: retry its failed items once it is Complete or Failed"
            )
        failed = {str(e["id"]) for e in read_errors(self.output_storage(name, source, endpoint_url))}
        if not failed:
            raise ImageBatchError(f"{name} has no failed items (its output holds no {ERRORS} lines)")
        spec = parse_job(job, name).spec
        src = spec.prompts_from
        if src is not None and src.uri is not None and "://" not in src.uri and not os.path.exists(src.uri):
            raise ImageBatchError(
                f"spec.promptsFrom.uri {src.uri!r} of {name} is a path on the workers' volume that this "
                "machine does not see; run retry-failed where the volume is mounted"
            )

        def config_map(cm: str, key: str) -> str:
            obj = self._call(
                f"reading ConfigMap {cm}", lambda: self.core.read_namespaced_config_map(cm, self.namespace)
            )
            return str((obj.data or {})[key])

        items = [
            it
            for it in expand_items(iter_prompts(spec, config_map_reader=config_map), spec.generation)
            if it.id in failed
        ]
        prompts = [
            {
                "id": it.id,
                "prompt": it.prompt,
                "negativePrompt": it.negative_prompt,
                "seed": it.seed,
                "width": it.width,
                "height": it.height,
                "steps": it.steps,
                "guidanceScale": it.guidance_scale,
            }
            for it in items
        ]
        if len(json.dumps(prompts)) > RETRY_PROMPT_BYTES:
            raise ImageBatchError(
                f"{name} has {len(items)} failed items, too many to retry as inline prompts "
                f"(over {RETRY_PROMPT_BYTES} bytes); fix the cause and re-run the job instead"
            )
        body = json.loads(json.dumps(job["spec"]))
        for source_field in ("promptsFrom", "prompts", "promptItems"):
            body.pop(source_field, None)
        body.update(promptItems=prompts, suspend=False)
        # Each prompt is one item with its own seed: one image per prompt.
        body["generation"] = {**body.get("generation", {}), "imagesPerPrompt": 1}
        target = new_name or self._free_name(f"{name}-retry")
        doc = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": target, "namespace": self.namespace},
            "spec": body,
        }
        return self.submit(doc)

    def _free_name(self, base: str) -> str:
        name, n = base, 1
        while self.get_or_none(name) is not None:
            n += 1
            name = f"{base}{n}"
        return name

    # -- worker pods ---------------------------------------------------------------------------
    def pods(self, name: str) -> list[JSON]:
        selector = f"{LABEL_JOB}={name},{LABEL_COMPONENT}=worker"
        pods = self._call(
            "listing worker pods",
            lambda: self.core.list_namespaced_pod(self.namespace, label_selector=selector),
        )
        return sorted(
            (self.api.sanitize_for_serialization(p) for p in pods.items), key=lambda p: p["metadata"]["name"]
        )

    def logs(self, name: str, follow: bool = False, tail: int | None = None) -> Iterator[LogLine]:
        """Every worker pod's lines; with follow, interleaved as they come until all pods end.
        A pod whose log the API cannot give yields one line with `error` set."""
        self.get(name)
        pods = [p["metadata"]["name"] for p in self.pods(name)]
        if not follow:
            for pod in pods:
                yield from self._pod_log(pod, False, tail)
            return
        lines: queue.Queue[LogLine | None] = queue.Queue()

        def pump(pod: str) -> None:
            try:
                for line in self._pod_log(pod, True, tail):
                    lines.put(line)
            finally:
                lines.put(None)

        for pod in pods:
            threading.Thread(target=pump, args=(pod,), daemon=True).start()
        ended = 0
        while ended < len(pods):
            item = lines.get()
            if item is None:
                ended += 1
            else:
                yield item

    def _pod_log(self, pod: str, follow: bool, tail: int | None) -> Iterator[LogLine]:
        from kubernetes.client.exceptions import ApiException

        kwargs: dict[str, Any] = {"follow": follow, "_preload_content": False}
        if tail is not None:
            kwargs["tail_lines"] = tail
        if follow:
            kwargs["_request_timeout"] = (5.0, None)  # a followed log may be quiet for long
        try:
            resp = self.core.read_namespaced_pod_log(pod, self.namespace, **kwargs)
        except ApiException as e:
            advice = ""
            if e.status is not None and e.status >= 500:  # the API server could not reach the node's kubelet
                advice = (
                    f". The API server reads logs from the kubelet of the pod's node and could not reach it: "
                    f"`kubectl describe pod {pod}` shows the pod's state and last error, `kubectl describe ibj` "
                    "the workers' fatal errors (WorkerFailed Events); on the node itself the log is in the "
                    "container runtime's log folder (/var/log/pods)"
                )
            yield LogLine(pod, f"cannot read its log: {_api_message(e)}{advice}", error=True)
            return
        buf = b""
        for chunk in resp.stream(4096):
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for line in complete:
                yield LogLine(pod, line.decode(errors="replace"))
        if buf:
            yield LogLine(pod, buf.decode(errors="replace"))

    # -- outputs -------------------------------------------------------------------------------
    def output_storage(
        self, name: str, source: str | None = None, endpoint_url: str | None = None
    ) -> Storage:
        """The job's output storage as seen from here; S3 credentials from the environment or the
        job's credentialsSecret."""
        spec = parse_job(self.get(name), name).spec
        out = spec.output
        uri = source or out.uri
        options: dict[str, Any] = {}
        if uri.startswith("s3://"):
            client_kwargs: dict[str, Any] = {}
            endpoint = endpoint_url or out.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                client_kwargs["endpoint_url"] = endpoint
            if out.credentials_secret and not os.environ.get("AWS_ACCESS_KEY_ID"):
                keys = self._secret(out.credentials_secret.name)
                options.update(key=keys.get("AWS_ACCESS_KEY_ID"), secret=keys.get("AWS_SECRET_ACCESS_KEY"))
                if "AWS_ENDPOINT_URL" in keys and "endpoint_url" not in client_kwargs:
                    client_kwargs["endpoint_url"] = keys["AWS_ENDPOINT_URL"]
                if "AWS_DEFAULT_REGION" in keys:
                    client_kwargs["region_name"] = keys["AWS_DEFAULT_REGION"]
            if client_kwargs:
                options["client_kwargs"] = client_kwargs
        elif source and "://" not in source and not os.path.isdir(source):
            raise ImageBatchError(f"--from {source!r}: no such folder on this machine")
        elif "://" not in uri and not os.path.isdir(uri):
            raise ImageBatchError(
                f"spec.output.uri {uri!r} of {name} is a path on the workers' volume that this machine "
                "does not see; run fetch where the volume is mounted, or pass --from with its local path"
            )
        return Storage(uri, options)

    def _secret(self, secret: str) -> dict[str, str]:
        import base64

        obj = self._call(
            f"reading Secret {secret} (spec.output.credentialsSecret); or set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY",
            lambda: self.core.read_namespaced_secret(secret, self.namespace),
        )
        return {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}

    def fetch(
        self,
        name: str,
        to: str | Path,
        source: str | None = None,
        endpoint_url: str | None = None,
        on_file: Callable[[str, bool], None] | None = None,
    ) -> FetchResult:
        """Copies the manifest, contact sheet and images into `to`; files already there (same size)
        are skipped, so an interrupted fetch resumes."""
        storage = self.output_storage(name, source, endpoint_url)
        if not storage.exists(MANIFEST):
            job = self.get(name)
            p = Progress.of(job)
            raise ImageBatchError(
                f"{name} has no {MANIFEST} yet ({p.state}, {p.done}/{p.total} images); fetch once it is Complete"
            )
        manifest = storage.read_bytes(MANIFEST)
        lines = [json.loads(x) for x in manifest.decode().splitlines() if x.strip()]
        keys = list(dict.fromkeys(line["key"] for line in lines))  # webdataset: one tar per shard
        extra = [k for k in (MANIFEST_PARQUET, HF_METADATA, INDEX_HTML) if storage.exists(k)]
        extra += storage.list(PAGES)
        return fetch_keys(storage, Path(to), keys, extra, manifest, on_file)


@dataclass
class FetchResult:
    copied: int
    skipped: int
    images: int
    to: Path


def fetch_keys(
    storage: Storage,
    to: Path,
    keys: list[str],
    extra: list[str],
    manifest: bytes,
    on_file: Callable[[str, bool], None] | None = None,
) -> FetchResult:
    to.mkdir(parents=True, exist_ok=True)
    counts = {"copied": 0, "skipped": 0}
    lock = threading.Lock()

    def one(key: str) -> None:
        dest = to / key
        src = storage.path(key)
        size = os.path.getsize(src) if storage.local else storage.fs.size(src)
        skip = dest.exists() and dest.stat().st_size == size
        if not skip:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex}")
            if storage.local:
                shutil.copyfile(src, tmp)
            else:
                storage.fs.get_file(src, str(tmp))
            os.replace(tmp, dest)  # a partial file never has the final name
        with lock:
            counts["skipped" if skip else "copied"] += 1
        if on_file is not None:
            on_file(key, not skip)

    with ThreadPoolExecutor(1 if storage.local else 16) as pool:
        list(pool.map(one, keys + extra))
    # The manifest last: its presence says the images it lists are all here.
    tmp = to / f"{MANIFEST}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(manifest)
    os.replace(tmp, to / MANIFEST)
    return FetchResult(counts["copied"], counts["skipped"], len(keys), to)


def _job_doc(job: str | Path | ImageBatchJob | JSON) -> JSON:
    if isinstance(job, ImageBatchJob):
        dumped: JSON = job.model_dump(by_alias=True, exclude_none=True, exclude={"status"})
        return dumped
    if isinstance(job, dict):
        parse_job(job)  # the same errors as a file, before anything reaches the cluster
        copied: JSON = json.loads(json.dumps(job))
        return copied
    load_job(job)
    docs = [d for d in yaml.safe_load_all(Path(job).read_text(encoding="utf-8")) if d]
    doc: JSON = next(d for d in docs if isinstance(d, dict) and d.get("kind") == KIND)
    doc.pop("status", None)
    return doc


def _other_docs(path: str | Path) -> list[JSON]:
    docs = yaml.safe_load_all(Path(path).read_text(encoding="utf-8"))
    return [d for d in docs if isinstance(d, dict) and d.get("kind") not in (None, KIND)]


def _api_message(e: Any) -> str:
    try:
        body = json.loads(e.body)
        return f"{body.get('reason', e.reason)}: {body.get('message', '')}"
    except (TypeError, ValueError):
        return f"{e.status} {e.reason}"
