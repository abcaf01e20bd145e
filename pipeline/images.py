"""Images as stored in every table: struct{bytes, format, width, height} (pipeline.schema.IMAGE)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be decoded; the message names the file or row."""


def image_record(data: bytes, where: str = "") -> dict[str, Any]:
    """Validate encoded image bytes fully (decode every pixel) and describe them.

    Raises ImageError for empty, truncated or non-image data, so corrupt files are quarantined at
    ingest instead of failing a GPU worker later.
    """
    if not data:
        raise ImageError(f"{where}: empty image file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
            im.load()  # verify() misses truncated pixel data; load() decodes it
            width, height = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{where}: not a readable image ({e})") from e
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
