"""Local checks of input images before upload, and the ``auto_resize`` re-encoder.

Both functions are synchronous and pure apart from reading the stream they are
given; the client runs them in a worker thread.

:func:`check_image` never decodes pixels.  It reads the first bytes (format and
dimensions), the last bytes (is the file complete?) and lets Pillow parse the
header for the colour mode and frame count.

The dimensions are read from the header *before* Pillow sees the file.  Pillow's
own decompression-bomb guard in ``Image.open`` reports through the ``warnings``
module, whose filters are process-global and cannot be changed safely from
worker threads; and Pillow's WebP reader allocates the whole canvas as soon as
it opens a file.  Refusing oversized images first means neither ever happens:
the readers are called directly (not through ``Image.open``) on files already
known to be at most 2048x2048.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, BinaryIO

from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from ._config import MAX_IMAGE_BYTES, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from ._errors import InvalidImageError
from ._imageformat import (
    HEAD_BYTES,
    describe_other_format,
    find_damage,
    format_name,
    header_dims,
    read_at,
    sniff_format,
)

__all__ = [
    "ALLOWED_FORMATS",
    "MIN_IMAGE_SIDE",
    "ImageInfo",
    "check_image",
    "fit_image",
    "to_8bit",
]

#: Formats the API accepts, as Pillow names them.
ALLOWED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP"})

#: Pillow modes the API takes as they are (8 bits per channel).
_SENDABLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
_MODE_NAMES = {
    "CMYK": "CMYK",
    "I;16": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16N": "16-bit grayscale",
    "I": "16/32-bit integer grayscale",
    "F": "32-bit float grayscale",
}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


#: fit_image decodes at most this many pixels (about 270 MB as RGBA); JPEGs are
#: first decoded at 1/2, 1/4 or 1/8 scale, so only their reduced size counts.
_MAX_DECODE_PIXELS = 64 * 1024 * 1024
#: JPEG scaled decoding stops at twice the target size; LANCZOS does the rest.
_DRAFT_GAP = 2
_JPEG_QUALITIES = (95, 85, 75)
_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

#: Pillow's readers, called directly so Image.open's bomb warning never fires
#: (see the module docstring).  The plain JPEG reader, not Image.open's
#: jpeg_factory: a multi-picture JPEG (phones add previews and depth maps) is
#: then read as its first picture, as the server reads it, not as an MPO
#: "animation", and a malformed MP header is not a warning.
_READERS: dict[str, Callable[[IO[bytes]], ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}

# What Pillow raises for a file it cannot parse (ImageFile wraps most as
# SyntaxError).  Warning too: Pillow warns about some malformed files ("Invalid
# APNG"), and where warnings are errors (python -W error) that must still end
# as an InvalidImageError.
_PARSE_ERRORS = (
    OSError, ValueError, EOFError, SyntaxError, IndexError, TypeError, KeyError,
    struct.error, Image.DecompressionBombError, Warning,
)

_FIX_CONVERT = "Convert it to PNG, JPEG or WebP."
_FIX_RESAVE = "Get a complete copy of the file, or re-save it with an image editor."
_FIX_REWRITE = "Re-save it as PNG, JPEG or WebP with an image editor."
_FIX_RESIZE = "Resize it, or pass auto_resize=True to downsize it automatically."


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`check_image` learned about a valid input image.

    Attributes:
        format: ``"PNG"``, ``"JPEG"`` or ``"WEBP"``.
        width: Width in pixels, as stored (before any EXIF rotation).
        height: Height in pixels, as stored.
        size: File size in bytes.
        mode: Pillow's mode, e.g. ``"RGB"``.
    """

    format: str
    width: int
    height: int
    size: int
    mode: str


@dataclass(frozen=True)
class _Input:
    """Which input is checked, for error messages."""

    name: str
    source: str

    def error(self, rule: str, problem: str, fix: str) -> InvalidImageError:
        """The error for a broken rule: names the input, the problem and the fix."""
        message = f"{self.name} ({self.source}): {problem} [rule {rule}]. {fix}"
        return InvalidImageError(message, input_name=self.name, source=self.source, rule=rule)


