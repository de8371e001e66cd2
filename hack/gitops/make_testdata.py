"""Writes resource_customizations/imagebatch.dev/ImageBatchJob/testdata/ from the objects that
tests/e2e/test_gitops_live.py captured (IMAGEBATCH_GITOPS_CAPTURE=DIR), plus the cases that a
live cluster does not produce on the local node, each derived from a captured one:

    python hack/gitops/make_testdata.py DIR

- degraded-without-message: the failed job's Failed condition without message and reason;
- conditions-without-message-or-reason: the running job's conditions without either;
- workers-failing: the running job's WorkersHealthy False with ImagePullBackOff (the local node
  ignores images, so no pull can fail there);
- no-status: the complete job before the operator wrote any status.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parents[2] / "resource_customizations/imagebatch.dev/ImageBatchJob/testdata"
NAMES = {
    "running": "progressing",
    "complete": "healthy",
    "failed": "degraded",
    "suspended": "suspended",
    "queued": "queued",
    "deleting": "deleting",
    "stale-generation": "stale-generation",
}


def conditions(obj: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = obj["status"]["conditions"]
    return found


def derived(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    bare = copy.deepcopy(objs["degraded"])
    for c in conditions(bare):
        if c["type"] == "Failed":
            c.pop("message", None)
            c.pop("reason", None)
    out["degraded-without-message"] = bare
    plain = copy.deepcopy(objs["progressing"])
    for c in conditions(plain):
        c.pop("message", None)
        c.pop("reason", None)
    out["conditions-without-message-or-reason"] = plain
    pulling = copy.deepcopy(objs["progressing"])
    for c in conditions(pulling):
        if c["type"] == "WorkersHealthy":
            c.update(
                status="False",
                reason="ImagePullBackOff",
                message="worker pod cannot pull its image 'registry.example/no-such:1': check spec.workers.image",
            )
    out["workers-failing"] = pulling
    new = copy.deepcopy(objs["healthy"])
    new.pop("status")
    new["metadata"]["generation"] = 1
    out["no-status"] = new
    return out


def main(capture: Path) -> None:
    objs = {new: yaml.safe_load((capture / f"{old}.yaml").read_text()) for old, new in NAMES.items()}
    objs.update(derived(objs))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, obj in objs.items():
        (OUT / f"{name}.yaml").write_text(yaml.safe_dump(obj, sort_keys=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
