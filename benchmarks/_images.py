"""Deterministic test images of an exact file size, cheap to make.

Each image is a PNG of random noise saved with ``compress_level=0`` (stored
deflate blocks: the file is about as large as the pixels, and making it costs
a memcpy, not a compressor).  The side is chosen so the pixels come just under
the target, and an ancillary private chunk (``bnCh``, after the image data, so
header parsers never read it) pads the file to the exact byte count.  The
emulator and the official SDK treat these like any other PNG.
"""

from __future__ import annotations

import io
import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin

__all__ = ["SIZES", "ImagePair", "make_image", "make_pair"]

#: Size classes: name -> (target file bytes, PNG mode).
SIZES: dict[str, tuple[int, str]] = {
    "small": (100_000, "RGB"),  # ~100 KB, 182 px square
    "medium": (2_000_000, "RGB"),  # ~2 MB, 816 px square
    "large": (20_000_000, "RGBA"),  # ~20 MB, 2048 px square RGBA + padding chunk
}

_MAX_SIDE = 2048
_PAD_CHUNK = b"bnCh"  # ancillary, private, safe-to-copy
_CHUNK_OVERHEAD = 12  # length, type, CRC


@dataclass(frozen=True)
class ImagePair:
    """The two inputs of one size class's jobs."""

    size_name: str
    face: Path
    image: Path

    @property
    def input_bytes(self) -> int:
        """Bytes of both files together."""
        return self.face.stat().st_size + self.image.stat().st_size


def _encode(image: Image.Image, pad: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    if pad > 0:
        info.add(_PAD_CHUNK, b"\0" * pad, after_idat=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0, pnginfo=info)
    return buffer.getvalue()


def make_image(target: int, mode: str, seed: int) -> bytes:
    """A noise PNG of exactly ``target`` bytes (deterministic for a seed).

    Raises:
        ValueError: the target cannot be reached within 2048x2048 and 30 MB.
    """
    channels = len(mode)
    # Each row costs side * channels bytes plus a filter byte; stored deflate
    # adds ~5 bytes per 64 KiB block.  Aim a little under, then pad exactly.
    side = min(_MAX_SIDE, math.isqrt(int(target * 0.98) // channels))
    rng = random.Random(seed)
    image = Image.frombytes(mode, (side, side), rng.randbytes(side * side * channels))
    bare = len(_encode(image, 0))
    pad = target - bare - _CHUNK_OVERHEAD
    if pad < 0 or target > 30 * 1024 * 1024:
        raise ValueError(f"cannot make a {mode} PNG of {target} bytes within 2048x2048")
    data = _encode(image, pad)
    assert len(data) == target, (len(data), target)
    # A cheap integrity check: the padding chunk's CRC is right.
    assert zlib.crc32(_PAD_CHUNK + b"\0" * pad) & 0xFFFFFFFF == int.from_bytes(data[-16:-12], "big")
    return data


def make_pair(size_name: str, folder: Path) -> ImagePair:
    """Write the face and the target image of one size class into ``folder``."""
    target, mode = SIZES[size_name]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for role, seed in (("face", 1), ("image", 2)):
        path = folder / f"{role}_{size_name}.png"
        if not path.exists() or path.stat().st_size != target:
            path.write_bytes(make_image(target, mode, seed + 10 * len(size_name)))
        paths.append(path)
    return ImagePair(size_name, paths[0], paths[1])
