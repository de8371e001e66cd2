"""The local cluster's command line: python -m imagebatch_testing.cluster up|down|status|build.

`make cluster-up` / `make cluster-down` run it; see docs/test-cluster.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import imagebatch_testing.cluster as local_cluster
from imagebatch_testing.cluster import ClusterError, LocalCluster, build_binaries
from imagebatch_testing.state import DEFAULT_NODE_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagebatch_testing.cluster",
        description=local_cluster.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("up", "down", "status", "build"))
    parser.add_argument(
        "--dir", default=None, help="state dir (default: $IMAGEBATCH_CLUSTER_DIR or /tmp/imagebatch-cluster)"
    )
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    parser.add_argument("--no-node-agent", action="store_true", help="start only the control plane")
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build_binaries())
        return 0
    cluster = LocalCluster(args.dir, node_name=args.node_name, node_agent=not args.no_node_agent)
    try:
        if args.command == "up":
            cluster.up(timeout=args.timeout)
            print(f"export KUBECONFIG={cluster.kubeconfig}")
        elif args.command == "down":
            cluster.down()
            busy = cluster.listening_ports()
            if busy:
                print(f"still listening: {busy}", file=sys.stderr)
                return 1
        else:
            status = cluster.status()
            print(json.dumps(status, indent=2))
            return 0 if cluster.is_up() else 1
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
