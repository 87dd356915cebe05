"""Measuring a client process (RSS, CPU) and the CPU floor of this machine.

RSS: the kernel's own high-water mark (``VmHWM``), reset after imports by
writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so the peak is the
run's and not the import's; ``ru_maxrss`` where that is not possible.

The floor: the least CPU any client must spend per job on this machine, the
cost of base64-encoding both inputs and decoding the result with the fastest
codec available, plus pushing the request and pulling the response through a
loopback TCP socket (each side timed with its own thread's CPU clock).

Beside it, for reference, the file work every client in the grid also does:
reading the inputs from the page cache and writing the result to a new file
in the results folder, at the cheapest piece size.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Floor",
    "busy_share",
    "FloorModel",
    "cpu_seconds",
    "current_rss",
    "measure_floor_model",
    "peak_rss",
    "reset_peak_rss",
]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """This process's resident set size now, in bytes."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:  # not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size in bytes (since the last reset where supported)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def busy_share(seconds: float = 1.0) -> float:
    """Share of all the machine's CPU time spent busy over the next ``seconds`` (0..1)."""
    import psutil

    times = psutil.cpu_times_percent(interval=seconds)
    return float(100.0 - times.idle - getattr(times, "iowait", 0.0)) / 100.0


def cpu_seconds() -> float:
    """User plus system CPU seconds of this process (all its threads)."""
    times = os.times()
    return times.user + times.system


@dataclass(frozen=True)
class FloorModel:
    """Per-byte CPU costs on this machine, in seconds per byte."""

    codec: str
    encode: float  # per input byte encoded
    decode: float  # per base64 byte decoded
    send: float  # per byte sent over loopback TCP
    recv: float  # per byte received over loopback TCP
    read: float = 0.0  # per input byte read from the page cache (0: not measured)
    write: float = 0.0  # per output byte written to a new file in the results folder

    def floor(self, input_bytes: int, output_bytes: int) -> Floor:
        """The floor for one job with these raw input and output sizes."""
        request = 4 * ((input_bytes + 2) // 3)  # both images as base64 (close enough)
        response = 4 * ((output_bytes + 2) // 3)
        return Floor(
            encode=self.encode * input_bytes,
            decode=self.decode * response,
            loopback=self.send * request + self.recv * response,
            files=self.read * input_bytes + self.write * output_bytes,
        )


@dataclass(frozen=True)
class Floor:
    """CPU seconds one job cannot avoid."""

    encode: float
    decode: float
    loopback: float
    files: float = 0.0  # reading the inputs and writing the result (not in the total)

    @property
    def total(self) -> float:
        """Seconds of CPU per job: issue 5's floor (base64 and loopback only)."""
        return self.encode + self.decode + self.loopback

    @property
    def with_files(self) -> float:
        """The floor plus the file work every client in the grid does, seconds."""
        return self.total + self.files


#: Piece sizes tried for the codec (multiples of 3; 0 means the whole buffer).
_CHUNKS = (0, 48 * 1024, 384 * 1024, 3 * 1024 * 1024)


def _chunked(codec: Callable[[memoryview], bytes], data: bytes, chunk: int) -> Callable[[], None]:
    """A function running ``codec`` over ``data`` in pieces of ``chunk`` bytes."""
    view = memoryview(data)
    step = chunk or len(data)

    def work() -> None:
        for start in range(0, len(view), step):
            codec(view[start : start + step])

    return work


def _best_of(repeats: int, work: Callable[[], object],
             after: Callable[[], object] | None = None) -> float:
    """The least CPU seconds of ``repeats`` calls of ``work``; ``after`` runs untimed after each."""
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        work()
        best = min(best, time.thread_time() - start)
        if after is not None:
            after()
    return best


def _loopback_costs(total: int, chunk: int = 256 * 1024) -> tuple[float, float]:
    """(send, recv) CPU seconds per byte moving ``total`` bytes over 127.0.0.1 TCP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    listener.close()
    recv_cpu: list[float] = []

    def drain() -> None:
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        got = 0
        start = time.thread_time()
        while got < total:
            count = receiver.recv_into(view)
            if not count:
                break
            got += count
        recv_cpu.append(time.thread_time() - start)

    thread = threading.Thread(target=drain)
    thread.start()
    payload = memoryview(os.urandom(chunk))
    start = time.thread_time()
    sent = 0
    while sent < total:
        sender.sendall(payload)
        sent += chunk
    send_cpu = time.thread_time() - start
    thread.join()
    sender.close()
    receiver.close()
    return send_cpu / sent, recv_cpu[0] / sent


#: Piece sizes tried for file reads and writes.
_FILE_CHUNKS = (384 * 1024, 1024 * 1024, 4 * 1024 * 1024)


def _file_costs(data: bytes, inputs: Path, results: Path) -> tuple[float, float]:
    """(read, write) CPU seconds per byte: a page-cached file read, a new file written."""
    source = inputs / "floor-read.bin"
    source.write_bytes(data)
    buffer = memoryview(bytearray(max(_FILE_CHUNKS)))

    def read(chunk: int) -> Callable[[], None]:
        def work() -> None:
            fd = os.open(source, os.O_RDONLY)
            try:
                offset = 0
                while got := os.preadv(fd, [buffer[:chunk]], offset):
                    offset += got
            finally:
                os.close(fd)
        return work

    view = memoryview(data)
    # One name, removed (untimed) after each write: each write still makes a
    # new file, and no 32 MiB copies pile up in a RAM-backed results folder.
    target = results / "floor-write.bin"

    def write(chunk: int) -> Callable[[], None]:
        def work() -> None:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for start in range(0, len(view), chunk):
                    os.write(fd, view[start : start + chunk])
            finally:
                os.close(fd)
        return work

    try:
        read(len(buffer))()  # into the page cache
        read_cost = min(_best_of(5, read(chunk)) for chunk in _FILE_CHUNKS) / len(data)
        write_cost = min(_best_of(5, write(chunk), after=target.unlink)
                         for chunk in _FILE_CHUNKS) / len(data)
    finally:
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
    return read_cost, write_cost


def measure_floor_model(sample: int = 32 * 1024 * 1024, *, inputs: Path | None = None,
                        results: Path | None = None) -> FloorModel:
    """Measure the per-byte costs with the fastest codec (best of several runs).

    With ``inputs`` and ``results`` folders, also the file costs (reading from
    the first, writing into the second), for reference beside the floor.
    """
    from novita_async._b64 import CODEC, b64decode_strict, b64encode

    raw = os.urandom(sample)
    encoded = b64encode(raw)
    # Whole buffers pay a page fault per 4 KiB of fresh output; a streaming
    # codec reuses warm memory and runs ~10x faster.  The floor is the cheapest.
    encode = min(_best_of(5, _chunked(b64encode, raw, chunk)) for chunk in _CHUNKS) / len(raw)
    decode = min(
        _best_of(5, _chunked(b64decode_strict, encoded, chunk // 3 * 4)) for chunk in _CHUNKS
    ) / len(encoded)
    # Where the kernel does the work (sender or receiver side) depends on the
    # write size; take the write size cheapest for both sides together, and
    # the best of three runs of it.
    costs = [
        min((_loopback_costs(256 * 1024 * 1024, chunk) for _ in range(3)), key=sum)
        for chunk in (64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
    ]
    send, recv = min(costs, key=sum)
    read, write = _file_costs(raw, inputs, results) if inputs and results else (0.0, 0.0)
    return FloorModel(codec=CODEC, encode=encode, decode=decode, send=send, recv=recv,
                      read=read, write=write)
