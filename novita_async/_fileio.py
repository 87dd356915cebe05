"""Where the client's blocking file-system calls run: on the event loop or in a worker thread.

A worker thread keeps a slow disk from stalling the event loop, but each hop
costs far more than the calls it carries when the disk is fast: measured on a
2-vCPU VM, small images at 128 requests in flight, the two hops of a job
(inputs' stat and header check; the result's write and rename) cost ~0.35 ms
of CPU each in wake-ups and GIL hand-offs, against tens of microseconds for
the calls.  And work that holds the GIL (Pillow reading a header) runs no
sooner in a thread: the loop waits for the GIL instead.

So, in ``"auto"`` mode (the default):

* The first call that touches a folder runs in a worker thread, and there
  learns the folder's file system (its device, looked up in
  ``/proc/self/mountinfo``).
* Later calls whose folders are all on local file systems (ext4, xfs, btrfs,
  tmpfs, ...) run on the event loop, timed.
* A folder whose calls turn slow (a cold disk, big files, a stalled journal)
  goes to worker threads for good: when most of its recent calls on the loop
  (:data:`SLOW_OF_LAST` of the last :data:`RECENT_CALLS`) took more than
  :data:`SLOW_CALL_SECONDS`.  Most, not one: a call is also slow when the
  loop's thread was preempted or collected garbage during it (measured up to
  140 ms), or imported a module on first use, none of which says anything
  about the disk.
* Network and FUSE file systems, file systems not known to be local, and
  systems without ``/proc/self/mountinfo`` always use worker threads.

``"threads"`` sends every call to a worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, Literal, TypeVar

import anyio.to_thread

from novita_async._errors import ConfigurationError

__all__ = [
    "FILE_IO_MODES",
    "RECENT_CALLS",
    "SLOW_OF_LAST",
    "SLOW_CALL_SECONDS",
    "FileCalls",
    "FileIO",
    "Handover",
    "THREADS_ONLY",
    "folder_of",
    "parse_mountinfo",
]

logger = logging.getLogger("novita_async")

T = TypeVar("T")

#: How file-system calls run: see the module docstring.
FileIO = Literal["auto", "threads"]
FILE_IO_MODES: tuple[str, ...] = ("auto", "threads")

#: An inline call slower than this (seconds) counts as slow.
SLOW_CALL_SECONDS = 0.005
#: How many of a folder's latest inline calls are remembered.
RECENT_CALLS = 16
#: A folder with this many slow calls among its last RECENT_CALLS moves to worker threads.
SLOW_OF_LAST = 12

_RECENT_MASK = (1 << RECENT_CALLS) - 1

#: File systems whose calls touch only this machine's memory and disks.
_LOCAL_TYPES = frozenset({
    "bcachefs", "btrfs", "exfat", "ext2", "ext3", "ext4", "f2fs", "hfsplus", "jfs",
    "nilfs2", "ntfs3", "overlay", "ramfs", "reiserfs", "tmpfs", "vfat", "xfs", "zfs",
})

#: Folders remembered per client before the memory is cleared (a bound, not a cache policy).
_MAX_FOLDERS = 4096


def folder_of(path: str | os.PathLike[str]) -> str:
    """The folder a path's file-system calls are judged by (its parent, as written)."""
    return os.path.dirname(os.fspath(path)) or "."


def parse_mountinfo(text: str) -> dict[int, str]:
    """Map each mounted device number to its file-system type, from ``/proc/*/mountinfo``.

    A line reads ``ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [TAGS...] - TYPE SOURCE ...``.
    Malformed lines are skipped.
    """
    types: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split()
        try:
            major, minor = fields[2].split(":")
            types[os.makedev(int(major), int(minor))] = fields[fields.index("-", 6) + 1]
        except (IndexError, ValueError):
            continue
    return types


_mount_types: dict[int, str] = {}
_mount_types_lock = threading.Lock()


def _filesystem_type(device: int) -> str | None:
    """The type of the file system on ``device``, re-reading the mount table for a new one."""
    with _mount_types_lock:
        if device not in _mount_types:
            try:
                with open("/proc/self/mountinfo") as handle:
                    _mount_types.update(parse_mountinfo(handle.read()))
            except OSError:  # not Linux, or /proc not mounted
                pass
            # Remember a device the table does not know (a btrfs subvolume), so
            # it costs one read of the table, not one per call.
            _mount_types.setdefault(device, "")
        return _mount_types[device] or None


