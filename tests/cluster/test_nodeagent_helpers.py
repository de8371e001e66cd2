"""The node agent's pure helpers (no cluster needed)."""

from __future__ import annotations

import json

from imagebatch_testing.pathmap import map_path
from imagebatch_testing.podenv import expand


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
