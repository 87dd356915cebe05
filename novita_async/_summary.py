"""What a batch did, as an object and as one line; and its progress bar."""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from novita_async._errors import NoFaceFoundBeforeError
from novita_async._jobs import JobResult, JobStatus

__all__ = ["BatchSummary", "Progress"]

#: Latency samples kept for percentiles (a reservoir: memory stays flat).
_RESERVOIR = 10_000


@dataclass
class BatchSummary:
    """Counts and timings of a batch, updated as results arrive.

    Attributes:
        ok: Jobs merged in this run.
        failed: Jobs that failed, by reason (``IMAGE_NO_FACE_DETECTED``...).
        no_face_before: Of the failed, jobs not sent again because an earlier
            run found no face in their unchanged input files.
        skipped: Jobs already done in an earlier run (resumed).
        inputs_changed: Jobs done in an earlier run whose input files have
            another size now (new images at the same paths): not skipped, so
            sent again (each is also counted by its new outcome).
        not_attempted: Jobs not sent because the batch stopped early.
        retries: Attempts beyond the first, over all jobs.
        stop_reason: Why the batch stopped early, if it did.
        interrupted: Whether it was stopped by the user (Ctrl-C).
    """

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    inputs_changed: int = 0
    no_face_before: int = 0
    not_attempted: int = 0
    retries: int = 0
    stop_reason: str | None = None
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    _latencies: list[float] = field(default_factory=list, repr=False)
    _seen: int = field(default=0, repr=False)
    _rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    @property
    def failed_total(self) -> int:
        """All failed jobs."""
        return sum(self.failed.values())

    @property
    def total(self) -> int:
        """Jobs accounted for so far."""
        return self.ok + self.failed_total + self.skipped + self.not_attempted

    @property
    def wall_time(self) -> float:
        """Seconds from start to finish (or to now)."""
        return (self.finished or time.monotonic()) - self.started

    @property
    def throughput(self) -> float:
        """Jobs sent and finished (ok or failed) per second of wall time."""
        done = self.ok + self.failed_total - self.no_face_before
        return done / self.wall_time if self.wall_time > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        """Latency percentile (0-100) of the jobs sent, seconds; None if none."""
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[index]

    def add(self, result: JobResult) -> None:
        """Account for one job result."""
        if result.status == JobStatus.OK:
            self.ok += 1
        elif result.status == JobStatus.SKIPPED:
            self.skipped += 1
            return
        elif result.status == JobStatus.NOT_ATTEMPTED:
            self.not_attempted += 1
            return
        else:
            self.failed[result.error_reason or "unknown"] += 1
            if isinstance(result.error, NoFaceFoundBeforeError):
                self.no_face_before += 1
                return  # not sent: no time or attempts to count
        self.retries += max(0, result.attempts - 1)
        self._sample(result.elapsed)

    def _sample(self, value: float) -> None:
        self._seen += 1
        if len(self._latencies) < _RESERVOIR:
            self._latencies.append(value)
        else:
            slot = self._rng.randrange(self._seen)
            if slot < _RESERVOIR:
                self._latencies[slot] = value

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        parts = [f"ok {self.ok}"]
        if self.failed:
            reasons = ", ".join(f"{r} {n}" for r, n in self.failed.most_common())
            parts.append(f"failed {self.failed_total} ({reasons})")
        else:
            parts.append("failed 0")
        parts.append(f"skipped {self.skipped} (resumed)")
        if self.inputs_changed:
            parts.append(f"inputs changed {self.inputs_changed} (done before, not skipped)")
        if self.no_face_before:
            parts.append(f"not sent again {self.no_face_before} (no face in an earlier run)")
        if self.not_attempted:
            parts.append(f"not attempted {self.not_attempted}")
        parts.append(f"retries {self.retries}")
        parts.append(f"{self.wall_time:.1f} s")
        parts.append(f"{self.throughput:.2f} jobs/s")
        p50, p95 = self.percentile(50), self.percentile(95)
        if p50 is not None and p95 is not None:
            parts.append(f"p50 {p50:.2f} s, p95 {p95:.2f} s")
        text = ", ".join(parts)
        if self.stop_reason:
            text += f"; stopped early: {self.stop_reason}"
        elif self.interrupted:
            text += "; interrupted"
        return text

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot."""
        return {
            "ok": self.ok, "failed": dict(self.failed), "skipped": self.skipped,
            "inputs_changed": self.inputs_changed,
            "no_face_before": self.no_face_before,
            "not_attempted": self.not_attempted, "retries": self.retries,
            "wall_time": round(self.wall_time, 3), "throughput": round(self.throughput, 3),
            "p50": self.percentile(50), "p95": self.percentile(95),
            "stop_reason": self.stop_reason, "interrupted": self.interrupted,
        }


class Progress:
    """Feeds job results to a tqdm bar, a tqdm-like object or a callback.

    Args:
        spec: True (a tqdm bar on stderr), False (nothing), None (a bar only
            when stderr is a terminal), an object with ``update(n)`` (a tqdm
            bar of yours), or a callable taking each :class:`JobResult`.
        total: Jobs expected, when known.
    """

    def __init__(self, spec: Any, *, total: int | None = None) -> None:
        self._bar: Any = None
        self._callback: Any = None
        self._owns_bar = False
        if spec is None:
            spec = sys.stderr.isatty()
        if spec is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="job", dynamic_ncols=True, file=sys.stderr)
            self._owns_bar = True
        elif spec is not False and hasattr(spec, "update"):
            self._bar = spec
        elif callable(spec):
            self._callback = spec

    def update(self, result: JobResult, summary: BatchSummary) -> None:
        """Account for one result."""
        if self._callback is not None:
            self._callback(result)
        if self._bar is not None:
            self._bar.update(1)
            if hasattr(self._bar, "set_postfix"):
                self._bar.set_postfix(
                    ok=summary.ok, failed=summary.failed_total, skipped=summary.skipped,
                    retries=summary.retries, refresh=False,
                )

    def close(self) -> None:
        """Close a bar this object created."""
        if self._owns_bar and self._bar is not None:
            self._bar.close()
