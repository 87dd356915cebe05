"""Local validation and auto_resize, through the client against the emulator."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

import novita_async as na
from novita_async.emulator import Emulator

from .conftest import FAST_RETRY, make_image

pytestmark = pytest.mark.anyio


def _big_jpeg(size: tuple[int, int] = (3000, 2200), mode: str = "RGB") -> bytes:
    image = Image.linear_gradient("L").resize(size).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


async def test_oversized_image_is_refused_and_nothing_is_sent(emulator: Emulator) -> None:
    """An image over 2048x2048 is an InvalidImageError naming the input and the fix; no request is made."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client:
        with pytest.raises(na.InvalidImageError) as caught:
            await client.merge_face(make_image(), _big_jpeg())
    assert caught.value.rule == "max_resolution"
    assert caught.value.input_name == "image"
    assert "auto_resize=True" in str(caught.value)
    assert emulator.stats.requests == 0


async def test_auto_resize_downsizes_before_upload(emulator: Emulator) -> None:
    """auto_resize=True sends a copy that fits 2048x2048, keeping the aspect ratio."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY,
                               auto_resize=True) as client:
        result = await client.merge_face(make_image(), _big_jpeg())
    assert result.to_pil().size == (2048, round(2200 * 2048 / 3000))
    assert emulator.stats.statuses[200] == 1


async def test_auto_resize_per_call_overrides_the_client(emulator: Emulator) -> None:
    """merge_face(auto_resize=False) refuses even when the client resizes by default."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY,
                               auto_resize=True) as client:
        with pytest.raises(na.InvalidImageError):
            await client.merge_face(_big_jpeg(), make_image(), auto_resize=False)
    assert emulator.stats.requests == 0


async def test_auto_resize_converts_cmyk(emulator: Emulator, tmp_path: Path) -> None:
    """A CMYK JPEG is refused by default and converted to RGB with auto_resize."""
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(_big_jpeg((400, 300), mode="CMYK"))
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client:
        with pytest.raises(na.InvalidImageError) as caught:
            await client.merge_face(path, make_image())
        assert caught.value.rule == "color_mode"
        assert str(path) in str(caught.value)
        result = await client.merge_face(path, make_image(), auto_resize=True)
    assert result.image_type == "png"
    assert emulator.stats.requests == 1


async def test_validate_false_lets_the_server_judge(emulator: Emulator) -> None:
    """With validate=False a bad image reaches the server, which answers 400 INVALID_IMAGE_FORMAT."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY,
                               validate=False) as client:
        with pytest.raises(na.BadRequestError) as caught:
            await client.merge_face(b"this is not an image", make_image())
    assert caught.value.reason == "INVALID_IMAGE_FORMAT"
    assert emulator.stats.requests == 1


async def test_validate_false_sends_a_tiny_image_the_server_refuses_once(emulator: Emulator) -> None:
    """Unchecked, a 12x12 image reaches the server: 400 INVALID_IMAGE_SIZE, not retried."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY,
                               validate=False) as client:
        with pytest.raises(na.BadRequestError) as caught:
            await client.merge_face(make_image(size=(12, 12)), make_image())
    assert (caught.value.reason, caught.value.attempts) == ("INVALID_IMAGE_SIZE", 1)
    assert "face_image_file is 12x12" in str(caught.value)
    assert emulator.stats.requests == 1


async def test_png_with_data_after_its_end_is_sent(emulator: Emulator) -> None:
    """A PNG with bytes after a complete IEND passes the checks (as JPEG data after EOI does) and is merged."""
    png = make_image()
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client:
        result = await client.merge_face(png + b"appended metadata" * 50, make_image(seed=2))
        assert result.to_pil().size == (128, 128)
        with pytest.raises(na.InvalidImageError) as caught:  # cut before its IEND, then more data
            await client.merge_face(png[:-12] + b"appended metadata" * 50, make_image(seed=2))
    assert caught.value.rule == "truncated"
    assert emulator.stats.requests == 1
