"""One PIL image object shared by concurrent calls and batch jobs (one face onto many photos).

Pillow reads a lazily opened image from its file on first use, and keeps
``save``'s options on the image object: the client must not let two worker
threads at one image.  Every test compares what the emulator received with
what a call given a fresh image of the same file sends.
"""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest
from PIL import Image

import novita_async as na
from novita_async import _sources
from novita_async.emulator import Emulator, job_key

from .conftest import FAST_RETRY, make_image

pytestmark = pytest.mark.anyio

#: Calls (or jobs) in flight at once, all given the same image object.
CONCURRENT = 16
#: Large enough that loading it takes long enough for calls to overlap.
SIDE = 700


def _noise_file(folder: Path, fmt: str) -> Path:
    """A SIDE x SIDE picture of random pixels saved as ``fmt``; its path."""
    rng = random.Random(7)
    path = folder / f"face.{fmt.lower()}"
    Image.frombytes("RGB", (SIDE, SIDE), rng.randbytes(SIDE * SIDE * 3)).save(path, format=fmt)
    return path


def _client(emulator: Emulator) -> na.NovitaClient:
    return na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY,
                           max_concurrency=CONCURRENT)


async def _sent_face(client: na.NovitaClient, emulator: Emulator, path: Path, target: bytes) -> str:
    """The emulator's key for a call given a fresh, lazily opened image of ``path``: the reference."""
    before = set(emulator.stats.successes)
    with Image.open(path) as fresh:
        await client.merge_face(fresh, target)
    (key,) = set(emulator.stats.successes) - before
    return key


@pytest.mark.parametrize("fmt", [pytest.param("PNG", id="png"), pytest.param("JPEG", id="jpeg")])
async def test_concurrent_calls_share_one_lazily_opened_image(
    emulator: Emulator, tmp_path: Path, fmt: str
) -> None:
    """Concurrent calls given one Image.open() image all succeed and all upload its true pixels."""
    path = _noise_file(tmp_path, fmt)
    target = make_image(size=(96, 80), seed=2)
    async with _client(emulator) as client:
        reference = await _sent_face(client, emulator, path, target)
        with Image.open(path) as shared:  # not loaded yet: the calls race to load it
            results: list[BaseException | None] = []

            async def call() -> None:
                try:
                    await client.merge_face(shared, target)
                except Exception as exc:  # collected: the assertion below shows every one
                    results.append(exc)
                else:
                    results.append(None)

            async with anyio.create_task_group() as group:
                for _ in range(CONCURRENT):
                    group.start_soon(call)
    assert results == [None] * CONCURRENT
    assert emulator.stats.successes == {reference: 1 + CONCURRENT}
    assert _sources._ENCODING == {}  # nothing is kept once no call uses the image


async def test_batch_jobs_share_one_lazily_opened_face(emulator: Emulator, tmp_path: Path) -> None:
    """A batch putting one Image.open() face onto many photos: every job ok, every upload its pixels."""
    path = _noise_file(tmp_path, "PNG")
    targets = [make_image(size=(96, 80), seed=10 + i) for i in range(CONCURRENT)]
    rounds = 3  # each with a new lazily opened face: the first jobs' loads overlap in each
    async with _client(emulator) as client:
        face = _sources._encode_pil(Image.open(path))  # what a fresh image of the file sends
        for _ in range(rounds):
            with Image.open(path) as shared:
                jobs = [na.MergeJob(shared, target, id=f"j{i}") for i, target in enumerate(targets)]
                results = [result async for result in client.batch(jobs)]
            assert [(r.status, r.error) for r in results] == [(na.JobStatus.OK, None)] * len(targets)
    assert emulator.stats.successes == {job_key(face, target): rounds for target in targets}


async def test_a_change_between_calls_is_sent(emulator: Emulator, tmp_path: Path) -> None:
    """Sharing one image's encode is only among calls in flight together: a call after a change sends it."""
    path = _noise_file(tmp_path, "PNG")
    target = make_image(size=(96, 80), seed=2)
    async with _client(emulator) as client:
        with Image.open(path) as image:
            await client.merge_face(image, target)
            before = _sources._encode_pil(image)
            image.paste((255, 0, 0), (0, 0, 64, 64))
            await client.merge_face(image, target)
            after = _sources._encode_pil(image)
    assert before != after
    assert emulator.stats.successes == {job_key(before, target): 1, job_key(after, target): 1}
