"""Local image validation (check_image) and the auto_resize re-encoder (fit_image).

The corpus is built with Pillow into a temporary directory once per module; no
binary test files are committed.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms

from novita_async import _images
from novita_async._config import MAX_IMAGE_BYTES
from novita_async._errors import InvalidImageError
from novita_async._images import ALLOWED_FORMATS, ImageInfo, check_image, fit_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: A word of each rule's fix that its message must contain.
FIX_WORDS = {
    "empty": "not empty",
    "max_size": "auto_resize=True",
    "format": "PNG, JPEG or WebP",
    "animated": "single frame",
    "max_resolution": "auto_resize=True",
    "min_resolution": "larger image",
    "truncated": "complete copy",
    "color_mode": "auto_resize=True",
}


# -- building the corpus ----------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """The image saved as ``fmt``, in memory."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth test picture (a gradient), converted to ``mode``."""
    image = Image.linear_gradient("L").resize(size)
    if mode == "RGBA":  # see-through at the top, so writers keep the alpha channel
        alpha = image
        image = Image.merge("RGBA", (image, image.rotate(90), image, alpha))
    return image.convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) chunks of a PNG file."""
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` 1-bit pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )


def png_with_garbage_pixels() -> bytes:
    """A structurally intact PNG (valid chunks and CRCs) whose IDAT is not zlib data."""
    chunks = png_chunks(encode(photo((64, 64)), "PNG"))
    garbage = random.Random(7).randbytes(sum(len(d) for k, d in chunks if k == b"IDAT"))
    body = b"".join(
        png_chunk(kind, garbage if kind == b"IDAT" else data)
        for kind, data in chunks
        if kind != b"IDAT" or data
    )
    return PNG_SIGNATURE + body


def jpeg_bomb(width: int, height: int) -> bytes:
    """A small baseline JPEG whose frame header is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(photo((64, 64)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def webp_bomb(width: int, height: int) -> bytes:
    """An extended (VP8X) WebP whose canvas size is patched to ``width`` x ``height``."""
    data = bytearray(encode(photo((64, 64), "RGBA"), "WEBP"))
    assert data[12:16] == b"VP8X"
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


def animation(fmt: str, frames: int = 3) -> bytes:
    """An animated image of ``frames`` differently coloured frames."""
    images = [Image.new("RGB", (32, 32), (i * 80, 0, 0)) for i in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:])


def exif_rotated_jpeg() -> bytes:
    """A 64x32 JPEG, red left half and blue right half, with EXIF orientation 6."""
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    return encode(image, "JPEG", exif=exif, quality=95)


def mpo(frames: int = 2) -> bytes:
    """A multi-picture JPEG (what many phones write), ``frames`` pictures."""
    images = [photo((48, 48)) for _ in range(frames)]
    return encode(images[0], "MPO", save_all=True, append_images=images[1:])


def motion_photo(jpeg: bytes) -> bytes:
    """A Motion Photo's layout: the picture, then an MP4 video after its EOI (no EOI at the end)."""
    video = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 64
    return jpeg + video


def with_thumbnail(jpeg: bytes) -> bytes:
    """``jpeg`` with an APP1 segment holding a whole small JPEG (its own FF D9 inside)."""
    thumbnail = encode(photo((16, 16)), "JPEG")
    payload = b"Exif\x00\x00" + thumbnail
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def cut_in_scan(jpeg: bytes) -> bytes:
    """``jpeg`` cut 100 bytes into its picture's scan data (after its last SOS marker)."""
    return jpeg[: jpeg.rfind(b"\xff\xda") + 100]


def corpus_files() -> dict[str, Callable[[], bytes]]:
    """Every corpus file by name, as a function that makes its bytes."""
    png = encode(photo((64, 48)), "PNG")
    jpeg = encode(photo((64, 48)), "JPEG")
    webp = encode(photo((64, 48)), "WEBP")
    return {
        # valid
        "rgb.png": lambda: png,
        "rgba.png": lambda: encode(photo((40, 30), "RGBA"), "PNG"),
        "l.png": lambda: encode(photo((30, 40), "L"), "PNG"),
        "p.png": lambda: encode(photo((20, 20), "P"), "PNG", transparency=0),
        "rgb.jpg": lambda: jpeg,
        "l.jpg": lambda: encode(photo((32, 32), "L"), "JPEG"),
        "nul_padded.jpg": lambda: jpeg + b"\x00" * 100 + b"\r\n",
        "rgb.webp": lambda: webp,
        "rgba.webp": lambda: encode(photo((40, 30), "RGBA"), "WEBP"),
        "lossless.webp": lambda: encode(photo((30, 40)), "WEBP", lossless=True),
        "exif6.jpg": exif_rotated_jpeg,
        "mpo.jpg": mpo,
        "motion_photo.jpg": lambda: motion_photo(jpeg),
        "max_2048.png": lambda: encode(Image.new("RGB", (2048, 2048)), "PNG"),
        "min_16.png": lambda: encode(Image.new("RGB", (16, 16)), "PNG"),
        "garbage_pixels.png": png_with_garbage_pixels,
        # invalid
        "empty.png": lambda: b"",
        "text.png": lambda: b"this is not an image, just text saved as .png\n" * 20,
        "png_cut_middle.png": lambda: png[: len(png) // 2],
        "png_cut_before_iend.png": lambda: png[:-12],
        "png_trailing.png": lambda: png + b"junk",
        # Cut inside a chunk whose data holds IEND's bytes: only hops by chunk lengths count.
        "png_cut_then_iend_bytes.png": lambda: (
            png[:-12] + struct.pack(">I", 1000) + b"tEXt" + b"comment" + png[-12:] + b"junk"
        ),
        "png_cut_before_iend_then_data.png": lambda: png[:-12] + b"junk" * 100,
        "png_cut_in_iend.png": lambda: png[:-3],
        "png_cut_header.png": lambda: png[:20],
        "png_bad_header.png": lambda: png.replace(b"IHDR", b"XXXX", 1),
        "jpeg_no_frame.jpg": lambda: b"\xff\xd8\xff\xfe\x00\x04hi" + b"\xff\xd9",
        "jpeg_cut.jpg": lambda: jpeg[: len(jpeg) // 2],
        "jpeg_cut_header.jpg": lambda: jpeg[:30],
        # Cut in the scan, then more data: the thumbnail's FF D9 must not count as the end.
        "jpeg_thumb_cut_trailing.jpg": lambda: cut_in_scan(with_thumbnail(jpeg)) + b"junk" * 100,
        "webp_cut.webp": lambda: webp[: len(webp) // 2],
        "webp_trailing.webp": lambda: webp + b"junk",
        "big_4096.png": lambda: encode(Image.new("RGB", (4096, 4096)), "PNG"),
        "wide_2049x10.png": lambda: encode(Image.new("RGB", (2049, 10)), "PNG"),
        "tiny_10x10.png": lambda: encode(Image.new("RGB", (10, 10)), "PNG"),
        "thin_100x10.jpg": lambda: encode(Image.new("RGB", (100, 10)), "JPEG"),
        "bomb.png": lambda: png_bomb(50_000, 50_000),
        "bomb.jpg": lambda: jpeg_bomb(60_000, 60_000),
        "bomb.webp": lambda: webp_bomb(16_384, 16_384),
        "cmyk.jpg": lambda: encode(photo((32, 32), "CMYK"), "JPEG"),
        "gray16.png": lambda: encode(Image.new("I;16", (32, 32), 40_000), "PNG"),
        "animated.gif": lambda: animation("GIF"),
        "animated.png": lambda: animation("PNG"),
        "animated.webp": lambda: animation("WEBP"),
        "single.gif": lambda: encode(photo((32, 32)), "GIF"),
        "image.bmp": lambda: encode(photo((32, 32)), "BMP"),
        "image.tiff": lambda: encode(photo((32, 32)), "TIFF"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Write the corpus to a temporary directory; names map to paths."""
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, make in corpus_files().items():
        path = root / name
        path.write_bytes(make())
        paths[name] = path
    # Over 30 MB without the cost of encoding 30 MB: a small PNG, then a sparse tail.
    big = root / "over_30mb.png"
    with big.open("wb") as f:
        f.write(encode(photo((64, 64)), "PNG"))
        f.truncate(MAX_IMAGE_BYTES + 1024 * 1024)
    paths[big.name] = big
    return paths


def check_path(path: Path, input_name: str = "image") -> ImageInfo:
    """check_image on a file, asserting the stream is left where it started."""
    with path.open("rb") as stream:
        try:
            return check_image(
                stream, size=os.path.getsize(path), input_name=input_name, source=str(path)
            )
        finally:
            assert stream.tell() == 0


def fit_path(path: Path) -> tuple[bytes, ImageInfo]:
    """fit_image on a file, asserting the stream is left where it started."""
    with path.open("rb") as stream:
        try:
            return fit_image(stream, input_name="image", source=str(path))
        finally:
            assert stream.tell() == 0


def assert_message(
    error: InvalidImageError, rule: str, input_name: str, source: str, fix: str = ""
) -> None:
    """The error carries the rule, and its message names input, source, rule and a fix."""
    assert (error.rule, error.input_name, error.source) == (rule, input_name, source)
    message = str(error)
    assert message.startswith(f"{input_name} ({source}): ")
    assert f"[rule {rule}]. " in message
    assert (fix or FIX_WORDS[rule]) in message.split(f"[rule {rule}]. ", 1)[1]


# -- check_image ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("rgb.png", ImageInfo("PNG", 64, 48, 0, "RGB"), id="png-rgb"),
        pytest.param("rgba.png", ImageInfo("PNG", 40, 30, 0, "RGBA"), id="png-rgba"),
        pytest.param("l.png", ImageInfo("PNG", 30, 40, 0, "L"), id="png-gray"),
        pytest.param("p.png", ImageInfo("PNG", 20, 20, 0, "P"), id="png-palette"),
        pytest.param("png_trailing.png", ImageInfo("PNG", 64, 48, 0, "RGB"), id="png-trailing-data"),
        pytest.param("rgb.jpg", ImageInfo("JPEG", 64, 48, 0, "RGB"), id="jpeg-rgb"),
        pytest.param("l.jpg", ImageInfo("JPEG", 32, 32, 0, "L"), id="jpeg-gray"),
        pytest.param("nul_padded.jpg", ImageInfo("JPEG", 64, 48, 0, "RGB"), id="jpeg-padded"),
        pytest.param("rgb.webp", ImageInfo("WEBP", 64, 48, 0, "RGB"), id="webp-lossy"),
        pytest.param("rgba.webp", ImageInfo("WEBP", 40, 30, 0, "RGBA"), id="webp-rgba"),
        pytest.param("lossless.webp", ImageInfo("WEBP", 30, 40, 0, "RGB"), id="webp-lossless"),
        pytest.param("webp_trailing.webp", ImageInfo("WEBP", 64, 48, 0, "RGB"), id="webp-trailing-data"),
        pytest.param("exif6.jpg", ImageInfo("JPEG", 64, 32, 0, "RGB"), id="jpeg-exif-rotated"),
        pytest.param("mpo.jpg", ImageInfo("JPEG", 48, 48, 0, "RGB"), id="jpeg-multi-picture"),
        pytest.param("motion_photo.jpg", ImageInfo("JPEG", 64, 48, 0, "RGB"), id="jpeg-motion-photo"),
        pytest.param("max_2048.png", ImageInfo("PNG", 2048, 2048, 0, "RGB"), id="at-max-side"),
        pytest.param("min_16.png", ImageInfo("PNG", 16, 16, 0, "RGB"), id="at-min-side"),
    ],
)
def test_valid_images_are_accepted(corpus: dict[str, Path], name: str, expected: ImageInfo) -> None:
    """A valid input returns its format, dimensions (as stored), size and mode."""
    path = corpus[name]
    info = check_path(path)
    assert info == ImageInfo(
        expected.format, expected.width, expected.height, path.stat().st_size, expected.mode
    )
    assert info.format in ALLOWED_FORMATS


@pytest.mark.parametrize(
    ("name", "rule", "detail"),
    [
        pytest.param("empty.png", "empty", "0 bytes", id="empty"),
        pytest.param("over_30mb.png", "max_size", "31457280 bytes", id="over-30mb"),
        pytest.param("text.png", "format", "not a PNG, JPEG or WebP", id="text-named-png"),
        pytest.param("png_bad_header.png", "format", "starts like a PNG", id="png-bad-header"),
        pytest.param("jpeg_no_frame.jpg", "format", "starts like a JPEG", id="jpeg-no-frame"),
        pytest.param("single.gif", "format", "GIF image", id="gif"),
        pytest.param("animated.gif", "format", "GIF image", id="gif-animated"),
        pytest.param("image.bmp", "format", "BMP image", id="bmp"),
        pytest.param("image.tiff", "format", "TIFF image", id="tiff"),
        pytest.param("animated.png", "animated", "3 frames", id="apng"),
        pytest.param("animated.webp", "animated", "3 frames", id="webp-animated"),
        pytest.param("big_4096.png", "max_resolution", "4096x4096", id="4096x4096"),
        pytest.param("wide_2049x10.png", "max_resolution", "2049x10", id="2049x10"),
        pytest.param("bomb.png", "max_resolution", "50000x50000", id="bomb-png"),
        pytest.param("bomb.jpg", "max_resolution", "60000x60000", id="bomb-jpeg"),
        pytest.param("bomb.webp", "max_resolution", "16384x16384", id="bomb-webp"),
        pytest.param("tiny_10x10.png", "min_resolution", "10x10", id="10x10"),
        pytest.param("thin_100x10.jpg", "min_resolution", "100x10", id="100x10"),
        pytest.param("png_cut_middle.png", "truncated", "IEND", id="png-cut-middle"),
        pytest.param("png_cut_before_iend.png", "truncated", "IEND", id="png-cut-before-iend"),
        pytest.param("png_cut_before_iend_then_data.png", "truncated", "IEND",
                     id="png-cut-before-iend-then-data"),
        pytest.param("png_cut_in_iend.png", "truncated", "IEND", id="png-cut-in-iend"),
        pytest.param("png_cut_then_iend_bytes.png", "truncated", "IEND", id="png-iend-inside-a-chunk"),
        pytest.param("png_cut_header.png", "truncated", "IEND", id="png-cut-in-header"),
        pytest.param("jpeg_cut.jpg", "truncated", "FF D9", id="jpeg-cut"),
        pytest.param("jpeg_cut_header.jpg", "truncated", "FF D9", id="jpeg-cut-in-header"),
        pytest.param("jpeg_thumb_cut_trailing.jpg", "truncated", "FF D9", id="jpeg-cut-then-data"),
        pytest.param("webp_cut.webp", "truncated", "RIFF header", id="webp-cut"),
        pytest.param("cmyk.jpg", "color_mode", "CMYK", id="jpeg-cmyk"),
        pytest.param("gray16.png", "color_mode", "16-bit", id="png-16-bit"),
    ],
)
@pytest.mark.parametrize("input_name", ["face_image", "image"])
def test_invalid_images_are_refused(
    corpus: dict[str, Path], name: str, rule: str, detail: str, input_name: str
) -> None:
    """A bad input raises InvalidImageError with its rule, the limit broken and a fix."""
    path = corpus[name]
    with pytest.raises(InvalidImageError) as caught:
        check_path(path, input_name)
    assert_message(caught.value, rule, input_name, str(path))
    assert detail in str(caught.value)


def test_max_size_is_checked_before_reading() -> None:
    """A size over 30 MB is refused from the size argument alone, without a read."""

    class Unreadable(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            raise AssertionError("check_image read a file it should have refused unread")

    with pytest.raises(InvalidImageError) as caught:
        check_image(Unreadable(), size=MAX_IMAGE_BYTES + 1, input_name="image", source="big")
    assert_message(caught.value, "max_size", "image", "big")


def test_limit_is_exactly_30_mb(corpus: dict[str, Path]) -> None:
    """The size limit is inclusive: MAX_IMAGE_BYTES passes the size rule, one more fails."""
    data = corpus["rgb.png"].read_bytes()
    with pytest.raises(InvalidImageError, match=r"rule truncated"):
        # Passes max_size; the claimed size then disagrees with the file's real end.
        check_image(io.BytesIO(data), size=MAX_IMAGE_BYTES, input_name="image", source="s")
    with pytest.raises(InvalidImageError, match=r"rule max_size"):
        check_image(io.BytesIO(data), size=MAX_IMAGE_BYTES + 1, input_name="image", source="s")


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        pytest.param("rgb.png", None, id="png"),
        pytest.param("mpo.jpg", None, id="jpeg-multi-picture"),
        pytest.param("rgba.webp", None, id="webp"),
        pytest.param("jpeg_cut.jpg", "truncated", id="jpeg-cut"),
        pytest.param("text.png", "format", id="text"),
    ],
)
def test_stream_not_at_zero(corpus: dict[str, Path], name: str, rule: str | None) -> None:
    """An image starting mid-stream is checked from there, and the stream is put back there."""
    data = corpus[name].read_bytes()
    stream = io.BytesIO(b"preamble" + data + b"epilogue")
    stream.seek(8)
    if rule is None:
        assert check_image(stream, size=len(data), input_name="image", source="s").size == len(data)
    else:
        with pytest.raises(InvalidImageError, match=f"rule {rule}"):
            check_image(stream, size=len(data), input_name="image", source="s")
    assert stream.tell() == 8


def test_pixels_are_not_decoded(corpus: dict[str, Path]) -> None:
    """A PNG with garbage pixel data but intact structure passes: only headers are read."""
    info = check_path(corpus["garbage_pixels.png"])
    assert (info.format, info.width, info.height) == ("PNG", 64, 64)
    with pytest.raises(InvalidImageError) as caught:  # decoding it, by contrast, fails
        fit_path(corpus["garbage_pixels.png"])
    assert caught.value.rule == "truncated"


SEEDS = {
    "PNG": encode(photo((32, 32), "RGBA"), "PNG"),
    "JPEG": encode(photo((32, 32)), "JPEG"),
    "WEBP": encode(photo((32, 32)), "WEBP"),
    "MPO": mpo(),
}


@settings(max_examples=300, deadline=None)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
)
def test_damaged_files_never_crash(seed: str, cut: int, flips: list[tuple[int, int]]) -> None:
    """Cut or corrupted files give ImageInfo or InvalidImageError, nothing else."""
    data = bytearray(SEEDS[seed][: max(1, len(SEEDS[seed]) - cut)])
    for offset, value in flips:
        data[offset % len(data)] = value
    stream = io.BytesIO(bytes(data))
    with contextlib.suppress(InvalidImageError):
        check_image(stream, size=len(data), input_name="image", source="fuzz")
    assert stream.tell() == 0


# -- fit_image --------------------------------------------------------------------------


def check_bytes(data: bytes) -> ImageInfo:
    """check_image on bytes (what fit_image returns)."""
    return check_image(io.BytesIO(data), size=len(data), input_name="image", source="fitted")


def test_fit_large_jpeg(tmp_path: Path) -> None:
    """A 4096x3000 JPEG is downsized to 2048x1500 JPEG that passes check_image."""
    path = tmp_path / "large.jpg"
    path.write_bytes(encode(photo((4096, 3000)), "JPEG"))
    data, info = fit_path(path)
    assert info == ImageInfo("JPEG", 2048, 1500, len(data), "RGB")
    assert check_bytes(data) == info


def test_fit_large_png(corpus: dict[str, Path]) -> None:
    """A 4096x4096 PNG becomes a 2048x2048 PNG."""
    data, info = fit_path(corpus["big_4096.png"])
    assert info == ImageInfo("PNG", 2048, 2048, len(data), "RGB")


def test_fit_repairs_oversized_file(corpus: dict[str, Path]) -> None:
    """A file over 30 MB whose pixels decode (here: zero padding) is re-encoded small."""
    data, info = fit_path(corpus["over_30mb.png"])
    assert (info.format, info.width, info.height) == ("PNG", 64, 64)
    assert len(data) < 1024 * 1024


def test_fit_leaves_small_images_their_size(corpus: dict[str, Path]) -> None:
    """An image within the limits is re-encoded, never enlarged."""
    _, info = fit_path(corpus["rgb.webp"])
    assert (info.format, info.width, info.height) == ("PNG", 64, 48)


def test_fit_converts_cmyk_to_rgb(corpus: dict[str, Path]) -> None:
    """A CMYK JPEG becomes an RGB JPEG."""
    _, info = fit_path(corpus["cmyk.jpg"])
    assert (info.format, info.mode) == ("JPEG", "RGB")


def test_fit_scales_16_bit_to_8_bit(corpus: dict[str, Path]) -> None:
    """A 16-bit grayscale PNG becomes 8-bit RGB with values scaled, not clipped."""
    data, info = fit_path(corpus["gray16.png"])
    assert (info.format, info.mode) == ("PNG", "RGB")
    with Image.open(io.BytesIO(data)) as image:
        assert image.getpixel((0, 0)) == (155, 155, 155)  # 40000 / 257


def test_fit_applies_exif_orientation(corpus: dict[str, Path]) -> None:
    """EXIF orientation 6 is applied: the sides swap and no orientation tag is left."""
    data, info = fit_path(corpus["exif6.jpg"])
    assert (info.width, info.height) == (32, 64)
    with Image.open(io.BytesIO(data)) as image:
        assert 0x0112 not in image.getexif()
        red, _, blue = image.convert("RGB").getpixel((16, 8))
        assert red > 200 and blue < 60  # the stored left (red) half is now on top


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        pytest.param("rgba.png", "RGBA", id="png-rgba"),
        pytest.param("p.png", "RGBA", id="png-palette-transparency"),
        pytest.param("rgba.webp", "RGBA", id="webp-rgba"),
        pytest.param("l.png", "RGB", id="png-gray"),
        pytest.param("l.jpg", "RGB", id="jpeg-gray"),
    ],
)
def test_fit_keeps_alpha_else_rgb(corpus: dict[str, Path], name: str, mode: str) -> None:
    """Transparency is kept (as RGBA PNG); everything else becomes RGB."""
    _, info = fit_path(corpus[name])
    assert info.mode == mode


def test_fit_keeps_rgb_icc_profile(tmp_path: Path) -> None:
    """An RGB image's ICC profile is carried into the re-encoded file."""
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "icc.png"
    path.write_bytes(encode(photo((3000, 40)), "PNG", icc_profile=icc))
    data, _ = fit_path(path)
    with Image.open(io.BytesIO(data)) as image:
        assert image.info.get("icc_profile") == icc


def test_fit_mid_stream() -> None:
    """fit_image reads from the stream's position and puts it back there."""
    data = encode(photo((3000, 100)), "JPEG")
    stream = io.BytesIO(b"preamble" + data)
    stream.seek(8)
    _, info = fit_image(stream, input_name="image", source="s")
    assert (info.width, info.height) == (2048, 68)
    assert stream.tell() == 8


def test_fit_falls_back_to_jpeg_when_too_big(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the size limit as PNG, the result is re-encoded as JPEG, alpha flattened on white."""
    noise = Image.frombytes("RGB", (256, 256), random.Random(1).randbytes(256 * 256 * 3))
    noise.putalpha(Image.new("L", noise.size, 255))
    noise.putpixel((0, 0), (0, 0, 0, 0))  # transparent black must come out white
    monkeypatch.setattr(_images, "MAX_IMAGE_BYTES", 60_000)  # PNG ~200 kB, JPEG q85 ~50 kB
    data, info = fit_image(io.BytesIO(encode(noise, "PNG")), input_name="image", source="s")
    assert (info.format, info.mode) == ("JPEG", "RGB")
    assert len(data) <= 60_000
    with Image.open(io.BytesIO(data)) as image:
        assert min(image.convert("RGB").getpixel((0, 0))) > 150


def test_fit_gives_up_when_nothing_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """If even the smallest JPEG is over the limit, fit_image raises max_size."""
    noise = Image.frombytes("RGB", (64, 64), random.Random(2).randbytes(64 * 64 * 3))
    monkeypatch.setattr(_images, "MAX_IMAGE_BYTES", 500)
    with pytest.raises(InvalidImageError) as caught:
        fit_image(io.BytesIO(encode(noise, "PNG")), input_name="image", source="s")
    assert_message(caught.value, "max_size", "image", "s", fix="image editor")


@pytest.mark.parametrize(
    ("name", "rule", "fix"),
    [
        pytest.param("empty.png", "empty", "", id="empty"),
        pytest.param("text.png", "format", "", id="text"),
        pytest.param("single.gif", "format", "", id="gif"),
        pytest.param("animated.png", "animated", "", id="apng"),
        pytest.param("animated.webp", "animated", "", id="webp-animated"),
        pytest.param("jpeg_cut.jpg", "truncated", "", id="jpeg-cut"),
        pytest.param("png_cut_middle.png", "truncated", "", id="png-cut"),
        pytest.param("tiny_10x10.png", "min_resolution", "", id="too-small"),
        pytest.param("bomb.png", "max_resolution", "image editor", id="bomb-png"),
        pytest.param("bomb.webp", "max_resolution", "image editor", id="bomb-webp"),
    ],
)
def test_fit_refuses_what_it_cannot_fix(
    corpus: dict[str, Path], name: str, rule: str, fix: str
) -> None:
    """fit_image refuses inputs that re-encoding cannot repair, with the same rules."""
    with pytest.raises(InvalidImageError) as caught:
        fit_path(corpus[name])
    assert_message(caught.value, rule, "image", str(corpus[name]), fix)


def test_fit_refuses_too_thin_to_fit(tmp_path: Path) -> None:
    """A 100000x100 strip cannot fit 2048 wide and stay 16 high: min_resolution."""
    path = tmp_path / "strip.png"
    path.write_bytes(encode(Image.new("L", (100_000, 100)), "PNG"))
    with pytest.raises(InvalidImageError, match="below 16 pixels") as caught:
        fit_path(path)
    assert caught.value.rule == "min_resolution"


@pytest.mark.parametrize("block", [2, 3, 5, 64, "split"])
def test_end_of_picture_found_across_read_boundaries(
    corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch, block: int | str
) -> None:
    """The search for FF D9 inside a file reads in blocks; a marker split between two is found."""
    from novita_async import _imageformat

    if block == "split":  # the first read ends between the FF and the D9 of the picture's end
        data = corpus["motion_photo.jpg"].read_bytes()
        scan = next(pos for marker, pos in _imageformat._jpeg_segments(io.BytesIO(data), 0, len(data))
                    if marker == 0xDA)
        block = data.index(b"\xff\xd9", scan + 2) - (scan + 2) + 1
        assert data[scan + 2 + block - 1] == 0xFF
    monkeypatch.setattr(_imageformat, "_JPEG_SCAN_BLOCK", block)
    assert check_path(corpus["motion_photo.jpg"]).format == "JPEG"
    with pytest.raises(InvalidImageError, match="rule truncated"):
        check_path(corpus["jpeg_thumb_cut_trailing.jpg"])
