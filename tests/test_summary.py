"""The batch summary (an object and one line) and progress reporting (bar, tqdm of yours, callback)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from tqdm import tqdm

import novita_async as na
from novita_async._jobs import JobResult, JobStatus
from novita_async._summary import BatchSummary, Progress
from novita_async.emulator import Emulator, Faults

from .batch_support import memory_jobs
from .conftest import FAST_RETRY, flat_image, make_image

pytestmark = pytest.mark.anyio


def result(status: str, *, reason: str | None = None, attempts: int = 1, elapsed: float = 0.1) -> JobResult:
    """A synthetic job result."""
    error: BaseException | None = None
    if reason is not None:
        error = na.BadRequestError(status=400, reason=reason, message="no")
    return JobResult(job=na.MergeJob("a", "b", id="x"), status=status, error=error, attempts=attempts,
                     elapsed=elapsed)


def test_summary_counts_each_status_and_reason() -> None:
    """ok, failed by reason, skipped and not_attempted are counted apart; retries are attempts beyond one."""
    summary = BatchSummary()
    for item in (
        result(JobStatus.OK, attempts=3),
        result(JobStatus.OK),
        result(JobStatus.FAILED, reason="IMAGE_NO_FACE_DETECTED", attempts=2),
        result(JobStatus.FAILED, reason="IMAGE_NO_FACE_DETECTED"),
        result(JobStatus.FAILED, reason="INVALID_IMAGE_FORMAT"),
        result(JobStatus.SKIPPED, attempts=0),
        result(JobStatus.NOT_ATTEMPTED, attempts=0),
    ):
        summary.add(item)
    assert summary.ok == 2 and summary.skipped == 1 and summary.not_attempted == 1
    assert summary.failed == {"IMAGE_NO_FACE_DETECTED": 2, "INVALID_IMAGE_FORMAT": 1}
    assert summary.failed_total == 3 and summary.total == 7
    assert summary.retries == 3


def test_percentiles_of_sent_jobs_only() -> None:
    """p50/p95 come from jobs that were sent (ok or failed), not from skipped ones."""
    summary = BatchSummary()
    assert summary.percentile(50) is None
    for index in range(1, 101):
        summary.add(result(JobStatus.OK, elapsed=index / 100))
    summary.add(result(JobStatus.SKIPPED, elapsed=1000.0))
    assert summary.percentile(50) == pytest.approx(0.5, abs=0.011)
    assert summary.percentile(95) == pytest.approx(0.95, abs=0.011)
    assert summary.percentile(100) == 1.0


def test_latency_samples_stay_bounded() -> None:
    """A long batch keeps a bounded sample of latencies (memory stays flat)."""
    summary = BatchSummary()
    for index in range(25_000):
        summary.add(result(JobStatus.OK, elapsed=float(index % 100)))
    assert len(summary._latencies) == 10_000
    assert summary.ok == 25_000
    p50 = summary.percentile(50)
    assert p50 is not None and 40 <= p50 <= 60


@pytest.mark.parametrize(
    ("stop_reason", "interrupted", "tail"),
    [
        pytest.param(None, False, None, id="plain"),
        pytest.param("AuthenticationError: HTTP 403", False, "; stopped early: AuthenticationError: HTTP 403",
                     id="stopped"),
        pytest.param(None, True, "; interrupted", id="interrupted"),
    ],
)
def test_line_says_everything_in_one_line(stop_reason: str | None, interrupted: bool, tail: str | None) -> None:
    """ok, failed by reason, skipped, retries, time, throughput, p50/p95, and why it stopped."""
    summary = BatchSummary(stop_reason=stop_reason, interrupted=interrupted)
    summary.add(result(JobStatus.OK, attempts=2, elapsed=0.5))
    summary.add(result(JobStatus.FAILED, reason="IMAGE_NO_FACE_DETECTED"))
    summary.add(result(JobStatus.SKIPPED))
    summary.finished = summary.started + 2.0
    line = summary.line()
    assert "\n" not in line
    assert line.startswith("ok 1, failed 1 (IMAGE_NO_FACE_DETECTED 1), skipped 1 (resumed), retries 1, 2.0 s, ")
    assert "1.00 jobs/s" in line and "p50 " in line and "p95 0.50 s" in line
    if tail is None:
        assert line.endswith(" s")
    else:
        assert line.endswith(tail)


def test_as_dict_is_json_ready() -> None:
    """The snapshot has every count and serialises as JSON."""
    summary = BatchSummary()
    summary.add(result(JobStatus.FAILED, reason="X"))
    data = json.loads(json.dumps(summary.as_dict()))
    assert data["failed"] == {"X": 1} and data["ok"] == 0 and data["p95"] == 0.1


@pytest.mark.parametrize("spec", [pytest.param(False, id="false"), pytest.param(None, id="none-not-a-tty")])
def test_no_bar_when_off_or_not_a_terminal(spec: bool | None, capsys: pytest.CaptureFixture[str]) -> None:
    """progress=False, or None when stderr is not a terminal, writes nothing."""
    progress = Progress(spec, total=3)
    progress.update(result(JobStatus.OK), BatchSummary())
    progress.close()
    assert capsys.readouterr().err == ""


async def test_progress_true_draws_a_bar_with_counts(
    client: na.NovitaClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """progress=True draws a tqdm bar on stderr showing done, failed and retries."""
    jobs = [*memory_jobs(3), na.MergeJob(flat_image(), make_image(), id="faceless")]
    async with client.batch(jobs, progress=True) as run:
        async for _ in run:
            pass
    err = capsys.readouterr().err
    assert "4/4" in err
    assert "failed=1" in err and "ok=3" in err and "retries=0" in err


async def test_progress_accepts_your_tqdm_and_callbacks(emulator: Emulator, tmp_path: Path) -> None:
    """A tqdm bar you pass counts every job (skipped and failed too); a callable gets each JobResult."""
    out = tmp_path / "out"
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client:
        async with client.batch(memory_jobs(4), output_dir=out, ledger=out / "l.jsonl", progress=False) as run:
            async for _ in run:
                pass
        jobs = [*memory_jobs(6), na.MergeJob(flat_image(), make_image(), id="faceless")]
        bar = tqdm(total=len(jobs), file=io.StringIO())
        async with client.batch(jobs, output_dir=out, ledger=out / "l.jsonl", progress=bar) as run:
            via_bar = [r async for r in run]
        bar.close()
        seen: list[JobResult] = []
        async with client.batch(jobs, output_dir=out, ledger=out / "l.jsonl", progress=seen.append) as run:
            via_callback = [r async for r in run]
    assert bar.n == len(jobs) == len(via_bar)
    assert seen == via_callback and all(isinstance(r, JobResult) for r in seen)
    assert [r.status for r in seen].count("skipped") == 6


async def test_summary_object_from_the_python_api(emulator_factory: Callable[..., Emulator]) -> None:
    """run.summary has ok, failed by reason, skipped, retries and latency percentiles after a run."""
    jobs = [*memory_jobs(5), na.MergeJob(flat_image(), make_image(), id="faceless")]
    async with emulator_factory(faults=Faults(fail_first=1, fail_first_kind="503")) as emu, \
            na.NovitaClient(api_key=emu.api_key, base_url=emu.url, retry=FAST_RETRY) as client, \
            client.batch(jobs, progress=False) as run:
        results = [r async for r in run]
    summary = run.summary
    assert summary.ok == 5 and summary.failed == {"IMAGE_NO_FACE_DETECTED": 1} and summary.skipped == 0
    assert summary.retries == 6 == sum(r.attempts - 1 for r in results)
    p50, p95 = summary.percentile(50), summary.percentile(95)
    assert p50 is not None and p95 is not None and 0 < p50 <= p95
    assert summary.finished is not None and summary.wall_time > 0
    assert summary.line().startswith("ok 5, failed 1 (IMAGE_NO_FACE_DETECTED 1), skipped 0 (resumed), retries 6")
