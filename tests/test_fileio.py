"""Where file-system calls run: on the event loop for fast local folders, else in worker threads."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

import novita_async as na
from novita_async import _sources
from novita_async._fileio import (
    RECENT_CALLS,
    SLOW_CALL_SECONDS,
    SLOW_OF_LAST,
    FileCalls,
    _on_local_filesystem,
    folder_of,
    parse_mountinfo,
)
from novita_async._source_base import pread_full
from novita_async.emulator import Emulator

from .batch_support import write_inputs

pytestmark = pytest.mark.anyio

MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid shared:5 - proc proc rw
24 22 0:22 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw,size=1024k
25 22 0:45 / /mnt/share rw,relatime shared:40 master:3 - nfs4 server:/export rw,vers=4.2
26 22 0:46 / /mnt/sshfs rw - fuse.sshfs user@host: rw
this line is not a mount
27 22 8:17 / /data rw no-separator-here ext4
"""


def _local_or_skip(folder: Path) -> None:
    if not _on_local_filesystem(str(folder)):
        pytest.skip(f"{folder} is not on a local file system here")


def test_parse_mountinfo_maps_devices_to_types() -> None:
    """Each well-formed line maps major:minor to the type after the separator; others are skipped."""
    types = parse_mountinfo(MOUNTINFO)
    assert types == {
        os.makedev(253, 1): "ext4",
        os.makedev(0, 21): "proc",
        os.makedev(0, 22): "tmpfs",
        os.makedev(0, 45): "nfs4",
        os.makedev(0, 46): "fuse.sshfs",
    }


def test_folder_of_a_bare_file_name_is_the_current_folder() -> None:
    """A path without a folder is judged by '.'; others by their parent as written."""
    assert folder_of("photo.png") == "."
    assert folder_of(Path("a/b/photo.png")) == os.path.join("a", "b")


def test_unknown_mode_is_refused_with_the_choices() -> None:
    """A file_io value that is not a mode names the parameter and the modes."""
    with pytest.raises(na.ConfigurationError, match=r"file_io must be one of 'auto', 'threads', got 'fast'"):
        na.NovitaClient(api_key="sk_test", file_io="fast")  # type: ignore[arg-type]


def test_missing_folder_is_not_judged() -> None:
    """A folder that cannot be looked up is neither local nor remote yet."""
    assert _on_local_filesystem("/nonexistent/novita_async/folder") is None


async def _where(calls: FileCalls, folder: Path, seconds: float = 0.0) -> int:
    def call() -> int:
        if seconds:
            time.sleep(seconds)
        return threading.get_ident()

    return await calls.run((str(folder),), call)


async def test_auto_learns_a_local_folder_in_a_thread_then_runs_inline(tmp_path: Path) -> None:
    """The first call in a folder runs in a worker thread; later ones run on the loop."""
    _local_or_skip(tmp_path)
    calls = FileCalls("auto")
    loop_thread = threading.get_ident()
    assert await _where(calls, tmp_path) != loop_thread
    assert calls.runs_inline((str(tmp_path),))
    assert await _where(calls, tmp_path) == loop_thread
    # A folder it has not met yet goes to a thread again, and so does a call touching it.
    other = tmp_path / "other"
    other.mkdir()
    assert not calls.runs_inline((str(tmp_path), str(other)))


async def test_threads_mode_never_runs_inline(tmp_path: Path) -> None:
    """file_io='threads': every call in a worker thread, however fast the folder."""
    calls = FileCalls("threads")
    loop_thread = threading.get_ident()
    for _ in range(3):
        assert await _where(calls, tmp_path) != loop_thread
    assert not calls.runs_inline((str(tmp_path),))


async def test_a_missing_folder_is_learnt_once_it_exists(tmp_path: Path) -> None:
    """Calls in a folder that does not exist yet go to threads, until one finds it (an output folder)."""
    _local_or_skip(tmp_path)
    folder = tmp_path / "created-later"
    calls = FileCalls("auto")
    loop_thread = threading.get_ident()
    for _ in range(3):
        assert await _where(calls, folder) != loop_thread
    folder.mkdir()
    assert await _where(calls, folder) != loop_thread  # learnt now
    assert await _where(calls, folder) == loop_thread


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc here")
async def test_a_folder_not_known_to_be_local_stays_in_threads() -> None:
    """A folder on a file system outside the local list (here /proc) is never inline."""
    calls = FileCalls("auto")
    loop_thread = threading.get_ident()
    for _ in range(3):
        assert await calls.run(("/proc/self",), threading.get_ident) != loop_thread
    assert not calls.runs_inline(("/proc/self",))


