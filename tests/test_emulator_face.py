"""The emulator with the real face merge, driven through the client over loopback."""

from __future__ import annotations

import io
import time

import anyio
import pytest
from PIL import Image

pytest.importorskip("cv2")  # the real engine comes with the [local] extra

import aiohttp

import novita_async as na
from novita_async._samples import cartoon_face
from novita_async.emulator import Emulator, EmulatorConfig

from .conftest import FAST_RETRY

pytestmark = [pytest.mark.anyio, pytest.mark.local]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _gradient(size: tuple[int, int] = (400, 300)) -> bytes:
    """A smooth gradient: no face for any detector."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    return _png(image)


async def test_face_engine_is_used_and_result_has_target_size() -> None:
    """With [local] installed the emulator merges real faces; the result has the target's size."""
    face = _png(cartoon_face((384, 384), skin=(120, 80, 60), seed=1))
    target = _png(cartoon_face((640, 480), skin=(236, 200, 180), seed=2))
    async with Emulator(EmulatorConfig(engine="auto")) as emu:
        assert emu.engine.startswith("face/")
        async with na.NovitaClient(api_key=emu.api_key, base_url=emu.url, retry=FAST_RETRY) as client:
            result = await client.merge_face(face, target)
    merged = result.to_pil()
    assert merged.size == (640, 480)
    original = Image.open(io.BytesIO(target)).convert("RGB")
    # Far from the face (the top-left corner) nothing changed; the face itself did.
    assert merged.crop((0, 0, 40, 40)).tobytes() == original.crop((0, 0, 40, 40)).tobytes()
    assert merged.crop((260, 200, 380, 300)).tobytes() != original.crop((260, 200, 380, 300)).tobytes()


@pytest.mark.parametrize(
    ("which", "expected_field"),
    [pytest.param("face", "face_image_file", id="no-face-in-face"),
     pytest.param("image", "image_file", id="no-face-in-target")],
)
async def test_no_face_is_a_typed_error(which: str, expected_field: str) -> None:
    """An input without a face gives NoFaceDetectedError (400 IMAGE_NO_FACE_DETECTED), not retried."""
    face = _gradient() if which == "face" else _png(cartoon_face())
    target = _gradient() if which == "image" else _png(cartoon_face())
    async with Emulator(EmulatorConfig(engine="face")) as emu:
        async with na.NovitaClient(api_key=emu.api_key, base_url=emu.url, retry=FAST_RETRY) as client:
            with pytest.raises(na.NoFaceDetectedError) as caught:
                await client.merge_face(face, target)
        assert emu.stats.requests == 1
    assert caught.value.status == 400
    assert caught.value.reason == "IMAGE_NO_FACE_DETECTED"
    assert expected_field in caught.value.message


async def test_emulator_stays_responsive_while_merges_run() -> None:
    """Merges run in worker threads: other requests are answered while a batch of merges runs."""
    face = _png(cartoon_face((2048, 2048), seed=3))
    target = _png(cartoon_face((2048, 2048), seed=4))
    config = EmulatorConfig(engine="face", merge_workers=1)
    async with Emulator(config) as emu:
        health_times: list[float] = []
        async with na.NovitaClient(api_key=emu.api_key, base_url=emu.url, retry=FAST_RETRY,
                                   max_concurrency=6) as client:
            async def probe() -> None:
                async with aiohttp.ClientSession() as session:
                    await anyio.sleep(0.05)
                    while emu.stats.in_flight or not health_times:
                        started = time.monotonic()
                        async with session.get(f"{emu.url}/_emulator/health") as response:
                            assert response.status == 200
                        health_times.append(time.monotonic() - started)
                        await anyio.sleep(0.02)

            merge_times: list[float] = []

            async def merge() -> None:
                result = await client.merge_face(face, target)
                merge_times.append(result.elapsed)

            async with anyio.create_task_group() as group:
                group.start_soon(probe)
                for _ in range(4):
                    group.start_soon(merge)
        assert emu.stats.statuses[200] == 4
    # Merges queue on one worker thread; had they run on the event loop, a health
    # request would wait out a whole merge (the shortest one takes min(merge_times)).
    assert len(health_times) >= 5
    assert sorted(health_times)[-2] < min(merge_times) / 2
