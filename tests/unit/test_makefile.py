"""`make help` lists every target of the Makefile with its one-line purpose."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_make_help_lists_every_target() -> None:
    makefile = (REPO / "Makefile").read_text()
    # Rules like `name: deps` (not variables `NAME := ...`, not the $(STAMP) file rule).
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", makefile, re.M))
    phony = set(" ".join(re.findall(r"^\.PHONY:((?:.*\\\n)*.*)$", makefile, re.M)).replace("\\", " ").split())
    assert targets == phony, "every target is .PHONY and every .PHONY name has a rule"
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.strip()}
    assert set(listed) == targets
    assert all(len(text) > 10 for text in listed.values()), listed
