"""Where a merged image goes: memory, or a file that appears atomically.

A file result is written to a hidden temporary file in the destination's
folder and renamed into place only when the whole image has arrived, so no
reader (and no resumed batch) ever sees a partial image under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import stat
from pathlib import Path

import anyio

from novita_async._errors import OutputError
from novita_async._fileio import THREADS_ONLY, FileCalls, folder_of

__all__ = [
    "FileSink",
    "MemorySink",
    "Sink",
    "atomic_write_bytes",
    "check_writable",
    "NAME_MAX_BYTES",
    "create_temp_file",
    "cut_to_bytes",
    "existing_kind",
    "not_a_file_error",
    "sweep_stale_temp_files",
    "temp_prefix",
]

#: Decoded bytes are gathered up to this size before one write (in a thread
#: where the folder needs one), so a large image costs tens of calls, not thousands.
_WRITE_BATCH = 1024 * 1024


#: Temporary results are created like a plain open() would (mode 0666 less the umask).
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


#: Temporary files are named ``.<name>.~<host>-<pid>~<random>.part``: hidden,
#: and marked with their writer so a later run can tell a live one from one
#: left by a killed process.
_TEMP_OWNER = re.compile(r"^\..*\.~(?P<host>.+)-(?P<pid>\d+)~[^~]*\.part$")


def _writer_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


#: ``<host>-<pid>`` of this process, refreshed in a forked child (two system
#: calls saved per result).
_WRITER = _writer_tag()


def _refresh_writer_tag() -> None:
    global _WRITER
    _WRITER = _writer_tag()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_refresh_writer_tag)


#: Longest file name most file systems take (ext4, xfs, btrfs, APFS), in bytes.
NAME_MAX_BYTES = 255
#: What a temporary name adds to its prefix: 8 hex digits and ".part".
_TEMP_SUFFIX_BYTES = 8 + len(".part")


def temp_prefix(path: Path) -> str:
    """The prefix of the temporary file that becomes ``path``.

    The result's own name is cut to fit: a result named in 200 bytes or more
    is a legal name whose temporary file's name would not be.  (The name in
    it only tells a reader which result a temporary file is for.)
    """
    tag = f".~{_WRITER}~"
    room = NAME_MAX_BYTES - 1 - _TEMP_SUFFIX_BYTES - len(tag.encode("utf-8", "surrogateescape"))
    return f".{cut_to_bytes(path.name, max(room, 1))}{tag}"


def cut_to_bytes(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes of UTF-8, never inside a character (pure)."""
    return name.encode("utf-8", "surrogateescape")[:limit].decode("utf-8", "ignore")


