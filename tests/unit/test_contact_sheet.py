"""The contact sheet's pages: the first inside index.html, the others as scripts; both layouts."""

from __future__ import annotations

import json
from typing import Any

from imagebatch.contact_sheet import SCRIPT, page_key, render_pages


def lines(n: int, tar: bool = False) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        line: dict[str, Any] = {
            "id": f"p{i:07d}",
            "prompt": f"prompt {i}",
            "seed": i,
            "key": f"images/p{i:07d}.png",
        }
        if tar:
            line.update(
                key=f"shards/s{i // 10:05d}.tar", member=f"p{i:07d}.png", offset=512 * (i % 10), size=100
            )
        out.append(line)
    return out


def test_pages_split_the_manifest_and_the_first_is_plain_html() -> None:
    pages = render_pages("job", lines(450), page_size=200)
    assert sorted(pages) == sorted(["index.html", SCRIPT, page_key(2), page_key(3)])
    index = pages["index.html"]
    assert index.count("<img") == 200 and "prompt 199" in index and "prompt 200" not in index
    assert "450 images on 3 pages of 200" in index and "page 1 of 3" in index
    body = pages[page_key(3)]
    assert body.startswith("ibPage(3,") and body.rstrip().endswith(");")
    rows = json.loads(body[len("ibPage(3,") : -3])
    assert [r[2] for r in rows] == [f"p{i:07d}" for i in range(400, 450)]


def test_one_page_job_has_no_page_scripts() -> None:
    assert sorted(render_pages("job", lines(5))) == ["contact/sheet.js", "index.html"]


def test_webdataset_rows_carry_the_byte_range_in_the_tar() -> None:
    pages = render_pages("job", lines(30, tar=True), page_size=10)
    assert (
        'data-tar="shards/s00000.tar" data-off="1024" data-size="100" data-name="p0000002.png"'
        in pages["index.html"]
    )
    rows = json.loads(pages[page_key(2)][len("ibPage(2,") : -3])
    assert rows[0] == ["shards/s00001.tar", "prompt 10", "p0000010", "10", "p0000010.png", 0, 100]


def test_seeds_are_exact_on_every_page() -> None:
    big = [{"id": f"p{i}", "prompt": "x", "seed": 2**63 - 1 - i, "key": f"images/p{i}.png"} for i in range(2)]
    pages = render_pages("job", big, page_size=1)
    assert f"seed {2**63 - 1}" in pages["index.html"]
    assert f'"{2**63 - 2}"' in pages[page_key(2)]  # a string: a JavaScript number would round it


def test_prompts_cannot_break_out_of_the_page() -> None:
    evil = [{"id": "x", "prompt": "</script><script>alert(1)</script>", "seed": 1, "key": "images/x.png"}]
    pages = render_pages("job", evil * 3, page_size=1)
    assert "</script><script>alert" not in pages["index.html"] and "&lt;/script&gt;" in pages["index.html"]
    assert "</script>" not in pages[page_key(2)]


def test_downscaled_images_are_smooth() -> None:
    index = render_pages("job", lines(1))["index.html"]
    # Only images smaller than their tile (the script sets the class) get crisp pixels.
    assert "img.upscaled { image-rendering: pixelated; }" in index
    assert "img {" in index and "pixelated" not in index.split("img {", 1)[1].split("}", 1)[0]
