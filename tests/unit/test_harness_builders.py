"""The test harness's pure parts: each component's command line, a pod's environment and volumes,
the pod and Node statuses. The cluster tests (tests/cluster) run them for real; these pin the
details that a real run would only show as a hang or a refused request."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from imagebatch_testing import components
from imagebatch_testing.certs import KeyPair
from imagebatch_testing.node import node_status
from imagebatch_testing.podenv import (
    ConfigError,
    NodeContext,
    base_env,
    container_argv,
    container_cwd,
    container_env,
    field_value,
)
from imagebatch_testing.podprocess import Container, exit_code
from imagebatch_testing.podstatus import pod_status, status_key
from imagebatch_testing.podvolumes import lay_out_volumes, pod_kubeconfig

PORTS = {"etcd": 2379, "etcd-peer": 2380, "apiserver": 6443, "controller-manager": 10257, "scheduler": 10259}
BINS = Path("/bins")


def _pki() -> components.ClusterPki:
    def pair(name: str) -> KeyPair:
        return KeyPair(Path(f"/pki/{name}.crt"), Path(f"/pki/{name}.key"))

    return components.ClusterPki(
        ca=pair("ca"),
        apiserver=pair("apiserver"),
        admin=pair("admin"),
        controller_manager=pair("controller-manager"),
        scheduler=pair("scheduler"),
        node=pair("node"),
        service_account=pair("sa"),
        front_proxy_ca=pair("front-proxy-ca"),
        front_proxy_client=pair("front-proxy-client"),
    )


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)


# -- command lines ------------------------------------------------------------------------------


def test_etcd_listens_on_its_two_ports_of_127_0_0_1() -> None:
    argv = components.etcd_command(BINS, Path("/state/etcd-data"), PORTS)
    flags = _flags(argv)
    assert argv[0] == "/bins/etcd"
    assert flags["listen-client-urls"] == flags["advertise-client-urls"] == "http://127.0.0.1:2379"
    assert flags["listen-peer-urls"] == "http://127.0.0.1:2380"
    assert flags["initial-cluster"] == "default=http://127.0.0.1:2380"
    assert flags["data-dir"] == "/state/etcd-data"


def test_apiserver_serves_with_rbac_node_admission_and_its_own_token_issuer() -> None:
    argv = components.apiserver_command(BINS, PORTS, _pki())
    flags = _flags(argv)
    assert argv[0] == "/bins/kube-apiserver"
    assert flags["etcd-servers"] == "http://127.0.0.1:2379"
    assert flags["secure-port"] == "6443"
    assert flags["authorization-mode"] == "Node,RBAC"
    assert flags["enable-admission-plugins"] == "NodeRestriction"
    assert flags["service-account-issuer"] == "https://127.0.0.1:6443"
    assert flags["tls-cert-file"] == "/pki/apiserver.crt" and flags["client-ca-file"] == "/pki/ca.crt"
    assert flags["service-account-key-file"] == "/pki/sa.crt"
    assert flags["service-account-signing-key-file"] == "/pki/sa.key"
    assert flags["requestheader-client-ca-file"] == "/pki/front-proxy-ca.crt"
    assert flags["service-cluster-ip-range"] == components.SERVICE_CIDR


def test_controller_manager_signs_tokens_with_the_key_the_apiserver_checks() -> None:
    pki = _pki()
    argv = components.controller_manager_command(BINS, Path("/s/kcm.kubeconfig"), PORTS, Path("/s/kcm"), pki)
    flags = _flags(argv)
    assert argv[0] == "/bins/kube-controller-manager"
    assert flags["kubeconfig"] == flags["authentication-kubeconfig"] == "/s/kcm.kubeconfig"
    assert flags["secure-port"] == "10257" and flags["bind-address"] == "127.0.0.1"
    assert flags["service-account-private-key-file"] == str(pki.service_account.key)
    assert flags["cluster-signing-cert-file"] == "/pki/ca.crt"
    assert flags["leader-elect"] == "false"


def test_scheduler_has_its_own_port_and_kubeconfig() -> None:
    argv = components.scheduler_command(BINS, Path("/s/sched.kubeconfig"), PORTS, Path("/s/sched"))
    flags = _flags(argv)
    assert argv[0] == "/bins/kube-scheduler"
    assert flags["kubeconfig"] == flags["authorization-kubeconfig"] == "/s/sched.kubeconfig"
    assert flags["secure-port"] == "10259" and flags["cert-dir"] == "/s/sched"


def test_node_agent_runs_with_this_python_and_passes_capacity_and_labels() -> None:
    argv = components.nodeagent_command(
        sys.executable,
        Path("/s/node.kubeconfig"),
        "n1",
        Path("/s/node"),
        Path("/pki/ca.crt"),
        {"nvidia.com/gpu": "1"},
        {"pool": "gpu"},
    )
    assert argv[:3] == [sys.executable, "-m", "imagebatch_testing.nodeagent"]
    assert "--capacity=nvidia.com/gpu=1" in argv and "--label=pool=gpu" in argv
    assert "--node-name=n1" in argv and "--ca-file=/pki/ca.crt" in argv


# -- a pod's environment and volumes -------------------------------------------------------------

POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "x"}},
    "spec": {"nodeName": "n1", "serviceAccountName": "sa"},
}
NODE = NodeContext("127.0.0.1", 6443, "/venv/bin:/usr/bin", {"cpu": "4", "memory": "8Gi"})
OBJECTS = {
    ("configmaps", "cm"): {"greeting": b"hello", "other": b"o"},
    ("secrets", "s"): {"password": b"pw"},
}


def _lookup(kind: str, name: str, optional: bool) -> dict[str, bytes]:
    if (kind, name) in OBJECTS:
        return OBJECTS[(kind, name)]
    if optional:
        return {}
    raise ConfigError(f"{kind[:-1]} {name!r}: NotFound")


def test_field_values_of_the_downward_api() -> None:
    assert field_value(POD, "metadata.namespace") == "ns"
    assert field_value(POD, "spec.nodeName") == "n1"
    assert field_value(POD, "metadata.labels['app']") == "x"
    assert field_value(POD, "metadata.labels") == 'app="x"'
    with pytest.raises(ConfigError, match="unsupported fieldRef"):
        field_value(POD, "spec.nothing")


def test_container_env_follows_kubernetes_order_and_sources(tmp_path: Path) -> None:
    spec = {
        "name": "c",
        "command": ["python", "-c", "pass"],
        "envFrom": [{"prefix": "CM_", "configMapRef": {"name": "cm"}}],
        "env": [
            {"name": "A", "value": "1"},
            {"name": "B", "value": "$(A)-$(CM_greeting)"},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "password"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "GONE", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "x", "optional": True}}},
        ],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    base = base_env(NODE, tmp_path, "p", "/pod/kubeconfig", {"HOME": "/home/u", "LANG": "C", "SECRET": "no"})
    env = container_env(spec, POD, base, _lookup, {"data": str(tmp_path / "vol")}, NODE)
    assert env["CM_greeting"] == "hello" and env["B"] == "1-hello"
    assert env["PW"] == "pw" and env["NS"] == "ns" and env["CPU"] == "4"
    assert "GONE" not in env and "SECRET" not in env and env["LANG"] == "C"
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"] == "6443"
    assert env["KUBECONFIG"] == "/pod/kubeconfig"
    assert json.loads(env["IMAGEBATCH_PATH_MAP"]) == {"/data": str(tmp_path / "vol")}
    assert container_argv(spec, env) == [sys.executable, "-c", "pass"]


def test_a_missing_required_key_or_command_is_a_config_error(tmp_path: Path) -> None:
    base = base_env(NODE, tmp_path, "p", None, {})
    spec = {"name": "c", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "x"}}}]}
    with pytest.raises(ConfigError, match="key 'x' not in configmap 'cm'"):
        container_env(spec, POD, base, _lookup, {}, NODE)
    with pytest.raises(ConfigError, match="needs a command"):
        container_argv({"name": "c", "image": "busybox"}, base)


def test_working_dir_is_mapped_through_the_mounts(tmp_path: Path) -> None:
    (tmp_path / "vol" / "sub").mkdir(parents=True)
    env = {"IMAGEBATCH_PATH_MAP": json.dumps({"/data": str(tmp_path / "vol")})}
    assert container_cwd({"workingDir": "/data/sub"}, env, "/work") == str(tmp_path / "vol" / "sub")
    assert container_cwd({"workingDir": "/elsewhere"}, env, "/work") == "/work"
    assert container_cwd({}, env, "/work") == "/work"


def test_volumes_are_laid_out_as_folders_and_the_api_token_is_kept(tmp_path: Path) -> None:
    pod = {
        **POD,
        "spec": {
            **POD["spec"],
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {
                    "name": "cfg",
                    "configMap": {"name": "cm", "items": [{"key": "greeting", "path": "g/x.txt"}]},
                },
                {"name": "creds", "secret": {"secretName": "s"}},
                {
                    "name": "info",
                    "downwardAPI": {
                        "items": [{"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    },
                },
                {
                    "name": "api",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"path": "token", "expirationSeconds": 600}},
                            {"serviceAccountToken": {"path": "aud", "audience": "vault"}},
                        ]
                    },
                },
            ],
        },
    }
    asked: list[tuple[str | None, int]] = []

    def token(audience: str | None, seconds: int) -> str:
        asked.append((audience, seconds))
        return f"tok-{audience}"

    folders, api_token = lay_out_volumes(pod, tmp_path, _lookup, token)
    assert set(folders) == {"scratch", "cfg", "creds", "info", "api"}
    assert (tmp_path / "cfg" / "g" / "x.txt").read_text() == "hello"
    assert not (tmp_path / "cfg" / "other").exists()
    assert (tmp_path / "creds" / "password").read_bytes() == b"pw"
    assert (tmp_path / "info" / "ns").read_text() == "ns"
    assert (tmp_path / "api" / "token").read_text() == "tok-None"
    assert api_token == "tok-None" and asked == [(None, 600), ("vault", 3607)]
    config = pod_kubeconfig("https://127.0.0.1:6443", b"CA", api_token, "ns")
    assert config["users"][0]["user"] == {"token": "tok-None"}
    assert config["contexts"][0]["context"]["namespace"] == "ns"


def test_a_missing_config_map_of_a_volume_is_a_config_error(tmp_path: Path) -> None:
    pod = {**POD, "spec": {"volumes": [{"name": "cfg", "configMap": {"name": "absent"}}]}}
    with pytest.raises(ConfigError, match="absent"):
        lay_out_volumes(pod, tmp_path, _lookup, lambda a, s: "t")


# -- statuses ---------------------------------------------------------------------------------------


def test_pod_status_is_ready_only_when_every_container_runs() -> None:
    running = Container({"name": "a"}, state={"running": {"startedAt": "t0"}})
    waiting = Container({"name": "b"})
    ready = pod_status("Running", "", "t0", [running], [], "t1")
    assert {c["type"]: c["status"] for c in ready["conditions"]}["Ready"] == "True"
    not_ready = pod_status("Running", "", "t0", [running, waiting], [], "t1")
    cond = {c["type"]: c for c in not_ready["conditions"]}["Ready"]
    assert cond["status"] == "False" and cond["reason"] == "ContainersNotReady"
    assert [c["name"] for c in not_ready["containerStatuses"]] == ["a", "b"]
    # Only a change of substance is written again, not a new timestamp.
    assert status_key(ready) == status_key(pod_status("Running", "", "t0", [running], [], "t2"))
    assert status_key(ready) != status_key(not_ready)


def test_a_killed_process_reports_128_plus_the_signal() -> None:
    assert exit_code(-15) == 143 and exit_code(-9) == 137 and exit_code(3) == 3


def test_node_status_is_ready_with_its_capacity() -> None:
    status = node_status("n1", {"cpu": "2", "nvidia.com/gpu": "1"}, "v1.36.3", "t0", "t1")
    assert status["capacity"] == status["allocatable"] == {"cpu": "2", "nvidia.com/gpu": "1"}
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["lastHeartbeatTime"] == "t1"
    assert status["nodeInfo"]["kubeletVersion"] == "v1.36.3"


def test_the_api_server_reaches_the_node_agents_kubelet_api_with_a_client_certificate() -> None:
    def pair(name: str) -> KeyPair:
        return KeyPair(Path(f"/pki/{name}.crt"), Path(f"/pki/{name}.key"))

    pki = dataclasses.replace(_pki(), kubelet_client=pair("kc"), node_serving=pair("ns"))
    flags = _flags(components.apiserver_command(BINS, PORTS, pki))
    assert (
        flags["kubelet-client-certificate"] == "/pki/kc.crt" and flags["kubelet-client-key"] == "/pki/kc.key"
    )
    assert flags["kubelet-certificate-authority"] == "/pki/ca.crt"
    assert flags["kubelet-preferred-address-types"] == "InternalIP"
    argv = components.nodeagent_command(
        sys.executable,
        Path("/s/n.kubeconfig"),
        "n1",
        Path("/s/node"),
        Path("/pki/ca.crt"),
        {},
        {},
        10250,
        pair("ns"),
    )
    assert {"--port=10250", "--tls-cert-file=/pki/ns.crt", "--tls-private-key-file=/pki/ns.key"} <= set(argv)
    assert "kubelet-client-certificate" not in _flags(components.apiserver_command(BINS, PORTS, _pki()))
