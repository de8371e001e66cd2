"""The node agent's pure helpers (no cluster needed)."""

from __future__ import annotations

import json
from pathlib import Path

from imagebatch_testing.pathmap import map_path
from imagebatch_testing.podenv import expand
from imagebatch_testing.podprocess import termination_message


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$(MISSING)", env) == "$(MISSING)"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("cost $5", env) == "cost $5"


def test_map_path_uses_the_longest_mount() -> None:
    env = {"IMAGEBATCH_PATH_MAP": json.dumps({"/data": "/tmp/pod/data", "/data/cache": "/tmp/cache"})}
    assert map_path("/data", env) == "/tmp/pod/data"
    assert map_path("/data/out/1.png", env) == "/tmp/pod/data/out/1.png"
    assert map_path("/data/cache/x", env) == "/tmp/cache/x"
    assert map_path("/database/x", env) == "/database/x"
    assert map_path("/etc/hosts", env) == "/etc/hosts"


def test_map_path_is_the_identity_outside_the_test_node() -> None:
    assert map_path("/data/x", {}) == "/data/x"


def test_termination_message_as_the_kubelet_reads_it(tmp_path: Path) -> None:
    spec = {"terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}
    msg, log = tmp_path / "msg", tmp_path / "log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "Traceback ...\nKeyError: 'x'\n")
    assert termination_message(spec, msg, log, 1) == ""  # no file, File policy: nothing
    fallback = {**spec, "terminationMessagePolicy": "FallbackToLogsOnError"}
    tail = termination_message(fallback, msg, log, 1)
    assert tail.endswith("KeyError: 'x'\n") and len(tail.splitlines()) == 80
    assert termination_message(fallback, msg, log, 0) == ""  # the logs only on an error
    msg.write_bytes(b"x" * 10 + b"spec.output.uri: " + b"y" * 5000)
    assert termination_message(fallback, msg, log, 2) == "y" * 4096  # the file's last 4096 bytes
    assert termination_message({}, msg, log, 2) == ""
