"""Where a pod's volume mounts live when the node agent runs the pod as a local process.

The test node agent (imagebatch_testing.nodeagent) cannot bind-mount volumes, so it tells each
container where every volumeMount's folder really is through the environment variable
IMAGEBATCH_PATH_MAP: a JSON object {mountPath: local folder}. Code that reads or writes files
under a mount path passes the path through `map_path` first; outside the test node (no
IMAGEBATCH_PATH_MAP) `map_path` returns the path unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

ENV_VAR = "IMAGEBATCH_PATH_MAP"


def path_map(env: Mapping[str, str] | None = None) -> dict[str, str]:
    raw = (os.environ if env is None else env).get(ENV_VAR)
    if not raw:
        return {}
    decoded = json.loads(raw)
    if not isinstance(decoded, dict):
        raise ValueError(f"{ENV_VAR} must be a JSON object")
    return {str(k): str(v) for k, v in decoded.items()}


def map_path(path: str, env: Mapping[str, str] | None = None) -> str:
    """The local path for `path`, rewritten by the longest mount path that contains it."""
    mapping = path_map(env)
    norm = os.path.normpath(path)
    best = ""
    for mount in mapping:
        mount_norm = os.path.normpath(mount)
        if (norm == mount_norm or norm.startswith(mount_norm.rstrip("/") + "/")) and len(mount_norm) > len(
            best
        ):
            best = mount_norm
    if not best:
        return path
    target = {os.path.normpath(k): v for k, v in mapping.items()}[best]
    rest = norm[len(best) :].lstrip("/")
    return os.path.join(target, rest) if rest else target