def check_image(stream: BinaryIO, *, size: int, input_name: str, source: str) -> ImageInfo:
    """Validate an input image from its header and file structure, without decoding pixels.

    Args:
        stream: A seekable binary stream positioned at the image's start; it is
            positioned there again on return.
        size: The image's size in bytes (from the start position).
        input_name: ``"face_image"`` or ``"image"``.
        source: A description of the input for messages (a path, ``"bytes (12 bytes)"``).

    Returns:
        The image's format, dimensions, size and mode.

    Raises:
        InvalidImageError: With ``rule`` one of ``empty``, ``max_size``, ``format``,
            ``max_resolution``, ``animated``, ``min_resolution``, ``truncated``,
            ``color_mode``.
    """
    where = _Input(input_name, source)
    _check_file_size(where, size)
    start = stream.tell()
    try:
        return _check_content(stream, start, size, where)
    finally:
        stream.seek(start)


def fit_image(stream: BinaryIO, *, input_name: str, source: str) -> tuple[bytes, ImageInfo]:
    """Re-encode an image so the API takes it (for ``auto_resize=True``).

    Decodes it, applies its EXIF orientation, converts it to 8-bit RGB (RGBA when
    a PNG or WebP has transparency), downsizes it with LANCZOS to fit within
    2048x2048 keeping its aspect ratio, and encodes it again: JPEG quality 95 for
    a JPEG input, else PNG (fast compression); falls back to JPEG at lower
    qualities if the result would exceed 30 MB.  Never enlarges an image.

    Args:
        stream: A seekable binary stream positioned at the image's start (read
            to its end); it is positioned there again on return.
        input_name: ``"face_image"`` or ``"image"``.
        source: A description of the input for messages.

    Returns:
        The new file's bytes and its :class:`ImageInfo` (it passes :func:`check_image`).

    Raises:
        InvalidImageError: The input is not a still PNG, JPEG or WebP, cannot be
            decoded, is too large to decode safely, or is too small or too
            narrow to fit the limits.
    """
    where = _Input(input_name, source)
    start = stream.tell()
    try:
        size = stream.seek(0, io.SEEK_END) - start
        data = _fit(stream, start, size, where)
    finally:
        stream.seek(start)
    return data, check_image(io.BytesIO(data), size=len(data), input_name=input_name, source=source)


# -- check_image's steps ----------------------------------------------------------------


def _check_content(stream: BinaryIO, start: int, size: int, where: _Input) -> ImageInfo:
    """The checks that read the file, cheapest first."""
    fmt, damage, dims = _inspect(stream, start, size, where)
    _check_max_resolution(where, dims)
    with _open(stream, start, size, fmt, damage, where) as im:
        _check_max_resolution(where, im.size)  # in case Pillow reads another size
        _check_frames(where, fmt, im)
        _check_min_resolution(where, im.size)
        if damage:
            raise _damaged(where, fmt, damage)
        _check_mode(where, im.mode)
        return ImageInfo(format=fmt, width=im.width, height=im.height, size=size, mode=im.mode)


def _inspect(
    stream: BinaryIO, start: int, size: int, where: _Input
) -> tuple[str, str | None, tuple[int, int]]:
    """Format, tail damage (or None) and dimensions, from the file's first and last bytes."""
    head = read_at(stream, start, HEAD_BYTES)
    fmt = sniff_format(head)
    if fmt is None:
        raise where.error("format", describe_other_format(head), _FIX_CONVERT)
    damage = find_damage(fmt, stream, start, size, head)
    dims = header_dims(fmt, stream, start, size, head)
    if dims is None:
        raise _unreadable(where, fmt, damage, "its header cannot be parsed")
    return fmt, damage, dims


def _check_not_empty(where: _Input, size: int) -> None:
    """Rule ``empty``."""
    if size <= 0:
        raise where.error("empty", "the file is empty (0 bytes)",
                          "Pass a PNG, JPEG or WebP image that is not empty.")


def _check_file_size(where: _Input, size: int) -> None:
    """Rules ``empty`` and ``max_size``: decided from the size alone, before any read."""
    _check_not_empty(where, size)
    if size > MAX_IMAGE_BYTES:
        raise where.error(
            "max_size",
            f"{size} bytes ({size / 2**20:.1f} MiB) exceeds the API's limit of "
            f"{MAX_IMAGE_BYTES} bytes ({MAX_IMAGE_BYTES // 2**20} MiB)",
            "Save it smaller (e.g. as JPEG or at a lower resolution), "
            "or pass auto_resize=True to re-encode it automatically.",
        )


def _check_max_resolution(where: _Input, dims: tuple[int, int]) -> None:
    """Rule ``max_resolution``: neither side over 2048 pixels."""
    width, height = dims
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise where.error(
            "max_resolution",
            f"{width}x{height} pixels exceeds the API's limit of {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}",
            _FIX_RESIZE,
        )


