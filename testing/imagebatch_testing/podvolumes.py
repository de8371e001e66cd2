"""A pod's volumes laid out as local folders (the node agent cannot bind-mount anything).

emptyDir, hostPath, configMap, secret, downwardAPI and projected (with serviceAccountToken).
Config maps, secrets and tokens come through callables, so this module never talks to the API.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagebatch_testing.podenv import ConfigError, Lookup, field_value

JSON = dict[str, Any]
# (audience or None, expirationSeconds) -> a ServiceAccount token for the pod.
TokenSource = Callable[[str | None, int], str]


def write_items(folder: Path, data: dict[str, bytes], items: list[JSON] | None) -> None:
    """A config map's or secret's keys as files: all of them, or only `items` at their paths."""
    if not items:
        for key, value in data.items():
            (folder / key).write_bytes(value)
        return
    for item in items:
        if item["key"] in data:
            target = folder / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[item["key"]])
        elif not item.get("optional", False):
            raise ConfigError(f"key {item['key']!r} not found")


def write_downward_api(folder: Path, pod: JSON, items: list[JSON]) -> None:
    for item in items:
        if "fieldRef" in item:
            target = folder / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(field_value(pod, item["fieldRef"]["fieldPath"]))


def write_projected(
    folder: Path, pod: JSON, sources: list[JSON], lookup: Lookup, token: TokenSource
) -> str | None:
    """A projected volume's sources; returns the token without an audience (the API's own), if any."""
    api_token: str | None = None
    for source in sources:
        if "serviceAccountToken" in source:
            src = source["serviceAccountToken"]
            value = token(src.get("audience"), int(src.get("expirationSeconds") or 3607))
            (folder / src["path"]).write_text(value)
            if not src.get("audience"):
                api_token = value
        elif "configMap" in source:
            src = source["configMap"]
            write_items(
                folder, lookup("configmaps", src["name"], bool(src.get("optional"))), src.get("items")
            )
        elif "secret" in source:
            src = source["secret"]
            write_items(folder, lookup("secrets", src["name"], bool(src.get("optional"))), src.get("items"))
        elif "downwardAPI" in source:
            write_downward_api(folder, pod, source["downwardAPI"].get("items") or [])
    return api_token


def host_path(volume: JSON) -> str:
    host = Path(volume["hostPath"]["path"])
    if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, "") and not host.exists():
        with contextlib.suppress(OSError):
            host.mkdir(parents=True, exist_ok=True)
    return str(host)


def lay_out_volumes(
    pod: JSON, volumes_dir: Path, lookup: Lookup, token: TokenSource
) -> tuple[dict[str, str], str | None]:
    """({volume name: local folder}, the pod's API token if a projected volume asked for one)."""
    folders: dict[str, str] = {}
    api_token: str | None = None
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        if "hostPath" in volume:
            folders[name] = host_path(volume)
            continue
        folder = volumes_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        folders[name] = str(folder)
        if "configMap" in volume:
            src = volume["configMap"]
            write_items(
                folder, lookup("configmaps", src["name"], bool(src.get("optional"))), src.get("items")
            )
        elif "secret" in volume:
            src = volume["secret"]
            data = lookup("secrets", src["secretName"], bool(src.get("optional")))
            write_items(folder, data, src.get("items"))
        elif "downwardAPI" in volume:
            write_downward_api(folder, pod, volume["downwardAPI"].get("items") or [])
        elif "projected" in volume:
            found = write_projected(folder, pod, volume["projected"].get("sources") or [], lookup, token)
            api_token = found or api_token
        # emptyDir and anything else: an empty folder of the pod.
    return folders, api_token


def pod_kubeconfig(server: str, ca_pem: bytes, token: str, namespace: str) -> JSON:
    """The kubeconfig a pod's client finds in KUBECONFIG: its ServiceAccount token, the cluster CA."""
    ca_data = base64.b64encode(ca_pem).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "cluster", "cluster": {"server": server, "certificate-authority-data": ca_data}}
        ],
        "users": [{"name": "pod", "user": {"token": token}}],
        "contexts": [
            {"name": "pod", "context": {"cluster": "cluster", "user": "pod", "namespace": namespace}}
        ],
        "current-context": "pod",
    }
