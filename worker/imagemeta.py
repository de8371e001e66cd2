"""How an image was made, carried inside the image file so any viewer shows its prompt and seed.

PNG: a `parameters` text chunk in the form AUTOMATIC1111 writes (which A1111, ComfyUI, InvokeAI
and most image tools read) and an `imagebatch` chunk holding the manifest line as JSON. WebP and
JPEG have no text chunks: the same two strings go into XMP (dc:description and an imagebatch
attribute) and the A1111 string into EXIF UserComment, where A1111 itself puts it.
"""

from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from imagebatch.manifest import parameters_text

PARAMETERS = "parameters"
MANIFEST_KEY = "imagebatch"
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
# EXIF UserComment starts with an 8-byte character code; A1111 writes UNICODE (UTF-16).
_UNICODE = b"UNICODE\0"


def _xmp(parameters: str, line_json: str) -> bytes:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'xmlns:imagebatch="https://imagebatch.dev/ns/1.0/" imagebatch:manifest={quoteattr(line_json)}>'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{escape(parameters)}</rdf:li></rdf:Alt>'
        "</dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()


def save_options(fmt: str, line: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for PIL's `Image.save` that embed `line` in an image of `fmt`."""
    parameters = parameters_text(line)
    line_json = json.dumps(line, ensure_ascii=False, sort_keys=True)
    if fmt == "png":
        info = PngInfo()
        info.add_text(PARAMETERS, parameters)  # iTXt (UTF-8) when the text is not Latin-1
        info.add_text(MANIFEST_KEY, line_json)
        return {"pnginfo": info}
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = _UNICODE + parameters.encode("utf-16-be")
    return {"exif": exif.tobytes(), "xmp": _xmp(parameters, line_json)}


def read_user_comment(raw: bytes) -> str:
    """Decodes an EXIF UserComment by its character code."""
    code, body = raw[:8], raw[8:]
    if code == _UNICODE:
        return body.decode("utf-16-be")
    return body.decode("utf-8", errors="replace").rstrip("\0")