async def test_mostly_slow_calls_move_a_folder_to_threads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SLOW_OF_LAST slow calls of the last RECENT_CALLS: the folder goes to threads for good, and it is logged."""
    _local_or_skip(tmp_path)
    calls = FileCalls("auto")
    loop_thread = threading.get_ident()
    await _where(calls, tmp_path)  # learnt
    slow = SLOW_CALL_SECONDS * 1.5
    with caplog.at_level(logging.INFO, logger="novita_async"):
        for _ in range(SLOW_OF_LAST):
            assert calls.runs_inline((str(tmp_path),))
            assert await _where(calls, tmp_path, slow) == loop_thread
    assert not calls.runs_inline((str(tmp_path),))
    assert await _where(calls, tmp_path) != loop_thread
    moved = [r.getMessage() for r in caplog.records if "worker threads" in r.getMessage()]
    assert len(moved) == 1
    assert moved[0].startswith(f"file system calls in {tmp_path} are slow on the event loop")


async def test_an_occasional_slow_call_does_not_move_a_folder(tmp_path: Path) -> None:
    """One slow call in four (a preemption, a garbage collection) leaves the folder inline."""
    _local_or_skip(tmp_path)
    calls = FileCalls("auto")
    await _where(calls, tmp_path)
    slow = SLOW_CALL_SECONDS * 1.5
    for round_ in range(3 * RECENT_CALLS):
        await _where(calls, tmp_path, slow if round_ % 4 == 0 else 0.0)
    assert calls.runs_inline((str(tmp_path),))


async def test_inline_call_errors_reach_the_caller(tmp_path: Path) -> None:
    """An exception raised by an inline call propagates unchanged."""
    _local_or_skip(tmp_path)
    calls = FileCalls("auto")
    await _where(calls, tmp_path)

    def fails() -> None:
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "x"))

    assert calls.runs_inline((str(tmp_path),))
    with pytest.raises(FileNotFoundError):
        await calls.run((str(tmp_path),), fails)


@pytest.mark.parametrize("mode", [pytest.param("auto", id="auto"), pytest.param("threads", id="threads")])
async def test_client_results_are_the_same_in_both_modes(
    tmp_path: Path, emulator: Emulator, mode: str
) -> None:
    """A batch writes the same results with file calls inline or in threads; auto goes inline for a local folder."""
    pairs = write_inputs(tmp_path / "in", 6)
    out = tmp_path / "out"
    jobs = [na.MergeJob(face, image, id=f"job-{i}") for i, (face, image) in enumerate(pairs)]
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, file_io=mode,  # type: ignore[arg-type]
                               max_concurrency=2) as client:
        results = [r async for r in client.batch(jobs, output_dir=out, progress=False)]
        inline = client._files.runs_inline((str(out), str(tmp_path / "in")))
        learnt = dict(client._files._inline)
    assert [r.status for r in results] == [na.JobStatus.OK] * 6
    assert sorted(p.name for p in out.iterdir()) == sorted(f"job-{i}.png" for i in range(6))
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]
    expected = mode == "auto" and _on_local_filesystem(str(out)) and _on_local_filesystem(str(tmp_path / "in"))
    assert inline is expected, learnt


def _tmpfs_folder_without_nowait() -> Path | None:
    """A fresh folder on /dev/shm when it is a local file system without preadv2(RWF_NOWAIT)."""
    shm = Path("/dev/shm")
    if _sources._RWF_NOWAIT is None or not shm.is_dir() or not _on_local_filesystem(str(shm)):
        return None
    probe = shm / f"novita-nowait-{os.getpid()}"
    probe.write_bytes(b"x")
    try:
        fd = os.open(probe, os.O_RDONLY)
        try:
            os.preadv(fd, [bytearray(1)], 0, _sources._RWF_NOWAIT)
            return None  # supported here: the fallback read is not needed
        except OSError:
            return probe.parent
        finally:
            os.close(fd)
    finally:
        probe.unlink()


@pytest.mark.parametrize("mode", [pytest.param("auto", id="auto"), pytest.param("threads", id="threads")])
async def test_reads_the_page_cache_cannot_serve_follow_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """On a local folder without RWF_NOWAIT (tmpfs) an input is read on the loop in auto mode, in threads otherwise."""
    shm = _tmpfs_folder_without_nowait()
    if shm is None:
        pytest.skip("needs /dev/shm as a local file system without preadv2(RWF_NOWAIT)")
    folder = shm / f"novita-test-{os.getpid()}-{mode}"
    folder.mkdir()
    try:
        data = os.urandom(3 * 300 + 7)
        path = folder / "face.bin"
        path.write_bytes(data)
        calls = FileCalls(mode)
        await calls.run((str(folder),), lambda: None)  # the folder is learnt
        threads: list[int] = []
        real = pread_full

        def recording(fd: int, view: memoryview, offset: int) -> int:
            threads.append(threading.get_ident())
            return real(fd, view, offset)

        monkeypatch.setattr(_sources, "pread_full", recording)
        source = _sources._source_sync(path, "face_image", calls)
        read = b"".join([bytes(piece) async for piece in source.chunks(300)])
        assert read == data
        assert threads, "the fallback read was not used"
        loop_thread = threading.get_ident()
        assert all((ident == loop_thread) is (mode == "auto") for ident in threads)
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
