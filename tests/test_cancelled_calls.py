"""Callers cancelled at any point (a service's client went away) leave no file open behind them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
from pathlib import Path
from typing import BinaryIO

import pytest

import novita_async as na
from novita_async.emulator import Emulator, EmulatorConfig

from .conftest import FAST_RETRY, noise_png

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts descriptors in /proc/self/fd"),
]


def _open_on(folder: Path) -> int:
    """Descriptors of this process open on files under ``folder``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since it was listed
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
    return count


async def _cancel_at_every_step(client: na.NovitaClient, face: BinaryIO, image: BinaryIO, calls: int) -> int:
    """Start ``calls`` merges one after another, each cancelled after 1 to 4 turns of the loop."""
    cancelled = 0
    for index in range(calls):
        task = asyncio.ensure_future(client.merge_face(face, image))
        for _ in range(1 + index % 4):
            await asyncio.sleep(0)
        if not task.done():
            task.cancel()
            cancelled += 1
        await asyncio.gather(task, return_exceptions=True)
    return cancelled


async def test_cancelled_calls_given_open_files_close_their_copies(tmp_path: Path) -> None:
    """Open files as inputs: their check runs in a worker thread, and a caller cancelled meanwhile
    used to leave the descriptor copied for it open (162 of 400 calls)."""
    (tmp_path / "face.png").write_bytes(noise_png(1, 200))
    (tmp_path / "target.png").write_bytes(noise_png(2, 200))
    async with Emulator(EmulatorConfig(engine="composite")) as emulator:
        with (tmp_path / "face.png").open("rb") as face, (tmp_path / "target.png").open("rb") as image:
            async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client:
                await client.merge_face(face, image)
                cancelled = await _cancel_at_every_step(client, face, image, 200)
                await asyncio.sleep(0.1)  # threads the cancelled calls left running end
                gc.collect()
                assert cancelled > 50
                assert _open_on(tmp_path) == 2  # the caller's own two files
