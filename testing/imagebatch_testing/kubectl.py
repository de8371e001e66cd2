"""kubectl for tests, as a user runs it: the real binary against the test cluster's kubeconfig."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

JSON = dict[str, Any]
CRDS = ("imagebatchjobs.imagebatch.dev", "imagebatchshards.imagebatch.dev")


class Kubectl:
    def __init__(self, binary: Path, kubeconfig: Path, cache_dir: Path | None = None) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        if cache_dir is not None:
            # A fresh discovery cache: one left by an earlier cluster on the same port would hide the CRDs.
            self.env["KUBECACHEDIR"] = str(cache_dir)

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def apply(self, docs: list[JSON], namespace: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs), check=check)

    def json(self, *args: str) -> JSON:
        out: JSON = json.loads(self(*args, "-o", "json").stdout)
        return out


def install_crds(k: Kubectl, crds_dir: Path) -> None:
    """Apply the CRDs from crds/ (server-side, as GitOps tools do) and wait until Established."""
    k("apply", "--server-side", "--force-conflicts", "--field-manager=imagebatch-tests", "-f", str(crds_dir))
    for crd in CRDS:
        # The apiextensions controller writes the CRD's status a moment after the apply; until it
        # has, `kubectl wait` fails at once ("<nil> is of the type <nil>") instead of waiting.
        deadline = time.monotonic() + 300
        while True:
            proc = k("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}", check=False)
            if proc.returncode == 0:
                break
            if "accessor error" not in proc.stderr or time.monotonic() > deadline:
                raise AssertionError(f"CRD {crd} not Established: {proc.stderr}")
            time.sleep(0.5)
