"""`kubectl logs [-f]` on the local cluster: the API server asks the node agent's kubelet API
(testing/imagebatch_testing/nodelogs.py) over TLS with its kubelet client certificate, as it asks
a kubelet; the agent checks the certificate and asks the API server whether its user may read
`nodes/proxy`. Other clients are refused: no certificate, or one whose user may not."""

from __future__ import annotations

import socket
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest

from imagebatch_testing.cluster import build_binaries, create_namespace
from imagebatch_testing.nodelogs import tail_offset, user_of
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

# Prints two lines, waits for a file the test writes, prints a third and exits.
SCRIPT = (
    "import os, sys, time\n"
    "print('first line', flush=True); print('second line', flush=True)\n"
    "gate = os.path.join(os.environ['GATE'], 'go')\n"
    "while not os.path.exists(gate): time.sleep(0.05)\n"
    "print('third line', flush=True)\n"
)


def kubectl(cluster: TestCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(build_binaries() / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_tail_and_users_of_certificates() -> None:
    data = b"a\nb\nc\n"
    assert data[tail_offset(data, 2) :] == b"b\nc\n"
    assert data[tail_offset(data, 9) :] == data and tail_offset(data, 0) == len(data)
    assert b"a\nb\nc"[tail_offset(b"a\nb\nc", 1) :] == b"c"
    cert = {"subject": ((("organizationName", "system:masters"),), (("commonName", "kube-apiserver-x"),))}
    assert user_of(cert) == ("kube-apiserver-x", ["system:masters"])


def test_kubectl_logs_and_follow_show_a_running_containers_lines(
    kube_cluster: TestCluster, tmp_path: Path
) -> None:
    if kube_cluster.local is None:
        pytest.skip("the local node agent's kubelet API")
    ns = f"logs-{uuid.uuid4().hex[:6]}"
    create_namespace(kube_cluster.client, ns, {})
    gate = tmp_path / "gate"
    gate.mkdir()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "talker", "namespace": ns},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "python",
                    "command": ["python", "-c", SCRIPT],
                    "env": [{"name": "GATE", "value": str(gate)}],
                }
            ],
        },
    }
    kube_cluster.client.create(f"/api/v1/namespaces/{ns}/pods", pod)
    try:
        wait = kubectl(kube_cluster, "wait", "-n", ns, "--for=jsonpath={.status.phase}=Running", "pod/talker")
        assert wait.returncode == 0, wait.stderr
        # The two first lines, while the container runs (kubectl logs is not a file read here).
        deadline_lines = ""
        for _ in range(600):
            got = kubectl(kube_cluster, "logs", "-n", ns, "talker")
            assert got.returncode == 0, got.stderr
            deadline_lines = got.stdout
            if "second line" in got.stdout:
                break
        assert deadline_lines.splitlines() == ["first line", "second line"], deadline_lines
        tail = kubectl(kube_cluster, "logs", "-n", ns, "talker", "--tail=1")
        assert tail.stdout.splitlines() == ["second line"]

        follow = subprocess.Popen(
            [
                str(build_binaries() / "kubectl"),
                f"--kubeconfig={kube_cluster.kubeconfig}",
                "logs",
                "-f",
                "-n",
                ns,
                "talker",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert follow.stdout is not None
        assert follow.stdout.readline() == "first line\n"
        assert follow.stdout.readline() == "second line\n"
        (gate / "go").write_text("")  # now the container prints its last line and exits
        rest, err = follow.communicate(timeout=120)  # -f ends when the container does
        assert follow.returncode == 0, err
        assert rest.startswith("third line\n"), rest
    finally:
        kube_cluster.client.delete(f"/api/v1/namespaces/{ns}")


def get(port: int, context: ssl.SSLContext, path: str) -> bytes:
    """One HTTPS GET to the kubelet API; the raw answer (the connection is closed after it)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
        return answer


def test_the_kubelet_api_refuses_other_clients(kube_cluster: TestCluster) -> None:
    local = kube_cluster.local
    if local is None:
        pytest.skip("the local node agent's kubelet API")
    node = kube_cluster.client.get(f"/api/v1/nodes/{local.node_name}")
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    assert port > 0
    pki = local.pki
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):  # no certificate
        if not get(port, context, "/containerLogs/a/b/c"):
            raise ConnectionResetError
    # The scheduler's certificate is the cluster CA's, but its user may not read nodes/proxy.
    context.load_cert_chain(str(pki / "scheduler.crt"), str(pki / "scheduler.key"))
    answer = get(port, context, "/containerLogs/default/x/y")
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"system:kube-scheduler" in answer
    assert {"type": "InternalIP", "address": "127.0.0.1"} in node["status"]["addresses"]
