"""Images as stored in every table: struct{bytes, format, width, height} (pipeline.schema.IMAGE)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be decoded; the message names the file or row."""


CHECKS = ("structure", "draft", "full")


def image_record(data: bytes, where: str = "", check: str = "structure") -> dict[str, Any]:
    """Validate encoded image bytes and describe them: {bytes, format, width, height}.

    check="structure": header, chunk CRCs (PNG) and end-of-image markers (JPEG EOI, PNG IEND), no pixel
    decoding; catches garbage, truncated and damaged-container files at ~20 µs an image.
    check="draft": also decode the pixels (JPEG at 1/8 scale), which catches corrupt entropy data.
    check="full": decode every pixel at full size.
    Raises ImageError, so corrupt files are quarantined at ingest instead of failing a GPU worker later.
    """
    if not data:
        raise ImageError(f"{where}: empty image file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
            width, height = im.size
            if check == "structure":
                im.verify()
                if fmt == "jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
                    raise ImageError(f"{where}: truncated JPEG (no end-of-image marker)")
            else:
                if check == "draft" and fmt == "jpeg":
                    im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                im.load()  # verify() misses damaged pixel data; load() decodes it
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{where}: not a readable image ({e})") from e
    if width <= 0 or height <= 0:
        raise ImageError(f"{where}: image has no pixels ({width}x{height})")
    return {"bytes": data, "format": fmt or "unknown", "width": width, "height": height}


def encode_pil(im: Image.Image, fmt: str = "png") -> dict[str, Any]:
    buf = io.BytesIO()
    im.save(buf, format=fmt.upper())
    return {"bytes": buf.getvalue(), "format": fmt.lower(), "width": im.width, "height": im.height}


def decode(record: dict[str, Any], mode: str = "RGB") -> Image.Image:
    """A PIL image from a stored image struct."""
    im = Image.open(io.BytesIO(record["bytes"]))
    return im.convert(mode) if mode else im


def data_uri(record: dict[str, Any]) -> str:
    """`data:image/<fmt>;base64,...` for OpenAI-compatible `image_url` parts."""
    import base64

    fmt = {"jpg": "jpeg"}.get(record["format"], record["format"])
    return f"data:image/{fmt};base64," + base64.b64encode(record["bytes"]).decode()
