"""One measured run each: a grid cell for one client, a manifest run, a pacing run."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GridRow", "ManifestRow", "PacingRow", "Target"]

MB = 1e6


@dataclass
class GridRow:
    """One client on one cell."""

    size: str
    concurrency: int
    client: str
    jobs: int
    input_bytes: int
    ok: int = 0
    failed: int = 0
    elapsed: float = 0.0
    settled_rate: float = 0.0  # jobs/s after the first round (see Outcome.settled_rate)
    cpu_seconds: float = 0.0
    baseline_rss: int = 0
    peak_rss: int = 0
    handling: float = 0.0  # emulator seconds per request (wall, incl. waiting for a worker)
    handling_cpu: float = 0.0  # emulator CPU seconds per request in parse + merge
    emulator_cpu: float = 0.0  # the emulator process's CPU seconds per job, everything
    output_bytes: int | None = None
    output_sha1: str | None = None
    error: str | None = None
    errors: list[str] = field(default_factory=list)
    busy_before: float = 0.0  # share of the machine other processes used just before

    @property
    def throughput(self) -> float:
        """Successful jobs per second once settled (the whole-run rate if not recorded)."""
        if self.settled_rate > 0:
            return self.settled_rate
        return self.overall_throughput

    @property
    def overall_throughput(self) -> float:
        """Successful jobs over the whole run's seconds, cold start included."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cpu_per_job(self) -> float:
        """Client CPU seconds per job."""
        return self.cpu_seconds / self.jobs if self.jobs else 0.0

    @property
    def growth(self) -> float:
        """Peak RSS over the idle baseline, bytes."""
        return max(0, self.peak_rss - self.baseline_rss)

    @property
    def valid(self) -> bool:
        """Whether the run finished with every job done."""
        return self.error is None and self.ok == self.jobs

    def summary(self) -> str:
        """One line for the progress log."""
        if self.error:
            return f"ERROR {self.error}"
        return (f"{self.ok}/{self.jobs} ok, {self.throughput:.1f} jobs/s, "
                f"cpu {self.cpu_per_job * 1e3:.1f} ms/job, growth {self.growth / MB:.0f} MB, "
                f"emulator {self.handling * 1e3:.0f} ms/req"
                + (f"; errors: {self.errors[0]}" if self.errors else ""))


@dataclass
class ManifestRow:
    """novita_async on a lazy CSV manifest."""

    rows: int
    stop_after: int
    manifest_bytes: int
    ok: int = 0
    failed: int = 0
    baseline_rss: int = 0
    peak_rss: int = 0
    first_request: float | None = None  # seconds from start to the emulator's first request
    first_result: float | None = None
    elapsed: float = 0.0
    error: str | None = None

    @property
    def growth(self) -> float:
        """Peak RSS over the idle baseline, bytes."""
        return max(0, self.peak_rss - self.baseline_rss)

    def summary(self) -> str:
        """One line for the progress log."""
        if self.error:
            return f"ERROR {self.error}"
        first = f"{self.first_request * 1e3:.0f} ms" if self.first_request is not None else "?"
        return (f"{self.ok} ok of the first {self.stop_after}, peak {self.peak_rss / MB:.0f} MB "
                f"(+{self.growth / MB:.0f}), first request after {first}")


@dataclass
class PacingRow:
    """novita_async against a rate-limited emulator."""

    mode: str
    rpm: float
    burst: int
    ok: int = 0
    failed: int = 0
    settled_throughput: float = 0.0  # jobs per second after the warm-up
    requests: int = 0
    rate_limited: int = 0
    window_requests: int = 0
    window_rate_limited: int = 0
    final_rate_per_minute: float | None = None
    error: str | None = None

    @property
    def ratio(self) -> float:
        """Settled throughput over the server's limit."""
        return self.settled_throughput / (self.rpm / 60.0)

    @property
    def share_429(self) -> float:
        """Share of all requests answered 429."""
        return self.rate_limited / self.requests if self.requests else 0.0

    @property
    def window_share_429(self) -> float:
        """Share of requests answered 429 after the warm-up."""
        return self.window_rate_limited / self.window_requests if self.window_requests else 0.0

    def summary(self) -> str:
        """One line for the progress log."""
        if self.error:
            return f"ERROR {self.error}"
        return (f"settled {self.settled_throughput:.2f} jobs/s = {self.ratio:.0%} of R, "
                f"429s {self.share_429:.1%} overall, {self.window_share_429:.1%} settled, "
                f"{self.failed} failed")


@dataclass(frozen=True)
class Target:
    """One target of issue 5, checked."""

    name: str
    where: str
    value: str
    goal: str
    passed: bool | None  # None: not measured in this run
    cell: tuple[str, int] | None = None  # (size, concurrency) of a grid target
