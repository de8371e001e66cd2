"""index.html: a contact sheet of the images with their prompts and seeds, page by page.

The first page is plain HTML inside index.html, so it shows at once (and without JavaScript);
each further page is a small script, `contact/page-NNNNN.js`, loaded by a <script> tag when the
user pages to it. Script tags (unlike fetch) also work when index.html is opened from disk.

With the webdataset layout the images sit inside shard tars: the page reads each image's byte
range (offset and size from the manifest) with an HTTP Range request, or slices the whole tar
when the server ignores Range. That needs the folder served over HTTP (`python -m http.server`).
"""

from __future__ import annotations

import html
import json
from typing import Any

PAGE_SIZE = 200
PAGES = "contact"


SCRIPT = f"{PAGES}/sheet.js"


def page_key(page: int) -> str:
    return f"{PAGES}/page-{page:05d}.js"


def _row(line: dict[str, Any]) -> list[Any]:
    # The seed as a string: 63-bit seeds do not survive JavaScript's doubles.
    row = [line["key"], line["prompt"], line["id"], str(line["seed"])]
    if "offset" in line:
        row += [line["member"], line["offset"], line["size"]]
    return row


def _script_json(value: Any) -> str:
    # Inside <script>, "</script>" in a prompt would end the script: escape every "<".
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def _figure(row: list[Any]) -> str:
    key, prompt, iid, seed = row[:4]
    if len(row) > 4:  # inside a tar: the script fills in the image
        img = f'<img alt="{html.escape(prompt[:100])}" data-tar="{html.escape(key)}" data-off="{row[5]}" data-size="{row[6]}" data-name="{html.escape(row[4])}">'
        href = html.escape(key)
    else:
        img = f'<img loading="lazy" src="{html.escape(key)}" alt="{html.escape(prompt[:100])}">'
        href = html.escape(key)
    return (
        f'<figure><a href="{href}">{img}</a><figcaption>{html.escape(prompt)}<br>'
        f'<span class="meta">{html.escape(iid)} · seed {seed}</span></figcaption></figure>\n'
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }
img { width: 100%; aspect-ratio: 1; object-fit: contain; border-radius: 4px; background: #eee; }
/* Smooth scaling for real images; crisp pixels only for images smaller than their tile. */
img.upscaled { image-rendering: pixelated; }
figcaption { font-size: 12px; color: #333; overflow-wrap: anywhere; }
.meta { color: #777; }
nav { margin: 1rem 0; display: flex; gap: .5rem; align-items: center; }
"""

# Paging and tar reads; `ibPage` is what each page script calls.
_SCRIPT = r"""
const IB = JSON.parse(document.getElementById("ib-data").textContent);
const pages = {1: IB.first};
const tars = {};
const grid = document.getElementById("grid"), label = document.getElementById("page");
let current = 1;
function esc(s) { const d = document.createElement("div"); d.textContent = String(s); return d.innerHTML; }
function figure(r) {
  const img = r.length > 4
    ? `<img alt="${esc(r[1].slice(0, 100))}" data-tar="${esc(r[0])}" data-off="${r[5]}" data-size="${r[6]}" data-name="${esc(r[4])}">`
    : `<img loading="lazy" src="${esc(r[0])}" alt="${esc(r[1].slice(0, 100))}">`;
  return `<figure><a href="${esc(r[0])}">${img}</a><figcaption>${esc(r[1])}<br><span class="meta">${esc(r[2])} · seed ${r[3]}</span></figcaption></figure>`;
}
function mark(img) {
  // After layout (a frame later), so that the tile's width is known.
  const up = () => requestAnimationFrame(() =>
    img.classList.toggle("upscaled", img.naturalWidth > 0 && img.naturalWidth < img.clientWidth));
  if (img.complete) up(); else img.addEventListener("load", up, {once: true});
}
// Per tar: the first image's request finds out whether the server honours Range. If it does,
// every image is one small request; if not, the whole tar is fetched once and sliced.
const probes = {};
async function member(img) {
  const off = +img.dataset.off, size = +img.dataset.size, url = img.dataset.tar;
  const range = {headers: {Range: `bytes=${off}-${off + size - 1}`}};
  let buf;
  if (!(url in probes)) {
    probes[url] = fetch(url, range).then(async r => {
      if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
      const body = await r.arrayBuffer();
      return r.status === 206 ? {first: body} : {whole: body};
    });
    const p = await probes[url];
    buf = p.whole ? p.whole.slice(off, off + size) : p.first;
  } else {
    const p = await probes[url];
    if (p.whole) buf = p.whole.slice(off, off + size);
    else {
      const r = await fetch(url, range);
      buf = await r.arrayBuffer();
      if (r.status !== 206) buf = buf.slice(off, off + size);  // a cache or proxy that dropped Range
    }
  }
  const ext = img.dataset.name.split(".").pop();
  img.src = URL.createObjectURL(new Blob([buf], {type: ext === "jpg" ? "image/jpeg" : "image/" + ext}));
  mark(img);
}
function hydrate() {
  for (const img of grid.querySelectorAll("img")) {
    if (img.dataset.tar && !img.src) member(img).catch(() => { img.alt = "serve this folder over HTTP to see images inside tars"; });
    else mark(img);
  }
}
function show(n) {
  current = n;
  label.textContent = `page ${n} of ${IB.pages}`;
  document.getElementById("prev").disabled = n <= 1;
  document.getElementById("next").disabled = n >= IB.pages;
  if (n !== 1 || grid.dataset.page !== "1") grid.innerHTML = pages[n].map(figure).join("");
  grid.dataset.page = String(n);
  document.body.dataset.shown = String(n);
  hydrate();
}
window.ibPage = (n, rows) => { pages[n] = rows; if (n === want) show(n); };
let want = 1;
function go(n) {
  n = Math.min(Math.max(1, n), IB.pages);
  want = n;
  history.replaceState(null, "", `#page=${n}`);
  if (pages[n]) return show(n);
  const s = document.createElement("script");
  s.src = `${IB.dir}/page-${String(n).padStart(5, "0")}.js`;
  document.head.appendChild(s);
}
document.getElementById("prev").onclick = () => go(current - 1);
document.getElementById("next").onclick = () => go(current + 1);
document.addEventListener("keydown", e => { if (e.key === "ArrowRight") go(current + 1); if (e.key === "ArrowLeft") go(current - 1); });
const hashPage = () => { const m = location.hash.match(/page=(\d+)/); return m ? +m[1] : 1; };
addEventListener("hashchange", () => { if (hashPage() !== current) go(hashPage()); });
grid.dataset.page = "1";
show(1);
if (hashPage() !== 1) go(hashPage());
"""


def _index(title: str, first: list[list[Any]], total: int, pages: int, page_size: int) -> str:
    data = {"first": first, "pages": pages, "dir": PAGES, "total": total}
    summary = f"{total} images" + (f" on {pages} pages of {page_size}" if pages > 1 else "")
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<p>{summary}; "
        "manifest.jsonl and manifest.parquet list all</p>\n"
        '<nav><button id="prev">&larr; previous</button><span id="page">page 1 of '
        f'{pages}</span><button id="next">next &rarr;</button></nav>\n'
        '<div class="grid" id="grid">\n' + "".join(_figure(r) for r in first) + "</div>\n"
        f'<script type="application/json" id="ib-data">{_script_json(data)}</script>\n'
        f'<script src="{SCRIPT}"></script>\n</body></html>\n'
    )


class SheetWriter:
    """The contact sheet, line by line: a page's script as soon as the page is full, so a
    million-line manifest never sits in memory (only the first page, for index.html).

    `total`: the line count, known in advance (index.html, written last, says it)."""

    def __init__(self, title: str, total: int, page_size: int = PAGE_SIZE) -> None:
        self.title = title
        self.total = total
        self.page_size = page_size
        self.first: list[list[Any]] = []
        self.page: list[list[Any]] = []
        self.number = 1  # of the page being filled
        self.added = 0

    def add(self, line: dict[str, Any]) -> list[tuple[str, str]]:
        """The files (key, text) this line completes: none, or one page script."""
        row = _row(line)
        self.added += 1
        if self.number == 1:
            self.first.append(row)
            if len(self.first) == self.page_size:
                self.number = 2
            return []
        self.page.append(row)
        if len(self.page) < self.page_size:
            return []
        return [self._flush()]

    def _flush(self) -> tuple[str, str]:
        out = (page_key(self.number), f"ibPage({self.number},{_script_json(self.page)});\n")
        self.number += 1
        self.page = []
        return out

    def finish(self) -> list[tuple[str, str]]:
        """The last page, the script, and index.html last: its presence says every page is there."""
        if self.added != self.total:
            raise ValueError(f"contact sheet: {self.added} lines added, {self.total} announced")
        out = [self._flush()] if self.page else []
        pages = max(1, -(-self.total // self.page_size))
        return [
            *out,
            (SCRIPT, _SCRIPT),
            ("index.html", _index(self.title, self.first, self.total, pages, self.page_size)),
        ]


def render_pages(title: str, lines: list[dict[str, Any]], page_size: int = PAGE_SIZE) -> dict[str, str]:
    """index.html and the page scripts, by storage key."""
    sheet = SheetWriter(title, len(lines), page_size)
    out: dict[str, str] = {}
    for line in lines:
        out.update(sheet.add(line))
    out.update(sheet.finish())
    return out


def render(title: str, lines: list[dict[str, Any]]) -> str:
    """index.html alone (its first page); `render_pages` gives the further pages too."""
    return render_pages(title, lines)["index.html"]


def parse_manifest(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
