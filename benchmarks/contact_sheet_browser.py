"""A job's contact sheet in headless Chromium: time to the first page, paging forward, a screenshot.

Drives a real Chromium over the DevTools protocol (websocket-client, which the kubernetes client
already brings). Prints one JSON line per step and writes PNG screenshots.

    python benchmarks/contact_sheet_browser.py OUTPUT_DIR [--http] [--screenshot page2.png]

OUTPUT_DIR is a finished job's output (index.html, manifest.jsonl). --http serves it over HTTP
(needed for the webdataset layout, whose images are read out of tars by byte range) with Python's
http.server plus Range support, or without it (--no-range), instead of file://.
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

# The page is shown when the grid holds page N and every image in the viewport has decoded.
SHOWN = """(() => {
  const grid = document.getElementById("grid");
  if (!grid || document.body.dataset.shown !== "%d") return null;
  const imgs = [...grid.querySelectorAll("img")].filter(i => i.getBoundingClientRect().top < innerHeight);
  if (!imgs.length || !imgs.every(i => i.complete && i.naturalWidth > 0)) return null;
  // The smooth/crisp choice is made a frame after each image loads: wait for it to settle.
  if (!imgs.every(i => i.classList.contains("upscaled") === (i.naturalWidth < i.clientWidth))) return null;
  return {figures: grid.children.length, visible_images: imgs.length,
          first_id: grid.querySelector(".meta").textContent.split(" ")[0],
          label: document.getElementById("page").textContent,
          image_rendering: getComputedStyle(imgs[0]).imageRendering,
          image_px: imgs[0].naturalWidth, tile_px: Math.round(imgs[0].clientWidth)};
})()"""


class Browser:
    def __init__(self, chromium: str, width: int = 1280, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="cdp-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--allow-file-access-from-files",
                f"--remote-debugging-port={port}",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    page = next(t for t in json.load(r) if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self.ids = itertools.count(1)
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    def eval(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    def wait(self, expr: str, timeout: float = 60) -> tuple[Any, float]:
        t0 = time.perf_counter()
        while True:
            value = self.eval(expr)
            if value:
                return value, time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"not true after {timeout}s: {expr[:80]}")
            time.sleep(0.02)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


class Handler(http.server.SimpleHTTPRequestHandler):
    """http.server plus single byte ranges (as S3 and every CDN serve them), and no request log."""

    range_support = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_head(self) -> Any:
        spec = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not (self.range_support and spec.startswith("bytes=") and path.is_file()):
            return super().send_head()
        first, _, last = spec[6:].partition("-")
        size = path.stat().st_size
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
        f = path.open("rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(f.read(end - start + 1))


def serve(root: Path, ranges: bool = True) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = type("H", (Handler,), {"range_support": ranges})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/index.html"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("output", type=Path)
    ap.add_argument("--http", action="store_true")
    ap.add_argument("--no-range", action="store_true", help="with --http: a server that ignores Range")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--screenshot", type=Path, help="PNG of page 2 after paging forward")
    args = ap.parse_args()
    root = args.output.resolve()
    images = sum(1 for _ in (root / "manifest.jsonl").open())
    server = None
    if args.http:
        server, url = serve(root, ranges=not args.no_range)
    else:
        url = (root / "index.html").as_uri()
    b = Browser(args.chromium)
    common = {
        "images": images,
        "url_scheme": url.split(":")[0],
        "index_html_kib": round(os.path.getsize(root / "index.html") / 1024, 1),
        # Seconds on a shared machine mean little without its load (2 cores here).
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    try:
        t0 = time.perf_counter()
        b.call("Page.navigate", url=url)
        first, _ = b.wait(SHOWN % 1)
        print(
            json.dumps(
                {"step": "first_page", "seconds": round(time.perf_counter() - t0, 3), **first, **common}
            )
        )
        t0 = time.perf_counter()
        b.eval('document.getElementById("next").click()')
        second, _ = b.wait(SHOWN % 2)
        print(
            json.dumps(
                {"step": "next_page", "seconds": round(time.perf_counter() - t0, 3), **second, **common}
            )
        )
        if args.screenshot:
            b.screenshot(args.screenshot)
        pages = int(b.eval("IB.pages"))
        t0 = time.perf_counter()
        b.eval('document.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight"}))')
        third, _ = b.wait(SHOWN % 3)
        print(
            json.dumps(
                {"step": "arrow_key_page", "seconds": round(time.perf_counter() - t0, 3), **third, **common}
            )
        )
        t0 = time.perf_counter()
        b.call("Page.navigate", url="about:blank")  # a fresh load, straight onto the last page
        b.call("Page.navigate", url=f"{url}#page={pages}")
        last, _ = b.wait(SHOWN % pages)
        print(
            json.dumps(
                {"step": "last_page_by_url", "seconds": round(time.perf_counter() - t0, 3), **last, **common}
            )
        )
    finally:
        b.close()
        if server is not None:
            server.shutdown()


if __name__ == "__main__":
    main()