def create_temp_file(path: Path) -> tuple[int, str]:
    """Create the hidden temporary file that becomes ``path``; return its descriptor and name (blocking).

    Made with the mode a plain ``open()`` gives (0666 less the umask), so no
    chmod is needed before it is renamed into place.
    """
    prefix = os.path.join(path.parent, temp_prefix(path))
    for _ in range(100):
        name = f"{prefix}{secrets.token_hex(4)}.part"
        try:
            return os.open(name, _CREATE_FLAGS, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", prefix)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def sweep_stale_temp_files(folder: Path) -> int:
    """Delete temporary result files in ``folder`` left by killed processes on this host (blocking).

    Files of live writers, and of writers on other hosts sharing the folder,
    are left alone. Returns how many were removed.
    """
    host = socket.gethostname()
    removed = 0
    try:
        entries = os.scandir(folder)
    except OSError:
        return 0
    with entries:
        for entry in entries:
            match = _TEMP_OWNER.match(entry.name) if entry.name.endswith(".part") else None
            if match is None or match["host"] != host or _pid_alive(int(match["pid"])):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed


#: Buffers per writev() call: well under every system's IOV_MAX (1024 on Linux).
_IOV_MAX = 512


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write every part to ``fd`` (blocking), with one writev() per batch where there is one.

    One system call instead of one per part: each call releases the GIL and
    takes it back, and taking it back while the event loop holds it costs a
    futex wait and a context switch or two.
    """
    views = [memoryview(part) for part in parts if part]
    if not hasattr(os, "writev"):  # pragma: no cover - Windows
        for view in views:
            while view:
                view = view[os.write(fd, view):]
        return
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        done = 0
        while done < len(views) and written >= len(views[done]):
            written -= len(views[done])
            done += 1
        del views[:done]
        if written:
            views[0] = views[0][written:]


class Sink:
    """Receives the decoded image of one attempt."""

    async def write(self, data: bytes) -> None:
        """Append decoded bytes."""
        raise NotImplementedError

    async def commit(self) -> None:
        """The image is complete: make it visible."""
        raise NotImplementedError

    async def discard(self) -> None:
        """The attempt failed: drop whatever was written."""
        raise NotImplementedError


class MemorySink(Sink):
    """Collects the image in memory (``output=None``)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.data: bytes | None = None

    async def write(self, data: bytes) -> None:
        self._parts.append(data)

    async def commit(self) -> None:
        self.data = b"".join(self._parts)
        self._parts.clear()

    async def discard(self) -> None:
        self._parts.clear()


class FileSink(Sink):
    """Streams the image to a temporary file beside ``path``, renamed in on commit."""

    def __init__(self, path: Path, files: FileCalls | None = None) -> None:
        self.path = path
        self._files = files if files is not None else THREADS_ONLY
        self._folders = (folder_of(path),)
        self._fd: int | None = None
        self._tmp: str | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0

    def _fail(self, exc: OSError, action: str) -> OutputError:
        return OutputError(
            f"cannot {action} {self.path}: {exc.strerror or exc}. "
            "Check that the folder exists, is writable and has free space."
        )

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd, self._tmp = create_temp_file(self.path)
        except OSError as exc:
            raise self._fail(exc, "create a file in the folder of") from exc

    def _flush_sync(self, parts: list[bytes]) -> None:
        if self._fd is None:
            self._open()
        assert self._fd is not None
        try:
            _write_all(self._fd, parts)
        except OSError as exc:
            raise self._fail(exc, "write") from exc

    async def _flush(self) -> None:
        parts, self._pending, self._pending_size = self._pending, [], 0
        await self._files.run(self._folders, lambda: self._flush_sync(parts))

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= _WRITE_BATCH:
            await self._flush()

    def _commit_sync(self) -> None:
        assert self._fd is not None and self._tmp is not None
        try:
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.path)
            self._tmp = None
        except OSError as exc:
            raise self._fail(exc, "move the result into place at") from exc

    async def commit(self) -> None:
        parts, self._pending, self._pending_size = self._pending, [], 0

        def flush_and_commit() -> None:
            # One thread hop, not two: a small result is written and renamed at once.
            self._flush_sync(parts)
            self._commit_sync()

        await self._files.run(self._folders, flush_and_commit)

    def _discard_sync(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None

    async def discard(self) -> None:
        self._pending.clear()
        if self._fd is None and self._tmp is None:
            # Nothing was written (an error status): no thread hop, so a batch
            # sees a fatal error before another request can start.
            return
        # Shielded: a cancelled attempt must still remove its temporary file.
        with anyio.CancelScope(shield=True):
            await self._files.run(self._folders, self._discard_sync)


def check_writable(path: Path) -> None:
    """Raise :class:`OutputError` now if a result could not be written to ``path`` (blocking).

    Run before a request is sent: a folder that cannot take the result (read-only,
    not a folder, no permission) would otherwise be found out only after the
    server had done, and billed, the work.  Creates the folder, like the sink.
    """
    sink = FileSink(path)
    try:
        sink._open()  # the same folder creation and temporary file the real write uses
    finally:
        sink._discard_sync()


#: What is at an output path that a result must not replace, by the test that finds it.
_NOT_FILES = (
    (stat.S_ISDIR, "an existing folder"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def existing_kind(path: Path) -> str | None:
    """What ``path`` is when it exists and is not a regular file (blocking: one lstat); else None.

    A result is renamed into place, and a rename replaces whatever has the
    name: ``output="/dev/null"`` run as root would put a file where the
    device was.  A symbolic link is not followed (the link, not its target,
    would be replaced).
    """
    try:
        mode = os.lstat(path).st_mode
    except (OSError, ValueError):
        return None  # not there yet (or a name the system refuses, found when writing)
    if stat.S_ISREG(mode):
        return None
    return next((name for is_kind, name in _NOT_FILES if is_kind(mode)), "not a regular file")


def not_a_file_error(path: Path, kind: str) -> OutputError:
    """The error for an output path that holds something other than a regular file."""
    if kind == "an existing folder":
        return OutputError(f"the output {path} is an existing folder, not a file: give the "
                           f"result a file name (such as {path / 'merged.png'})")
    return OutputError(f"the output {path} is {kind}, not a regular file, and writing the result "
                       "would replace it: give a file path (or no output, to keep the result in memory)")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (blocking; used by ``save``).

    Raises:
        OutputError: ``path`` is not a regular file, or cannot be written.
    """
    kind = existing_kind(path)
    if kind is not None:
        raise not_a_file_error(path, kind)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp_file(path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}. Check that the folder "
                              "exists, is writable and has free space.") from exc
        raise
