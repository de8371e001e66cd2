"""What each process of the local cluster is started with: certificates and command lines.

The command-line builders are pure (paths and ports in, argv out) and unit-tested
(tests/unit/test_harness_builders.py); cluster.py starts the processes in order.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imagebatch_testing.certs import CertificateAuthority, KeyPair, service_account_keys

SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
PORT_NAMES = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kubelet")
APISERVER_HOSTS = (
    "127.0.0.1",
    "localhost",
    KUBERNETES_SERVICE_IP,
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class ClusterPki:
    """Every certificate and key of the cluster, as files under the pki dir."""

    ca: KeyPair
    apiserver: KeyPair
    admin: KeyPair
    controller_manager: KeyPair
    scheduler: KeyPair
    node: KeyPair
    service_account: KeyPair
    front_proxy_ca: KeyPair
    front_proxy_client: KeyPair
    # The kubelet API (the node agent's container logs): its serving pair, and the API server's
    # client certificate for it (kubeadm's apiserver-kubelet-client, in system:masters).
    node_serving: KeyPair | None = None
    kubelet_client: KeyPair | None = None


def issue_certificates(pki: Path, node_name: str) -> ClusterPki:
    """One CA for serving and clients, one key for ServiceAccount tokens, and the aggregation
    layer's CA and client (request-header authentication), as kubeadm sets them up."""
    ca = CertificateAuthority(pki)
    front_proxy_ca = CertificateAuthority(pki, "front-proxy-ca", "imagebatch-test-front-proxy-ca")
    return ClusterPki(
        ca=ca.pair,
        apiserver=ca.issue("apiserver", "kube-apiserver", hosts=APISERVER_HOSTS, client=False, server=True),
        admin=ca.issue("admin", "kubernetes-admin", organizations=("system:masters",)),
        controller_manager=ca.issue("controller-manager", "system:kube-controller-manager"),
        scheduler=ca.issue("scheduler", "system:kube-scheduler"),
        node=ca.issue("node", f"system:node:{node_name}", organizations=("system:nodes",)),
        service_account=service_account_keys(pki),
        front_proxy_ca=front_proxy_ca.pair,
        front_proxy_client=front_proxy_ca.issue("front-proxy-client", "front-proxy-client"),
        node_serving=ca.issue(
            "node-serving",
            f"system:node:{node_name}",
            organizations=("system:nodes",),
            hosts=("127.0.0.1", node_name),
            client=False,
            server=True,
        ),
        kubelet_client=ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", organizations=("system:masters",)
        ),
    )


def kubeconfig(server: str, ca: Path, user: str, cert: Path | None = None, key: Path | None = None) -> str:
    """A self-contained kubeconfig (certificates inline), as JSON, which is valid YAML."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    creds: dict[str, str] = {}
    if cert and key:
        creds = {"client-certificate-data": b64(cert), "client-key-data": b64(key)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "imagebatch-test", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}
        ],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "imagebatch-test", "context": {"cluster": "imagebatch-test", "user": user}}],
        "current-context": "imagebatch-test",
    }
    return json.dumps(config, indent=2) + "\n"


def server_url(ports: Mapping[str, int]) -> str:
    return f"https://127.0.0.1:{ports['apiserver']}"


def etcd_client_url(ports: Mapping[str, int]) -> str:
    return f"http://127.0.0.1:{ports['etcd']}"


def etcd_command(bins: Path, data_dir: Path, ports: Mapping[str, int]) -> list[str]:
    client, peer = etcd_client_url(ports), f"http://127.0.0.1:{ports['etcd-peer']}"
    return [
        str(bins / "etcd"),
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--initial-cluster-state=new",
        "--unsafe-no-fsync=true",  # test data: durability costs time and buys nothing
        "--log-level=warn",
    ]


def apiserver_command(bins: Path, ports: Mapping[str, int], pki: ClusterPki) -> list[str]:
    server = server_url(ports)
    return [
        str(bins / "kube-apiserver"),
        f"--etcd-servers={etcd_client_url(ports)}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={ports['apiserver']}",
        f"--tls-cert-file={pki.apiserver.cert}",
        f"--tls-private-key-file={pki.apiserver.key}",
        f"--client-ca-file={pki.ca.cert}",
        "--authorization-mode=Node,RBAC",
        "--anonymous-auth=true",
        "--allow-privileged=true",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # The default admission plugins (NamespaceLifecycle, LimitRanger, ServiceAccount,
        # PodSecurity, ResourceQuota, webhooks, ...) plus the node's restrictions.
        "--enable-admission-plugins=NodeRestriction",
        f"--service-account-issuer={server}",
        f"--service-account-key-file={pki.service_account.cert}",
        f"--service-account-signing-key-file={pki.service_account.key}",
        # No kubelet serves the Service's endpoint; 127.0.0.1 is not a valid endpoint.
        "--endpoint-reconciler-type=none",
        f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
        f"--proxy-client-key-file={pki.front_proxy_client.key}",
        *_kubelet_client_flags(pki),
        "--v=1",
    ]


def _kubelet_client_flags(pki: ClusterPki) -> list[str]:
    """How the API server reaches the node agent's kubelet API (kubectl logs): at the node's
    InternalIP, checking its serving certificate, with a client certificate of its own."""
    if pki.kubelet_client is None:
        return []
    return [
        "--kubelet-preferred-address-types=InternalIP",
        f"--kubelet-certificate-authority={pki.ca.cert}",
        f"--kubelet-client-certificate={pki.kubelet_client.cert}",
        f"--kubelet-client-key={pki.kubelet_client.key}",
    ]


def _component_flags(config: Path, port: int, cert_dir: Path) -> list[str]:
    """What the controller manager and the scheduler share: one kubeconfig, a local port."""
    return [
        f"--kubeconfig={config}",
        f"--authentication-kubeconfig={config}",
        f"--authorization-kubeconfig={config}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",  # one instance
    ]


def controller_manager_command(
    bins: Path, config: Path, ports: Mapping[str, int], cert_dir: Path, pki: ClusterPki
) -> list[str]:
    return [
        str(bins / "kube-controller-manager"),
        *_component_flags(config, ports["controller-manager"], cert_dir),
        "--controllers=*",
        f"--service-account-private-key-file={pki.service_account.key}",
        f"--root-ca-file={pki.ca.cert}",
        "--use-service-account-credentials=true",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--v=1",
    ]


def scheduler_command(bins: Path, config: Path, ports: Mapping[str, int], cert_dir: Path) -> list[str]:
    return [str(bins / "kube-scheduler"), *_component_flags(config, ports["scheduler"], cert_dir), "--v=1"]


def nodeagent_command(
    python: str,
    config: Path,
    node_name: str,
    work_dir: Path,
    ca_cert: Path,
    capacity: Mapping[str, str],
    labels: Mapping[str, str],
    kubelet_port: int = 0,
    serving: KeyPair | None = None,
) -> list[str]:
    """The node agent (a kubelet stand-in) runs with this Python, so pods get this environment;
    with `serving`, it serves the kubelet API's container logs on `kubelet_port`."""
    api = (
        [f"--port={kubelet_port}", f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}"]
        if serving is not None
        else []
    )
    return [
        python,
        "-m",
        "imagebatch_testing.nodeagent",
        f"--kubeconfig={config}",
        f"--node-name={node_name}",
        f"--work-dir={work_dir}",
        f"--ca-file={ca_cert}",
        *(f"--capacity={k}={v}" for k, v in capacity.items()),
        *(f"--label={k}={v}" for k, v in labels.items()),
        *api,
    ]
