"""One pod's life on the test node: volumes, init containers, containers, restarts, deletion.

A thread per pod. The environment (podenv), volumes (podvolumes), processes (podprocess) and
status (podstatus) are built by their own modules; this one sequences them and talks to the API
for the pod (its status, its config maps and secrets, its token, its final removal).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagebatch_testing.kubeapi import STRATEGIC_MERGE_PATCH, ApiError
from imagebatch_testing.podenv import (
    ConfigError,
    NodeContext,
    base_env,
    container_argv,
    container_cwd,
    container_env,
)
from imagebatch_testing.podprocess import (
    TERMINATION_LOG_ENV,
    Container,
    exit_code,
    now,
    process_start_time,
    spawn,
    start_error_state,
    stop,
    terminated_state,
    termination_message,
)
from imagebatch_testing.podstatus import pod_status, status_key
from imagebatch_testing.podvolumes import lay_out_volumes, pod_kubeconfig

if TYPE_CHECKING:
    from imagebatch_testing.node import NodeAgent

JSON = dict[str, Any]


def log(msg: str) -> None:
    print(f"{now()} nodeagent: {msg}", file=sys.stderr, flush=True)


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
        self.reason = ""

    @property
    def api_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"

    def update(self, pod: JSON) -> None:
        with self.lock:
            self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def ending(self) -> bool:
        return self.deleting.is_set() or self.gone.is_set() or self.agent.stopping.is_set()

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
        if not self.wait_for_volumes():
            self.finish_deletion()
            return
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

    def wait_for_volumes(self) -> bool:
        """Volumes and config, retried while something is missing (as a kubelet does)."""
        while not self.ending():
            try:
                self.prepare_volumes()
                return True
            except ConfigError as err:
                self.set_waiting("CreateContainerConfigError", str(err))
                self.deleting.wait(1.0)
        return False

    def restart_policy(self) -> str:
        return str(self.pod["spec"].get("restartPolicy", "Always"))

    def supervise(self) -> None:
        policy = self.restart_policy()
        while True:
            if self.ending():
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
        restart = policy == "Always" or (policy == "OnFailure" and exit_code(code) != 0)
        if restart and not container.init:
            delay = min(10.0, 1.0 * 2 ** min(container.restart_count, 4))
            container.back_off(delay, f"back-off {delay:.0f}s")
        else:
            container.done = True

    def run_to_completion(self, container: Container) -> bool:
        """Runs an init container until it exits 0; False if it fails for good or the pod goes."""
        policy = self.restart_policy()
        while True:
            if self.ending():
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
            if exit_code(code) == 0 or policy == "Never":
                container.done = True
                if exit_code(code) == 0:
                    self.publish()
                return exit_code(code) == 0
            container.back_off(min(10.0, 2.0 ** (container.restart_count + 1)))
            self.publish()

    def record_exit(self, container: Container, code: int) -> None:
        assert container.proc is not None
        self.agent.untrack(container.proc.pid)
        container.state = terminated_state(code, container.started_at, container.proc.pid)
        log_path = self.dir / "logs" / f"{container.name}.log"
        message = termination_message(container.spec, self.message_file(container), log_path, code)
        if message:
            container.state["terminated"]["message"] = message
        with open(log_path, "ab") as out:
            out.write(f"[nodeagent] {container.name} exited with code {exit_code(code)}\n".encode())

    def start_container(self, container: Container) -> None:
        try:
            argv, env, cwd = self.command_for(container)
        except ConfigError as err:
            container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            container.not_before = time.monotonic() + 1.0
            return
        if container.spec.get("terminationMessagePath"):
            # As the kubelet does: an empty file for each run, which the container may write.
            message_file = self.message_file(container)
            message_file.parent.mkdir(parents=True, exist_ok=True)
            message_file.write_bytes(b"")
            env[TERMINATION_LOG_ENV] = str(message_file)
        try:
            container.proc = spawn(argv, env, cwd, self.dir / "logs" / f"{container.name}.log")
        except OSError as err:
            container.proc = None
            container.state = start_error_state(err)
            if self.restart_policy() == "Never" or container.init:
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

    def message_file(self, container: Container) -> Path:
        """Where this node keeps the container's terminationMessagePath file."""
        kind = "init" if container.init else "containers"
        return self.dir / "termination" / kind / container.name

    def grace_period(self) -> float:
        with self.lock:
            grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(grace)

    def kill_all(self, grace: float) -> None:
        """SIGTERM to every running container's process group, then SIGKILL after `grace`."""
        stop(self.init_containers + self.containers, grace, self.record_exit)

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
            all_ok = bool(self.containers) and all(c.exited_ok() for c in self.containers)
            self.phase = "Succeeded" if all_ok else "Failed"
        if not self.gone.is_set():
            self.publish()
            self.remove()

    def wait_for_deletion(self) -> None:
        while not self.ending():
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
        status = pod_status(
            self.phase, self.reason, self.start_time, self.containers, self.init_containers, now()
        )
        key = status_key(status)  # don't bump lastTransitionTime when nothing changed
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

    # -- what the pod reads from the API ----------------------------------------------------

    def object_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes]:
        """A config map's or secret's data ({} if optional and missing); ConfigError otherwise."""
        try:
            obj = self.client.get(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
        except ApiError as err:
            if err.status == 404 and optional:
                return {}
            raise ConfigError(f"{kind[:-1]} {name!r}: {err.reason or err.status}") from err
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

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

    def prepare_volumes(self) -> None:
        """Lays out every volume as a local folder; the service account token goes in KUBECONFIG."""
        with self.lock:
            pod = self.pod
        self.volumes, token = lay_out_volumes(
            pod, self.dir / "volumes", self.object_data, self.service_account_token
        )
        if token is not None:
            config = pod_kubeconfig(
                self.agent.client.server, self.agent.ca_file.read_bytes(), token, self.namespace
            )
            path = self.dir / "kubeconfig"
            path.write_text(json.dumps(config, indent=2))
            path.chmod(0o600)
            self.pod_kubeconfig = str(path)

    def node_context(self) -> NodeContext:
        agent = self.agent
        return NodeContext(agent.api_host, agent.api_port, agent.path, agent.capacity)

    def command_for(self, container: Container) -> tuple[list[str], dict[str, str], str]:
        with self.lock:
            pod = self.pod
        node = self.node_context()
        base = base_env(node, self.dir, self.pod_name, self.pod_kubeconfig, os.environ)
        env = container_env(container.spec, pod, base, self.object_data, self.volumes, node)
        argv = container_argv(container.spec, env)
        return argv, env, container_cwd(container.spec, env, str(self.dir / "work"))
