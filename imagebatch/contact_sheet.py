"""index.html: a contact sheet of the images with their prompts and seeds."""

from __future__ import annotations

import html
import json
from typing import Any

MAX_TILES = 2000  # a browser page with a million <img> tags helps nobody

_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }}
figure {{ margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }}
img {{ width: 100%; image-rendering: pixelated; border-radius: 4px; }}
figcaption {{ font-size: 12px; color: #333; overflow-wrap: anywhere; }}
.meta {{ color: #777; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
<div class="grid">
"""


def render(title: str, lines: list[dict[str, Any]]) -> str:
    shown = lines[:MAX_TILES]
    summary = f"{len(lines)} images" + (
        f"; the first {MAX_TILES} are shown, manifest.jsonl lists all" if len(lines) > MAX_TILES else ""
    )
    parts = [_HEAD.format(title=html.escape(title), summary=summary)]
    for line in shown:
        parts.append(
            '<figure><a href="{key}"><img loading="lazy" src="{key}" alt="{alt}"></a>'
            '<figcaption>{prompt}<br><span class="meta">{id} · seed {seed}</span></figcaption></figure>\n'.format(
                key=html.escape(line["key"]),
                alt=html.escape(line["prompt"][:100]),
                prompt=html.escape(line["prompt"]),
                id=html.escape(line["id"]),
                seed=line["seed"],
            )
        )
    parts.append("</div></body></html>\n")
    return "".join(parts)


def parse_manifest(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
