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
enforce resource limits, run probes (a running container is Ready), serve exec/attach/port
forwarding (it serves container logs: nodelogs.py), or networking (every pod has IP 127.0.0.1). See docs/test-cluster.md.

    python -m imagebatch_testing.nodeagent --kubeconfig node.kubeconfig --node-name NAME \
        --work-dir DIR --ca-file ca.crt

This module is the command line; the parts are node (the Node, its Lease, the pod watch),
podworker (one pod's life), podenv (environment, downward API), podvolumes (volumes), podprocess
(container processes) and podstatus (the pod's status).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from imagebatch_testing.kubeapi import KubeClient
from imagebatch_testing.node import KubeletApi, NodeAgent
from imagebatch_testing.podenv import ConfigError, expand
from imagebatch_testing.podworker import PodWorker, log

# The names this module held before it was split (kept for existing imports).
__all__ = ["ConfigError", "NodeAgent", "PodWorker", "expand", "main"]


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
    parser.add_argument("--port", type=int, default=0, help="the kubelet API's port (container logs)")
    parser.add_argument("--tls-cert-file", help="the kubelet API's serving certificate; none: no API")
    parser.add_argument("--tls-private-key-file")
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
        kubelet_api=KubeletApi(
            args.port, Path(args.tls_cert_file), Path(args.tls_private_key_file), Path(args.ca_file)
        )
        if args.tls_cert_file
        else None,
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
