"""imagebatch: images in bulk from text prompts, on one machine or on Kubernetes."""

from __future__ import annotations

from typing import Any

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    # Lazy: the Kubernetes client is imported only by those who use the Python API.
    if name == "Client":
        from imagebatch.client import Client

        return Client
    raise AttributeError(f"module 'imagebatch' has no attribute {name!r}")