def _check_min_resolution(where: _Input, dims: tuple[int, int]) -> None:
    """Rule ``min_resolution``: neither side under 16 pixels."""
    width, height = dims
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise where.error(
            "min_resolution",
            f"{width}x{height} pixels is below the minimum of {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}",
            "Use a larger image; a face needs far more pixels than that to be found.",
        )


def _check_frames(where: _Input, fmt: str, im: ImageFile.ImageFile) -> None:
    """Rule ``animated``: one frame only."""
    frames = int(getattr(im, "n_frames", 1))
    if frames > 1:
        raise where.error(
            "animated",
            f"it is an animated {format_name(fmt)} with {frames} frames; "
            "the API takes a single still image",
            "Save a single frame of it as PNG, JPEG or WebP.",
        )


def _check_mode(where: _Input, mode: str) -> None:
    """Rule ``color_mode``: 8-bit grayscale, palette, RGB or RGBA only."""
    if mode not in _SENDABLE_MODES:
        name = _MODE_NAMES.get(mode, mode)
        described = name if name == mode else f"{name} (Pillow mode {mode})"
        raise where.error(
            "color_mode",
            f"its color mode is {described}, which the API cannot take as it is",
            "Convert it to 8-bit RGB, or pass auto_resize=True which converts it.",
        )


def _damaged(where: _Input, fmt: str, damage: str) -> InvalidImageError:
    """The ``truncated`` error."""
    return where.error(
        "truncated", f"the {format_name(fmt)} file is incomplete or damaged: {damage}", _FIX_RESAVE
    )


def _unreadable(where: _Input, fmt: str, damage: str | None, detail: str) -> InvalidImageError:
    """A file that starts like an allowed format but cannot be parsed.

    When its end is damaged too, a cut-short file is the likely cause, and the
    message says so rather than blaming the format.
    """
    if damage:
        return _damaged(where, fmt, damage)
    return where.error(
        "format", f"it starts like a {format_name(fmt)} file but {detail}", _FIX_REWRITE
    )


def _open(
    stream: BinaryIO, start: int, size: int, fmt: str, damage: str | None, where: _Input
) -> ImageFile.ImageFile:
    """Pillow's reader for ``fmt`` on the stream: parses the header, decodes nothing."""
    # Pillow's readers assume the file starts at offset 0 of their stream; an
    # image further in (rare) is copied out first.
    fp: IO[bytes] = stream if start == 0 else io.BytesIO(read_at(stream, start, size))
    fp.seek(0)
    try:
        return _READERS[fmt](fp)
    except _PARSE_ERRORS as exc:
        raise _unreadable(where, fmt, damage, f"Pillow cannot read it ({exc})") from exc


# -- fit_image's steps ------------------------------------------------------------------


def _fit(stream: BinaryIO, start: int, size: int, where: _Input) -> bytes:
    """Decode, convert, downsize, orient and encode; the new file's bytes."""
    _check_not_empty(where, size)  # no max_size: re-encoding is how a big file is fixed
    fmt, damage, dims = _inspect(stream, start, size, where)
    _check_min_resolution(where, dims)
    target = _fit_within(dims)
    _check_min_resolution_after_fit(where, dims, target)
    if fmt != "JPEG":
        # WebP allocates its canvas on open, so refuse before opening.
        _check_decodable(where, dims)
    with _open(stream, start, size, fmt, damage, where) as im:
        _check_frames(where, fmt, im)
        if fmt == "JPEG" and target != dims:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: far less memory and time.
            im.draft(None, (target[0] * _DRAFT_GAP, target[1] * _DRAFT_GAP))
        _check_decodable(where, im.size)
        image, orientation, icc = _decode(im, fmt, damage, where)
    image = _resize(image, target)
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    if transpose is not None:
        image = image.transpose(transpose)
    return _encode(image, as_jpeg=fmt == "JPEG", icc=icc, where=where)


def _fit_within(dims: tuple[int, int]) -> tuple[int, int]:
    """The largest size within 2048x2048 with the same aspect ratio; never larger than ``dims``."""
    width, height = dims
    if width <= MAX_IMAGE_SIDE and height <= MAX_IMAGE_SIDE:
        return dims
    scale = MAX_IMAGE_SIDE / max(width, height)
    return (
        max(1, min(MAX_IMAGE_SIDE, round(width * scale))),
        max(1, min(MAX_IMAGE_SIDE, round(height * scale))),
    )


