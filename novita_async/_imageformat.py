"""Reading an image file's structure without decoding it: format, dimensions, completeness.

Pure byte parsing of PNG, JPEG and WebP headers and tails, used by the local
checks in ``_images`` before an upload.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

__all__ = [
    "HEAD_BYTES",
    "describe_other_format",
    "find_damage",
    "format_name",
    "header_dims",
    "read_at",
    "sniff_format",
]

HEAD_BYTES = 32  # enough for every header field read below (WebP needs 30)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = bytes.fromhex("0000000049454e44ae426082")  # length 0, "IEND", its CRC
_PNG_MAX_CHUNKS = 100_000  # real files have a few dozen to a few thousand
_JPEG_EOI = b"\xff\xd9"
_JPEG_PADDING = b"\x00 \t\r\n"  # some writers pad the end of a JPEG with these
_JPEG_TAIL_BYTES = 64 * 1024  # how much of a JPEG's end is searched for EOI
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_JPEG_MAX_SEGMENTS = 1000  # real files have a few dozen before the frame header
_JPEG_SCAN_BLOCK = 1024 * 1024  # read size when looking for EOI inside the file

#: Signatures of formats the API refuses, to name them in the message.
_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"qoif", "QOI"),
)
_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC",
                b"mif1": "HEIF", b"msf1": "HEIF"}



def read_at(stream: BinaryIO, offset: int, count: int) -> bytes:
    """Up to ``count`` bytes at absolute ``offset``."""
    stream.seek(offset)
    return stream.read(count)


def sniff_format(head: bytes) -> str | None:
    """The allowed format a file's first bytes announce, or None."""
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def describe_other_format(head: bytes) -> str:
    """Describe a file that is not PNG, JPEG or WebP, naming its format when known."""
    name = next((fmt for sig, fmt in _OTHER_SIGNATURES if head.startswith(sig)), None)
    if name is None and head[4:8] == b"ftyp":
        name = _FTYP_BRANDS.get(head[8:12])
    if name is None:
        return "it is not a PNG, JPEG or WebP image (its content is not a known image format)"
    return f"it is a {name} image; the API takes only PNG, JPEG or WebP"


def format_name(fmt: str) -> str:
    """How formats are spelt in messages."""
    return "WebP" if fmt == "WEBP" else fmt


def find_damage(fmt: str, stream: BinaryIO, start: int, size: int, head: bytes) -> str | None:
    """Rule ``truncated``'s structural check of the file's end; a description, or None if intact."""
    if fmt == "PNG":
        if read_at(stream, start + max(0, size - len(_PNG_IEND)), len(_PNG_IEND)) == _PNG_IEND:
            return None
        if _png_image_ends_early(stream, start, size):
            return None
        return "it does not end with the PNG end chunk (IEND)"
    if fmt == "JPEG":
        count = min(size, _JPEG_TAIL_BYTES)
        tail = read_at(stream, start + size - count, count).rstrip(_JPEG_PADDING)
        if tail.endswith(_JPEG_EOI) or _jpeg_image_ends_early(stream, start, size):
            return None
        return "it does not end with the JPEG end-of-image marker (FF D9)"
    # RIFF's size field counts everything after the first 8 bytes.  Bytes after
    # that (a writer's pad byte, a tool's trailer) are ignored, as after a PNG's
    # IEND or a JPEG's EOI: libwebp (Pillow's decoder, and most servers') reads
    # only the declared size.  Only a file that ends before it is incomplete.
    declared = struct.unpack_from("<I", head, 4)[0] + 8
    if size >= declared:
        return None
    return f"its RIFF header declares {declared} bytes but the file has {size}"


def header_dims(
    fmt: str, stream: BinaryIO, start: int, size: int, head: bytes
) -> tuple[int, int] | None:
    """(width, height) from the format's header, or None when it cannot be read."""
    if fmt == "PNG":
        return _png_dims(head)
    if fmt == "WEBP":
        return _webp_dims(head)
    return _jpeg_dims(stream, start, size)


