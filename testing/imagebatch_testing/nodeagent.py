"""A stand-in for a kubelet, for tests: it runs the pods of one Node as local processes.

What it does: registers the Node (capacity, Ready condition, a Lease heartbeat in
kube-node-lease), watches the pods bound to it and runs each container's command + args as a
local process with this Python environment (images are ignored; `python`/`python3` means
sys.executable), builds the environment (env, envFrom, valueFrom config maps, secrets and
fields, KUBERNETES_SERVICE_HOST/PORT and a per-pod KUBECONFIG holding the pod's ServiceAccount
token), lays out volumes as local folders (emptyDir, hostPath, configMap, secret, downwardAPI,
projected with serviceAccountToken) announced through IMAGEBATCH_PATH_MAP, reports pod phases
and container states, restarts containers for restartPolicy OnFailure/Always, and on deletion
sends SIGTERM, waits the grace period, sends SIGKILL and removes the pod.

What it does not do: pull or use images, isolate pods (no namespaces, cgroups, mounts),
enforce resource limits, run probes (a running container is Ready), serve logs/exec/port
forwarding, or networking (every pod has IP 127.0.0.1). See docs/test-cluster.md.

    python -m imagebatch_testing.nodeagent --kubeconfig node.kubeconfig --node-name NAME \
        --work-dir DIR --ca-file ca.crt
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebatch_testing.kubeapi import STRATEGIC_MERGE_PATCH, ApiError, KubeClient

JSON = dict[str, Any]

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
HEARTBEAT_SECONDS = 10
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


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log(msg: str) -> None:
    print(f"{now()} nodeagent: {msg}", file=sys.stderr, flush=True)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, $$ escapes a $."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


class ConfigError(Exception):
    """The pod cannot start yet (a missing config map, secret, ...); retried."""


@dataclass
class Container:
    """One container of a pod and its current process."""

    spec: JSON
    init: bool = False
    proc: subprocess.Popen[bytes] | None = None
    proc_start: int = 0
    started_at: str = ""
    restart_count: int = 0
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JSON = field(default_factory=dict)
    not_before: float = 0.0  # restart back-off
    done: bool = False  # terminated for good (no restart coming)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> JSON:
        running = "running" in self.state
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": f"imagebatch://{self.proc.pid}" if self.proc else "",
            "ready": running,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }


def process_start_time(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[19])


class PodWorker(threading.Thread):
    """Runs one pod from start to its removal."""

    def __init__(self, agent: NodeAgent, pod: JSON) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.client = agent.client
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.dir = agent.work_dir / "pods" / f"{self.namespace}_{self.pod_name}_{self.uid}"
        self.deleting = threading.Event()
        self.gone = threading.Event()  # removed from the API
        self.lock = threading.Lock()
        self.containers: list[Container] = []
        self.init_containers: list[Container] = []
        self.phase = "Pending"
        self.start_time = now()
        self.volumes: dict[str, str] = {}
        self.pod_kubeconfig: str | None = None
        self._last_status: str = ""
        self.message = ""
        self.reason = ""

    @property
    def api_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"

    def update(self, pod: JSON) -> None:
        with self.lock:
            self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    # -- the pod's life ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log(f"pod {self.namespace}/{self.pod_name} worker crashed:\n{traceback.format_exc()}")
            self.kill_all(grace=0)
        finally:
            self.agent.forget(self.uid)

    def _run(self) -> None:
        spec = self.pod["spec"]
        self.init_containers = [Container(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c) for c in spec.get("containers") or []]
        for sub in ("logs", "volumes", "tmp", "work"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.publish()
        # Volumes and config: retried while something is missing (like a kubelet does).
        while True:
            if self.deleting.is_set() or self.gone.is_set() or self.agent.stopping.is_set():
                self.finish_deletion()
                return
            try:
                self.prepare_volumes()
                break
            except ConfigError as err:
                self.set_waiting("CreateContainerConfigError", str(err))
                self.deleting.wait(1.0)
        for container in self.init_containers:
            if not self.run_to_completion(container):
                if self.deleting.is_set() or self.gone.is_set():
                    self.finish_deletion()
                    return
                self.phase = "Failed"
                self.reason = "InitContainerFailed"
                self.publish()
                self.wait_for_deletion()
                return
        self.phase = "Running"
        for container in self.containers:
            self.start_container(container)
        self.publish()
        self.supervise()

    def supervise(self) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        while True:
            if self.deleting.is_set() or self.gone.is_set() or self.agent.stopping.is_set():
                self.finish_deletion()
                return
            for container in self.containers:
                self.poll(container, policy)
            if all(c.done for c in self.containers):
                failed = any(c.state.get("terminated", {}).get("exitCode", 0) != 0 for c in self.containers)
                self.phase = "Failed" if failed else "Succeeded"
                self.publish()
                self.wait_for_deletion()
                return
            self.publish()
            self.deleting.wait(0.2)

    def poll(self, container: Container, policy: str) -> None:
        if container.done:
            return
        if container.proc is None:
            if time.monotonic() >= container.not_before:
                self.start_container(container)
            return
        code = container.proc.poll()
        if code is None:
            return
        self.record_exit(container, code)
        restart = policy == "Always" or (policy == "OnFailure" and self.exit_code(code) != 0)
        if restart and not container.init:
            delay = min(10.0, 1.0 * 2 ** min(container.restart_count, 4))
            container.not_before = time.monotonic() + delay
            container.last_state = container.state
            container.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off {delay:.0f}s"}}
            container.restart_count += 1
            container.proc = None
        else:
            container.done = True

    def run_to_completion(self, container: Container) -> bool:
        """Runs an init container until it exits 0; False if it fails for good or the pod goes."""
        policy = self.pod["spec"].get("restartPolicy", "Always")
        while True:
            if self.deleting.is_set() or self.gone.is_set() or self.agent.stopping.is_set():
                self.kill_all(self.grace_period())
                return False
            if container.proc is None:
                if time.monotonic() >= container.not_before:
                    self.start_container(container)
                    self.publish()
                else:
                    self.deleting.wait(0.2)
                continue
            code = container.proc.poll()
            if code is None:
                self.deleting.wait(0.2)
                continue
            self.record_exit(container, code)
            if self.exit_code(code) == 0:
                container.done = True
                self.publish()
                return True
            if policy == "Never":
                container.done = True
                return False
            container.last_state = container.state
            container.state = {"waiting": {"reason": "CrashLoopBackOff"}}
            container.restart_count += 1
            container.not_before = time.monotonic() + min(10.0, 2.0**container.restart_count)
            container.proc = None
            self.publish()

    @staticmethod
    def exit_code(code: int) -> int:
        return 128 - code if code < 0 else code

    def record_exit(self, container: Container, code: int) -> None:
        assert container.proc is not None
        self.agent.untrack(container.proc.pid)
        exit_code = self.exit_code(code)
        terminated: JSON = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": container.started_at,
            "finishedAt": now(),
            "containerID": f"imagebatch://{container.proc.pid}",
        }
        if code < 0:
            terminated["signal"] = -code
        container.state = {"terminated": terminated}
        with open(self.dir / "logs" / f"{container.name}.log", "ab") as out:
            out.write(f"[nodeagent] {container.name} exited with code {exit_code}\n".encode())

    def start_container(self, container: Container) -> None:
        try:
            argv, env, cwd = self.command_for(container)
        except ConfigError as err:
            container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            container.not_before = time.monotonic() + 1.0
            return
        log_path = self.dir / "logs" / f"{container.name}.log"
        with open(log_path, "ab") as out:
            try:
                container.proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as err:
                out.write(f"[nodeagent] cannot start {argv!r}: {err}\n".encode())
                container.proc = None
                container.state = {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "message": str(err),
                        "startedAt": now(),
                        "finishedAt": now(),
                    }
                }
                policy = self.pod["spec"].get("restartPolicy", "Always")
                if policy == "Never" or container.init:
                    container.done = True
                else:
                    container.restart_count += 1
                    container.not_before = time.monotonic() + 5.0
                return
        container.proc_start = process_start_time(container.proc.pid)
        self.agent.track(container.proc.pid, container.proc_start)
        container.started_at = now()
        container.state = {"running": {"startedAt": container.started_at}}
        log(f"pod {self.namespace}/{self.pod_name}: started {container.name} as pid {container.proc.pid}")

    def grace_period(self) -> float:
        with self.lock:
            meta = self.pod["metadata"]
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(grace)

    def kill_all(self, grace: float) -> None:
        """SIGTERM to every running container's process group, then SIGKILL after `grace`."""
        running = [c for c in self.init_containers + self.containers if c.proc and c.proc.poll() is None]
        for c in running:
            assert c.proc is not None
            with contextlib.suppress(OSError):
                os.killpg(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.proc and c.proc.poll() is None for c in running):
            time.sleep(0.05)
        for c in running:
            assert c.proc is not None
            with contextlib.suppress(OSError):
                os.killpg(c.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=5)
            self.record_exit(c, c.proc.returncode if c.proc.returncode is not None else -9)
            c.done = True

    def finish_deletion(self) -> None:
        """The pod is being deleted: stop its processes, report them, then remove the pod."""
        if self.agent.stopping.is_set():
            self.kill_all(grace=2)
            return
        self.kill_all(0 if self.gone.is_set() else self.grace_period())
        for c in self.init_containers + self.containers:
            if "terminated" not in c.state:
                c.last_state = c.state if "running" in c.state else c.last_state
                c.state = {
                    "terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now()}
                }
        if self.phase not in ("Succeeded", "Failed"):
            all_ok = all(
                c.state.get("terminated", {}).get("exitCode", 1) == 0 for c in self.containers
            ) and bool(self.containers)
            self.phase = "Succeeded" if all_ok else "Failed"
        if not self.gone.is_set():
            self.publish()
            self.remove()

    def wait_for_deletion(self) -> None:
        while not (self.deleting.is_set() or self.gone.is_set() or self.agent.stopping.is_set()):
            self.deleting.wait(1.0)
        if self.deleting.is_set() and not self.gone.is_set() and not self.agent.stopping.is_set():
            self.remove()

    def remove(self) -> None:
        """What a kubelet does last: delete the pod object with grace period 0."""
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        try:
            self.client.delete(self.api_path, body)
            log(f"pod {self.namespace}/{self.pod_name}: removed")
        except ApiError as err:
            if err.status not in (404, 409):
                log(f"pod {self.namespace}/{self.pod_name}: delete failed: {err}")

    # -- status -----------------------------------------------------------------------------

    def set_waiting(self, reason: str, message: str) -> None:
        for c in self.init_containers + self.containers:
            if "waiting" in c.state:
                c.state = {"waiting": {"reason": reason, "message": message}}
        self.publish()

    def publish(self) -> None:
        if self.gone.is_set():
            return
        init_done = all(
            c.done and c.state.get("terminated", {}).get("exitCode") == 0 for c in self.init_containers
        )
        running = self.phase == "Running" and all("running" in c.state for c in self.containers)
        ts = now()

        def condition(kind: str, ok: bool, reason: str = "") -> JSON:
            cond: JSON = {
                "type": kind,
                "status": "True" if ok else "False",
                "lastProbeTime": None,
                "lastTransitionTime": ts,
            }
            if reason and not ok:
                cond["reason"] = reason
            return cond

        terminal = self.phase in ("Succeeded", "Failed")
        ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        status: JSON = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": [
                condition("PodReadyToStartContainers", True),
                condition("Initialized", init_done or terminal, "ContainersNotInitialized"),
                condition("ContainersReady", running, ready_reason),
                condition("Ready", running, ready_reason),
            ],
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        if self.reason:
            status["reason"] = self.reason
        # Don't bump lastTransitionTime when nothing changed.
        key = json.dumps(
            {**status, "conditions": [{**c, "lastTransitionTime": ""} for c in status["conditions"]]},
            sort_keys=True,
        )
        if key == self._last_status:
            return
        try:
            self.client.patch(f"{self.api_path}/status", {"status": status}, STRATEGIC_MERGE_PATCH)
            self._last_status = key
        except ApiError as err:
            if err.status == 404:
                self.gone.set()
            else:
                log(f"pod {self.namespace}/{self.pod_name}: status update failed: {err}")

    # -- volumes and environment ------------------------------------------------------------

    def get_object(self, kind: str, name: str, optional: bool) -> JSON | None:
        path = f"/api/v1/namespaces/{self.namespace}/{kind}/{name}"
        try:
            return self.client.get(path)
        except ApiError as err:
            if err.status == 404 and optional:
                return None
            raise ConfigError(f"{kind[:-1]} {name!r}: {err.reason or err.status}") from err

    def object_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes]:
        obj = self.get_object(kind, name, optional)
        if obj is None:
            return {}
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def field_value(self, path: str) -> str:
        with self.lock:
            pod = self.pod
        meta = pod["metadata"]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
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
        if path == "metadata.labels":
            return "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("labels") or {}).items()))
        if path == "metadata.annotations":
            return "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("annotations") or {}).items()))
        if path not in values:
            raise ConfigError(f"unsupported fieldRef {path!r}")
        return str(values[path])

    def service_account_token(self, audience: str | None, seconds: int) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        spec: JSON = {
            "expirationSeconds": seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid},
        }
        if audience:
            spec["audiences"] = [audience]
        try:
            answer = self.client.create(
                f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except ApiError as err:
            raise ConfigError(f"token for serviceaccount {sa!r}: {err}") from err
        return str(answer["status"]["token"])

    def write_items(self, folder: Path, data: dict[str, bytes], items: list[JSON] | None) -> None:
        if items:
            for item in items:
                if item["key"] in data:
                    target = folder / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data[item["key"]])
                elif not item.get("optional", False):
                    raise ConfigError(f"key {item['key']!r} not found")
        else:
            for key, value in data.items():
                (folder / key).write_bytes(value)

    def prepare_volumes(self) -> None:
        """Lays out every volume as a local folder; the service account token goes in KUBECONFIG."""
        sa_token: str | None = None
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            folder = self.dir / "volumes" / name
            if "hostPath" in volume:
                host = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, "") and not host.exists():
                    with contextlib.suppress(OSError):
                        host.mkdir(parents=True, exist_ok=True)
                self.volumes[name] = str(host)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            self.volumes[name] = str(folder)
            if "configMap" in volume:
                src = volume["configMap"]
                data = self.object_data("configmaps", src["name"], bool(src.get("optional")))
                self.write_items(folder, data, src.get("items"))
            elif "secret" in volume:
                src = volume["secret"]
                data = self.object_data("secrets", src["secretName"], bool(src.get("optional")))
                self.write_items(folder, data, src.get("items"))
            elif "downwardAPI" in volume:
                for item in volume["downwardAPI"].get("items") or []:
                    if "fieldRef" in item:
                        (folder / item["path"]).write_text(self.field_value(item["fieldRef"]["fieldPath"]))
            elif "projected" in volume:
                for source in volume["projected"].get("sources") or []:
                    if "serviceAccountToken" in source:
                        src = source["serviceAccountToken"]
                        token = self.service_account_token(
                            src.get("audience"), int(src.get("expirationSeconds") or 3607)
                        )
                        (folder / src["path"]).write_text(token)
                        if not src.get("audience"):
                            sa_token = token
                    elif "configMap" in source:
                        src = source["configMap"]
                        data = self.object_data("configmaps", src["name"], bool(src.get("optional")))
                        self.write_items(folder, data, src.get("items"))
                    elif "secret" in source:
                        src = source["secret"]
                        data = self.object_data("secrets", src["name"], bool(src.get("optional")))
                        self.write_items(folder, data, src.get("items"))
                    elif "downwardAPI" in source:
                        for item in source["downwardAPI"].get("items") or []:
                            if "fieldRef" in item:
                                target = folder / item["path"]
                                target.parent.mkdir(parents=True, exist_ok=True)
                                target.write_text(self.field_value(item["fieldRef"]["fieldPath"]))
            # emptyDir and anything else: an empty folder of the pod.
        if sa_token is not None:
            config = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "cluster",
                        "cluster": {
                            "server": self.agent.client.server,
                            "certificate-authority-data": base64.b64encode(
                                self.agent.ca_file.read_bytes()
                            ).decode(),
                        },
                    }
                ],
                "users": [{"name": "pod", "user": {"token": sa_token}}],
                "contexts": [
                    {
                        "name": "pod",
                        "context": {"cluster": "cluster", "user": "pod", "namespace": self.namespace},
                    }
                ],
                "current-context": "pod",
            }
            path = self.dir / "kubeconfig"
            path.write_text(json.dumps(config, indent=2))
            path.chmod(0o600)
            self.pod_kubeconfig = str(path)

    def command_for(self, container: Container) -> tuple[list[str], dict[str, str], str]:
        spec = container.spec
        agent = self.agent
        env: dict[str, str] = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env.update(
            {
                "PATH": agent.path,
                "HOME": os.environ.get("HOME", str(self.dir / "work")),
                "TMPDIR": str(self.dir / "tmp"),
                "HOSTNAME": self.pod_name,
                "PYTHONUNBUFFERED": "1",
                "KUBERNETES_SERVICE_HOST": agent.api_host,
                "KUBERNETES_SERVICE_PORT": str(agent.api_port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(agent.api_port),
                "KUBERNETES_PORT": f"tcp://{agent.api_host}:{agent.api_port}",
                "IMAGEBATCH_POD_DIR": str(self.dir),
            }
        )
        if self.pod_kubeconfig:
            env["KUBECONFIG"] = self.pod_kubeconfig
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = self.object_data("configmaps", ref["name"], bool(ref.get("optional")))
            elif "secretRef" in source:
                ref = source["secretRef"]
                data = self.object_data("secrets", ref["name"], bool(ref.get("optional")))
            else:
                continue
            env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
        for var in spec.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[name] = self.field_value(source["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in source or "secretKeyRef" in source:
                kind = "configmaps" if "configMapKeyRef" in source else "secrets"
                ref = source.get("configMapKeyRef") or source["secretKeyRef"]
                data = self.object_data(kind, ref["name"], bool(ref.get("optional")))
                if ref["key"] in data:
                    env[name] = data[ref["key"]].decode(errors="replace")
                elif not ref.get("optional"):
                    raise ConfigError(f"key {ref['key']!r} not in {kind[:-1]} {ref['name']!r}")
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                kind, _, res = resource.partition(".")
                value = (spec.get("resources") or {}).get(kind, {}).get(res)
                env[name] = str(value if value is not None else agent.capacity.get(res, "0"))
        mounts: dict[str, str] = {}
        for mount in spec.get("volumeMounts") or []:
            local = self.volumes.get(mount["name"])
            if local is None:
                continue
            if mount.get("subPath"):
                local = os.path.join(local, mount["subPath"])
                Path(local).mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = local
        env["IMAGEBATCH_PATH_MAP"] = json.dumps(mounts)
        argv = [expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        if not spec.get("command"):
            raise ConfigError("the node agent ignores images: the container needs a command")
        if re.fullmatch(r"python(3(\.\d+)?)?", argv[0]):
            argv[0] = sys.executable
        elif "/" not in argv[0]:
            found = shutil.which(argv[0], path=env["PATH"])
            if found:
                argv[0] = found
        cwd = str(self.dir / "work")
        working_dir = spec.get("workingDir")
        if working_dir:
            from imagebatch_testing.pathmap import map_path

            mapped = map_path(working_dir, {"IMAGEBATCH_PATH_MAP": env["IMAGEBATCH_PATH_MAP"]})
            if os.path.isdir(mapped):
                cwd = mapped
        return argv, env, cwd


class NodeAgent:
    """Registers one Node and runs the pods bound to it."""

    def __init__(
        self,
        client: KubeClient,
        node_name: str,
        work_dir: Path,
        ca_file: Path,
        *,
        extra_capacity: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.node_name = node_name
        self.work_dir = work_dir
        self.ca_file = ca_file
        self.api_host = client.host
        self.api_port = client.port
        self.workers: dict[str, PodWorker] = {}
        self.workers_lock = threading.Lock()
        self.started = now()
        self.kubelet_version = "v0.0.0"
        self.stopping = threading.Event()
        venv_bin = os.path.dirname(sys.executable)
        self.path = os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
        self.capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024}Ki",
            "pods": "110",
            "ephemeral-storage": f"{shutil.disk_usage(work_dir).total // 1024}Ki",
        }
        self.capacity.update(extra_capacity or {})
        self.extra_labels = dict(labels or {})
        (work_dir / "procs").mkdir(parents=True, exist_ok=True)
        (work_dir / "pods").mkdir(parents=True, exist_ok=True)

    # -- processes, recorded for `cluster down` ---------------------------------------------

    def track(self, pid: int, start: int) -> None:
        (self.work_dir / "procs" / str(pid)).write_text(f"{pid} {start}\n")

    def untrack(self, pid: int) -> None:
        (self.work_dir / "procs" / str(pid)).unlink(missing_ok=True)

    def forget(self, uid: str) -> None:
        with self.workers_lock:
            self.workers.pop(uid, None)

    # -- the node ---------------------------------------------------------------------------

    def node_status(self) -> JSON:
        ts = now()

        def cond(kind: str, status: str, reason: str, message: str) -> JSON:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": ts,
                "lastTransitionTime": self.started,
            }

        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "enough memory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "enough disk"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "enough PIDs"),
                cond("Ready", "True", "KubeletReady", "imagebatch node agent is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": platform.release(),
                "osImage": "imagebatch node agent",
                "containerRuntimeVersion": "imagebatch://0.1",
                "kubeletVersion": self.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64" if platform.machine() == "x86_64" else platform.machine(),
            },
        }

    def register(self) -> None:
        with contextlib.suppress(ApiError):
            self.kubelet_version = str(self.client.get("/version").get("gitVersion", "v0.0.0"))
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": self.node_status()["nodeInfo"]["architecture"],
            "imagebatch.dev/node-agent": "true",
            **self.extra_labels,
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": labels},
            "status": self.node_status(),
        }
        try:
            self.client.create("/api/v1/nodes", node)
            log(f"registered node {self.node_name}")
        except ApiError as err:
            if err.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        self.client.patch(
            f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()}, STRATEGIC_MERGE_PATCH
        )
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        lease = self.client.get_or_none(path)
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": micro_now()}
        if lease is None:
            node = self.client.get(f"/api/v1/nodes/{self.node_name}")
            self.client.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.node_name,
                        "ownerReferences": [
                            {
                                "apiVersion": "v1",
                                "kind": "Node",
                                "name": self.node_name,
                                "uid": node["metadata"]["uid"],
                            }
                        ],
                    },
                    "spec": spec,
                },
            )
        else:
            lease["spec"].update(spec)
            self.client.replace(path, lease)

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except (ApiError, OSError) as err:
                log(f"heartbeat failed: {err}")

    # -- pods -------------------------------------------------------------------------------

    def handle(self, event_type: str, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        with self.workers_lock:
            worker = self.workers.get(uid)
            if event_type == "DELETED":
                if worker is not None:
                    worker.gone.set()
                    worker.deleting.set()
                return
            if worker is not None:
                worker.update(pod)
                return
            phase = pod.get("status", {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                if pod["metadata"].get("deletionTimestamp"):
                    # Finished before (or without) us: a kubelet removes it at once.
                    done = PodWorker(self, pod)
                    threading.Thread(target=done.remove, daemon=True).start()
                return
            worker = PodWorker(self, pod)
            worker.update(pod)
            self.workers[uid] = worker
        worker.start()

    def watch_pods(self) -> None:
        path = "/api/v1/pods"
        selector = f"spec.nodeName={self.node_name}"
        while not self.stopping.is_set():
            try:
                listing = self.client.get(path, fieldSelector=selector)
                for pod in listing.get("items") or []:
                    self.handle("ADDED", pod)
                version = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for event in self.client.watch(
                        path, resource_version=version, timeout_seconds=60, fieldSelector=selector
                    ):
                        obj = event["object"]
                        version = obj["metadata"].get("resourceVersion", version)
                        if event["type"] != "BOOKMARK":
                            self.handle(event["type"], obj)
            except (ApiError, OSError, ValueError) as err:
                if not self.stopping.is_set():
                    if not (isinstance(err, ApiError) and err.status == 410):
                        log(f"pod watch: {err}; listing again")
                    time.sleep(0.5)

    def shutdown(self) -> None:
        """Stops every container (SIGTERM, then SIGKILL after 2 s); pods stay in the API."""
        self.stopping.set()
        workers = list(self.workers.values())  # no lock: this may run in a signal handler
        for worker in workers:
            worker.kill_all(grace=2)

    def run(self) -> None:
        self.register()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        self.watch_pods()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagebatch_testing.nodeagent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--ca-file", required=True, help="the cluster CA, given to pods")
    parser.add_argument(
        "--capacity",
        action="append",
        default=[],
        metavar="NAME=QUANTITY",
        help="extra or overridden node capacity, e.g. nvidia.com/gpu=1 (repeatable)",
    )
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="node label")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    client = KubeClient.from_kubeconfig(args.kubeconfig)
    agent = NodeAgent(
        client,
        args.node_name,
        work_dir,
        Path(args.ca_file),
        extra_capacity=dict(item.split("=", 1) for item in args.capacity),
        labels=dict(item.split("=", 1) for item in args.label),
    )

    def on_signal(signum: int, frame: object) -> None:
        log(f"signal {signum}: stopping containers")
        agent.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