def _on_local_filesystem(folder: str) -> bool | None:
    """Whether ``folder`` is on a file system known to be local; None if it cannot be looked up (blocking)."""
    try:
        device = os.stat(folder).st_dev
    except (OSError, ValueError):
        # Not there yet (an output folder before its first result), not ours,
        # or a name no folder can have (a NUL: ValueError).
        return None
    return _filesystem_type(device) in _LOCAL_TYPES


class FileCalls:
    """Runs one client's blocking file-system calls, inline where that is cheap and safe.

    Args:
        mode: ``"auto"`` (inline on local file systems while calls stay fast)
            or ``"threads"`` (always a worker thread).
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode not in FILE_IO_MODES:
            raise ConfigurationError(
                f"file_io must be one of {', '.join(map(repr, FILE_IO_MODES))}, got {mode!r}"
            )
        self.mode = mode
        # Folder -> its last RECENT_CALLS calls on the event loop, a bit each (1: slow),
        # or None: its calls go to worker threads.  A folder not here is not
        # known yet.
        self._inline: dict[str, int | None] = {}

    def runs_inline(self, folders: Iterable[str]) -> bool:
        """Whether a call touching ``folders`` would run on the event loop now."""
        inline = self._inline
        return self.mode == "auto" and all(inline.get(folder) is not None for folder in folders)

    async def run(self, folders: tuple[str, ...], call: Callable[[], T]) -> T:
        """Run ``call`` (blocking file-system work in ``folders``) and return its result.

        Like ``anyio.to_thread.run_sync``, a call once started runs to its end
        even if the caller is cancelled.
        """
        if self.runs_inline(folders):
            started = time.perf_counter()
            try:
                return call()
            finally:
                self._timed(folders, time.perf_counter() - started)
        unknown = [folder for folder in folders if folder not in self._inline]
        if self.mode != "auto" or not unknown:
            return await anyio.to_thread.run_sync(call)

        verdicts: dict[str, int | None] = {}

        def call_then_classify() -> T:
            try:
                return call()
            finally:
                # After the call: it may have created the folder (an output's).  A
                # folder still missing stays unknown, to be learnt by a later call.
                for folder in unknown:
                    local = _on_local_filesystem(folder)
                    if local is not None:
                        verdicts[folder] = 0 if local else None

        try:
            return await anyio.to_thread.run_sync(call_then_classify)
        finally:
            if len(self._inline) + len(verdicts) > _MAX_FOLDERS:
                self._inline.clear()
            self._inline.update(verdicts)

    def _timed(self, folders: tuple[str, ...], elapsed: float) -> None:
        """Record one inline call's seconds against its folders."""
        slow_call = elapsed > SLOW_CALL_SECONDS
        slow: list[str] = []
        for folder in folders:
            recent = self._inline.get(folder)
            if recent is None:
                continue  # sent to threads meanwhile
            recent = ((recent << 1) | slow_call) & _RECENT_MASK
            if slow_call and bin(recent).count("1") >= SLOW_OF_LAST:
                self._inline[folder] = None
                slow.append(folder)
            else:
                self._inline[folder] = recent
        if slow:
            logger.info(
                "file system calls in %s are slow on the event loop (the last took %.1f ms); "
                "they run in worker threads from now on", ", ".join(slow), elapsed * 1e3,
            )


#: Worker threads for every call: the default of file users not given a client's FileCalls
#: (stateless in this mode, so one instance serves them all).
THREADS_ONLY = FileCalls("threads")


class Handover(Generic[T]):
    """A blocking call's result that its caller may not be there to take, released if not.

    A caller awaiting a worker thread can be cancelled (a native
    ``task.cancel()``) while the thread runs on; whatever the thread then
    returns, such as an open file, would be lost.  Run the call through
    :meth:`run_in`: if the await fails, the result is released now if the
    thread has finished, else as soon as it does.

    Args:
        call: The blocking call.
        release: What undoes its result (closes what it opened).
    """

    def __init__(self, call: Callable[[], T], release: Callable[[T], None]) -> None:
        self._call, self._release = call, release
        self._lock = threading.Lock()
        self._results: list[T] = []
        self._abandoned = False

    def __call__(self) -> T:
        result = self._call()
        with self._lock:
            if self._abandoned:
                self._release(result)
            else:
                self._results.append(result)
        return result

    async def run_in(self, run: Callable[[Callable[[], T]], Awaitable[T]]) -> T:
        """``await run(call)`` (``run`` hands the call to a worker thread), abandoning it if that fails."""
        try:
            return await run(self)
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """The caller will not take the result: release it now, or when the call returns."""
        with self._lock:
            self._abandoned = True
            results, self._results = self._results, []
        for result in results:
            self._release(result)
