"""API calls give up on a server that never answers, instead of stalling the loop that made them."""

from __future__ import annotations

import socket
import threading
import time

import kubernetes
import pytest
import urllib3

from imagebatch import kubeclient


def test_a_silent_server_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubeclient, "REQUEST_TIMEOUT", (1.0, 1.0))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()

    cfg = kubernetes.client.Configuration()
    cfg.host = f"http://127.0.0.1:{server.getsockname()[1]}"
    client = kubeclient.TimeoutApiClient(cfg)
    t0 = time.monotonic()
    with pytest.raises(urllib3.exceptions.HTTPError):  # a read timeout, after urllib3's retries
        kubernetes.client.CoreV1Api(client).list_namespace(_preload_content=False)
    assert time.monotonic() - t0 < 10
    assert accepted, "the request never reached the server"
    server.close()