def _png_dims(head: bytes) -> tuple[int, int] | None:
    """From the IHDR chunk, which must come first."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", head, 16)
    return width, height


def _webp_dims(head: bytes) -> tuple[int, int] | None:
    """From the first chunk: the canvas (VP8X), or the bitstream header (VP8, VP8L)."""
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", head, 26)
        return width & 0x3FFF, height & 0x3FFF  # the top two bits are a scaling hint
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = struct.unpack_from("<I", head, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_segments(stream: BinaryIO, start: int, size: int) -> Iterator[tuple[int, int]]:
    """(marker, offset) of each marker from the one after SOI up to the first scan (SOS) or EOI.

    Hops over each segment by its length, so bytes inside segments (an EXIF
    thumbnail's own markers) are never mistaken for markers; stops early at
    anything malformed.
    """
    pos, end = start + 2, start + size
    for _ in range(_JPEG_MAX_SEGMENTS):
        if pos + 4 > end:
            return
        segment = read_at(stream, pos, 4)
        if len(segment) < 4 or segment[0] != 0xFF:
            return
        marker = segment[1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        yield marker, pos
        if marker in (0xD9, 0xDA):
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", segment, 2)
        if length < 2:
            return
        pos += 2 + length


def _jpeg_dims(stream: BinaryIO, start: int, size: int) -> tuple[int, int] | None:
    """From the first frame header (SOFn), hopping over the segments before it."""
    for marker, pos in _jpeg_segments(stream, start, size):
        if marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            return None
        if marker in _JPEG_SOF_MARKERS:
            frame = read_at(stream, pos + 4, 5)  # precision, height, width
            if len(frame) < 5:
                return None
            height, width = struct.unpack_from(">HH", frame, 1)
            return width, height
    return None


def _png_image_ends_early(stream: BinaryIO, start: int, size: int) -> bool:
    """Whether the PNG's chunks reach a complete IEND before the file ends.

    Some writers (and tools that append metadata) leave bytes after IEND;
    decoders, the API's included, stop there.  Hops from chunk to chunk by
    their lengths, so an IEND-like run of bytes inside a chunk never counts,
    and a file cut anywhere before its IEND's last byte is still refused.
    Only for files whose last bytes are not IEND: one small read per chunk.
    """
    pos, end = start + len(_PNG_SIGNATURE), start + size
    if read_at(stream, end - 1, 1) == b"":
        return False  # the stream ends before the size claimed
    for _ in range(_PNG_MAX_CHUNKS):
        header = read_at(stream, pos, 8)
        if len(header) < 8 or pos + 8 > end:
            return False
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            return length == 0 and pos + len(_PNG_IEND) <= end and (
                read_at(stream, pos, len(_PNG_IEND)) == _PNG_IEND
            )
        pos += 12 + length  # length, type, data, CRC
    return False


def _jpeg_image_ends_early(stream: BinaryIO, start: int, size: int) -> bool:
    """Whether the JPEG's image ends (EOI) before the file does.

    Motion Photos append a video after the picture and some cameras a vendor
    trailer; decoders stop at EOI.  In the scan data after SOS every 0xFF byte
    of the picture is stuffed (FF 00) or a restart marker, so the first FF D9
    there is the end of the image.  Reads the file once, only for files whose
    last bytes are not EOI.
    """
    scan = next((pos for marker, pos in _jpeg_segments(stream, start, size) if marker == 0xDA), None)
    if scan is None:
        return False
    pos, end, last = scan + 2, start + size, b""
    while pos < end:
        block = read_at(stream, pos, min(_JPEG_SCAN_BLOCK, end - pos))
        if not block:
            return False
        if _JPEG_EOI in block or last + block[:1] == _JPEG_EOI:  # also split across two reads
            return True
        last, pos = block[-1:], pos + len(block)
    return False
