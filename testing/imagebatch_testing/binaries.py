"""The Kubernetes binaries the local cluster runs, built from Go modules by hack/cluster/build.sh."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from imagebatch_testing.processes import ClusterError

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "cluster" / "build.sh"


def build_binaries(timeout: float = 3600) -> Path:
    """Runs hack/cluster/build.sh (cached, so quick when nothing is missing); returns the bin dir."""
    if not BUILD_SCRIPT.exists():
        raise ClusterError(f"missing {BUILD_SCRIPT}")
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, timeout=timeout, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ClusterError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
    bin_dir = Path(lines[-1])
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"):
        if not os.access(bin_dir / name, os.X_OK):
            raise ClusterError(f"{BUILD_SCRIPT} did not produce {bin_dir / name}")
    return bin_dir
