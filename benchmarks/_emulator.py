"""The emulator in its own process, so its memory and CPU are not the client's."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = ["EmulatorProcess", "StatsDelta"]

API_KEY = "sk_emulator_local"


@dataclass(frozen=True)
class StatsDelta:
    """What the emulator saw between two snapshots of its counters."""

    requests: int
    statuses: dict[str, int]
    handled: int
    handling_seconds: float
    handling_cpu_seconds: float
    peak_in_flight: int
    first_request_at: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def handling_per_request(self) -> float:
        """The emulator's own seconds of work per successful request (0 if none)."""
        return self.handling_seconds / self.handled if self.handled else 0.0

    @property
    def rate_limited(self) -> int:
        """429 answers."""
        return self.statuses.get("429", 0)


class EmulatorProcess:
    """``python -m novita_async serve --port 0 ...`` as a child process.

    Args:
        latency: Seconds added to each merge.
        rpm / burst: The emulator's per-key rate limit (None: unlimited).
        engine: The merge step (``composite`` for benchmarks: cheap and deterministic).
        png_level: zlib level of its PNG results; 0 (stored, no filtering) costs the
            emulator a few memcpys instead of ~60 ms per 2 MB result, so on 2 cores
            its CPU does not crowd the client's (the results are noise: level 1
            makes them no smaller).
    """

    def __init__(self, *, latency: float = 0.2, rpm: float | None = None, burst: int = 3,
                 engine: str = "composite", png_level: int = 0) -> None:
        self.args = [sys.executable, "-m", "novita_async", "serve", "--port", "0",
                     "--latency", str(latency), "--engine", engine, "--png-level", str(png_level)]
        if rpm is not None:
            self.args += ["--rpm", str(rpm), "--burst", str(burst)]
        self.latency = latency
        self.url = ""
        self.api_key = API_KEY
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> EmulatorProcess:
        """Start it and wait for the URL line (its first line of stdout)."""
        self._process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the emulator did not start (first line: {line!r})")
        self.url = line
        return self

    def stats(self) -> dict[str, Any]:
        """The emulator's counters (GET /_emulator/stats on loopback)."""
        with urllib.request.urlopen(f"{self.url}/_emulator/stats", timeout=30) as response:
            data: dict[str, Any] = json.load(response)
        return data

    def cpu_seconds(self) -> float:
        """User plus system CPU seconds the emulator process has used so far."""
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    @property
    def pid(self) -> int:
        """The emulator's process id."""
        assert self._process is not None
        return self._process.pid

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> StatsDelta:
        """Counters of ``after`` minus those of ``before``."""
        statuses = {k: v - before["statuses"].get(k, 0) for k, v in after["statuses"].items()}
        return StatsDelta(
            requests=after["requests"] - before["requests"],
            statuses={k: v for k, v in statuses.items() if v},
            handled=after["handled"] - before["handled"],
            handling_seconds=after["handling_seconds"] - before["handling_seconds"],
            handling_cpu_seconds=after["handling_cpu_seconds"] - before["handling_cpu_seconds"],
            peak_in_flight=after["peak_in_flight"],
            first_request_at=after.get("first_request_at"),
            raw=after,
        )

    def stop(self) -> None:
        """Terminate it (SIGTERM, then SIGKILL after 10 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
