"""Images as stored in every table: struct{bytes, format, width, height} (pipeline.schema.IMAGE)."""

from __future__ import annotations

import io
import re
from typing import Any

from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be decoded; the message names the file or row."""


CHECKS = ("structure", "draft", "full")


def image_record(data: bytes, where: str = "", check: str = "structure") -> dict[str, Any]:
    """Validate encoded image bytes and describe them: {bytes, format, width, height}.

    check="structure": header, chunk CRCs (PNG) and end-of-image markers (JPEG EOI, PNG IEND), no pixel
    decoding; catches garbage, truncated and damaged-container files at ~20 µs an image (~3 µs for a
    plain JPEG header, walked here instead of by PIL: _plain_jpeg_size).
    check="draft": also decode the pixels (JPEG at 1/8 scale), which catches corrupt entropy data.
    check="full": decode every pixel at full size.
    Raises ImageError, so corrupt files are quarantined at ingest instead of failing a GPU worker later.
    """
    if not data:
        raise ImageError(f"{where}: empty image file")
    size = _plain_jpeg_size(data) if check == "structure" else None
    if size is not None:
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise ImageError(f"{where}: truncated JPEG (no end-of-image marker)")
        return {"bytes": data, "format": "jpeg", "width": size[0], "height": size[1]}
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
        # PIL names the in-memory buffer (`<_io.BytesIO object at 0x...>`): say what it is instead
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)).strip() or type(e).__name__
        raise ImageError(f"{where}: not a readable image ({detail})") from e
    if width <= 0 or height <= 0:
        raise ImageError(f"{where}: image has no pixels ({width}x{height})")
    return {"bytes": data, "format": fmt or "unknown", "width": width, "height": height}


# Markers whose segments PIL's JPEG reader only stores or skips (JpegImagePlugin.MARKER): APP0, APP3..12,
# APP15, COM, DHT, DAC, DNL, DRI, EXP. APP1/2/13/14 are parsed (EXIF, ICC, MPO, Photoshop, Adobe).
_JPEG_STORED = frozenset({0xE0, *range(0xE3, 0xED), 0xEF, 0xFE, 0xC4, 0xCC, 0xDC, 0xDD, 0xDF})
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE})


def _plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a plainly laid-out JPEG header, read the way PIL reads it, or None.

    The header walk of PIL's JPEG plugin is pure Python and most of the structure check's cost. This
    accepts only headers that PIL accepts the same way: back-to-back marker segments of the kinds PIL
    stores or skips, valid quantisation tables, an 8-bit 1/3/4-component frame and a complete
    start-of-scan header, below PIL's decompression-bomb limit. Anything else (fill bytes, junk, EXIF,
    ICC, MPO, odd lengths, truncation) returns None and goes to PIL, so nothing PIL rejects passes here.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    end = len(data)
    pos = 2  # PIL consumes FF D8 and re-reads the third byte (FF) as the first marker's prefix
    size = None
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = (data[pos + 2] << 8) | data[pos + 3]
        seg, nxt = pos + 4, pos + 2 + length
        if length < 2 or nxt > end:
            return None
        if marker == 0xDA:  # start of scan: PIL stops reading the header here
            if size is None or min(size) <= 0:
                return None
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and size[0] * size[1] > limit:
                return None  # PIL warns or raises (DecompressionBombError): let it
            return size
        if marker in _JPEG_SOF:
            # PIL reads bits, height, width, layers, then 3 bytes per component
            if length < 8 or (length - 8) % 3 or data[seg] != 8 or data[seg + 5] not in (1, 3, 4):
                return None
            size = ((data[seg + 3] << 8) | data[seg + 4], (data[seg + 1] << 8) | data[seg + 2])
        elif marker == 0xDB:  # DQT: one or more tables of 1 + 64 or 1 + 128 bytes
            q = seg
            while q < nxt:
                q += 65 if data[q] < 16 else 129
            if q != nxt:
                return None
        elif marker == 0xE0:
            if data.startswith(b"JFIF", seg, nxt) and length < 9:
                return None  # PIL reads the JFIF version at offset 5
        elif marker not in _JPEG_STORED:
            return None
        pos = nxt
    return None


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