def _check_min_resolution_after_fit(
    where: _Input, dims: tuple[int, int], target: tuple[int, int]
) -> None:
    """Rule ``min_resolution`` for a very long, thin image that cannot be downsized enough."""
    if min(target) < MIN_IMAGE_SIDE:
        raise where.error(
            "min_resolution",
            f"{dims[0]}x{dims[1]} pixels cannot fit within {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} "
            f"without a side falling below {MIN_IMAGE_SIDE} pixels",
            "Crop it to a less elongated shape.",
        )


def _check_decodable(where: _Input, dims: tuple[int, int]) -> None:
    """Rule ``max_resolution`` for auto_resize: refuse to decode a (possible) decompression bomb."""
    width, height = dims
    if width * height > _MAX_DECODE_PIXELS:
        raise where.error(
            "max_resolution",
            f"{width}x{height} pixels is too large to decode safely for auto_resize "
            f"(limit {_MAX_DECODE_PIXELS} pixels)",
            "Downsize it with an image editor first.",
        )


def _decode(
    im: ImageFile.ImageFile, fmt: str, damage: str | None, where: _Input
) -> tuple[Image.Image, int, bytes | None]:
    """Decode to 8-bit RGB/RGBA; also return the EXIF orientation and an ICC profile to keep."""
    try:
        im.load()
        image = to_8bit(im, keep_alpha=fmt != "JPEG")
    except _PARSE_ERRORS as exc:
        raise _undecodable(where, fmt, damage, exc) from exc
    # An ICC profile describes the source's colour space: still right for an RGB
    # source, wrong after converting from CMYK, grayscale or 16-bit.
    icc = im.info.get("icc_profile") if im.mode in ("RGB", "RGBA") else None
    return image, _orientation(im), icc or None


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 to 8); 1, upright, when absent or unreadable."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except _PARSE_ERRORS:
        return 1  # malformed EXIF: show the pixels as stored rather than refuse the image
    return value if isinstance(value, int) else 1


def _undecodable(
    where: _Input, fmt: str, damage: str | None, exc: BaseException
) -> InvalidImageError:
    """The error for pixel data Pillow cannot decode."""
    detail = damage or f"its pixel data cannot be decoded ({exc})"
    return where.error(
        "truncated", f"the {format_name(fmt)} file is incomplete or damaged: {detail}", _FIX_RESAVE
    )


def to_8bit(im: Image.Image, *, keep_alpha: bool) -> Image.Image:
    """A new 8-bit RGB image, or RGBA when ``keep_alpha`` and the image has transparency."""
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if im.mode in _SIXTEEN_BIT_MODES:
        # Pillow's I -> L conversion clips at 255 instead of scaling; 65535 / 257 = 255.
        im = im.convert("I").point(lambda value: value / 257).convert("L")
    return im.convert("RGBA" if keep_alpha and has_alpha else "RGB")


def _resize(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Downsize to ``target`` with LANCZOS (alpha-aware in Pillow); unchanged if already there."""
    if image.size == target:
        return image
    # reducing_gap first shrinks by whole factors cheaply; 3.0 is visually lossless.
    return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _encode(image: Image.Image, *, as_jpeg: bool, icc: bytes | None, where: _Input) -> bytes:
    """Encode under the API's size limit: PNG (or JPEG for JPEG input), then smaller JPEGs."""
    if not as_jpeg:
        data = _save(image, "PNG", icc, compress_level=1)
        if len(data) <= MAX_IMAGE_BYTES:
            return data
        image = _flatten(image)
    for quality in _JPEG_QUALITIES:
        data = _save(image, "JPEG", icc, quality=quality)
        if len(data) <= MAX_IMAGE_BYTES:
            return data
    raise where.error(
        "max_size",
        f"even re-encoded as JPEG at quality {_JPEG_QUALITIES[-1]} it takes {len(data)} bytes, "
        f"over the API's limit of {MAX_IMAGE_BYTES} bytes",
        "Reduce it with an image editor.",
    )


def _save(image: Image.Image, fmt: str, icc: bytes | None, **options: int) -> bytes:
    """Encode to bytes.  EXIF is left out on purpose: its orientation is already applied."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, icc_profile=icc, **options)
    return buffer.getvalue()


def _flatten(image: Image.Image) -> Image.Image:
    """RGB for JPEG: transparent areas become white, not whatever colour they hid."""
    if image.mode != "RGBA":
        return image
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background
