"""What a running local cluster records in its state dir (state.json), for whoever stops it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from imagebatch_testing.processes import ProcessRecord

DEFAULT_NODE_NAME = "imagebatch-node"


def parse_pairs(text: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}."""
    return dict(item.strip().split("=", 1) for item in text.split(",") if "=" in item)


def default_state_dir() -> Path:
    return Path(os.environ.get("IMAGEBATCH_CLUSTER_DIR", "/tmp/imagebatch-cluster"))


# -- the cluster ------------------------------------------------------------------------------


@dataclass
class ClusterState:
    """What state.json records: enough for another process to stop the cluster and use it."""

    ports: dict[str, int] = field(default_factory=dict)
    processes: list[ProcessRecord] = field(default_factory=list)
    bin_dir: str = ""
    node_name: str = DEFAULT_NODE_NAME
    ready: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "ports": self.ports,
                "processes": [vars(p) for p in self.processes],
                "bin_dir": self.bin_dir,
                "node_name": self.node_name,
                "ready": self.ready,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        data = json.loads(text)
        return cls(
            ports={k: int(v) for k, v in data.get("ports", {}).items()},
            processes=[ProcessRecord(**p) for p in data.get("processes", [])],
            bin_dir=data.get("bin_dir", ""),
            node_name=data.get("node_name", DEFAULT_NODE_NAME),
            ready=bool(data.get("ready")),
        )
