"""The batch engine against the emulator: faults, concurrency, pace, early stop, order, laziness."""

from __future__ import annotations

import errno
import io
import itertools
import os
import statistics
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import anyio
import pytest
from PIL import Image

import novita_async as na
from novita_async._jobs import is_fatal
from novita_async._pacing import Pacer
from novita_async.emulator import Emulator, Faults, job_key

from .batch_support import (
    PATIENT_RETRY,
    EmulatorFactory,
    assert_valid_image,
    batch_tasks,
    client_for,
    collect,
    job_images,
    ledger_lines,
    memory_jobs,
    results_in,
    temp_files,
    write_inputs,
)
from .conftest import FAST_RETRY

pytestmark = pytest.mark.anyio


#: Every transient fault the issue names, at a few percent each.
FAULT_RATES = {"500": 0.04, "502_html": 0.04, "503": 0.04, "drop": 0.04, "truncate": 0.04, "429": 0.03}


# -- faults and concurrency -------------------------------------------------------------


async def test_faulty_server_every_job_ends_ok(emulator_factory: EmulatorFactory, tmp_path: Path) -> None:
    """220 jobs through 5xx, HTML 502s, drops, truncations and 429s all end ok, within the concurrency."""
    out = tmp_path / "out"
    async with emulator_factory(faults=Faults(rates=FAULT_RATES, seed=1234)) as emu:
        async with client_for(emu, max_concurrency=6, retry=PATIENT_RETRY) as client:
            results = await collect(client.batch(memory_jobs(220), output_dir=out, ledger=out / "ledger.jsonl",
                                                 progress=False))
        stats = emu.stats
    assert set(stats.faults) == set(FAULT_RATES), "every fault kind was injected at least once"
    assert [r.status for r in results].count("ok") == 220
    assert 0 < stats.peak_in_flight <= 6
    lines = ledger_lines(out / "ledger.jsonl")
    assert len(lines) == 220
    assert sorted(line["id"] for line in lines) == sorted(f"job{i}" for i in range(220))
    assert {line["status"] for line in lines} == {"ok"}
    assert sum(line["attempts"] for line in lines) == stats.requests
    outputs = results_in(out)
    assert len(outputs) == 220
    for path in outputs:
        assert_valid_image(path, "PNG")
    assert temp_files(out) == []


@pytest.mark.parametrize("concurrency", [pytest.param(1, id="one"), pytest.param(3, id="three")])
async def test_concurrency_is_reached_and_never_exceeded(
    emulator_factory: EmulatorFactory, concurrency: int
) -> None:
    """With slow merges the emulator sees exactly max_concurrency requests at once, never more."""
    async with emulator_factory(latency=0.05) as emu:
        async with client_for(emu, max_concurrency=concurrency) as client:
            results = await collect(client.batch(memory_jobs(4 * concurrency), progress=False))
        assert all(r.ok for r in results)
        assert emu.stats.peak_in_flight == concurrency


# -- pacing -----------------------------------------------------------------------------


def start_rate(started: Sequence[float]) -> float:
    """Requests per second between the first and the last start."""
    return (len(started) - 1) / (started[-1] - started[0])


@pytest.mark.parametrize(
    ("rpm", "concurrency", "latency", "expected_rate"),
    [
        pytest.param(1200, 8, 0.02, 20.0, id="pace-binds"),
        pytest.param(60_000, 2, 0.1, None, id="concurrency-binds"),
    ],
)
async def test_pace_and_concurrency_both_hold(
    emulator_factory: EmulatorFactory, rpm: float, concurrency: int, latency: float, expected_rate: float | None
) -> None:
    """A fixed rpm spaces request starts evenly; whichever of pace and concurrency is tighter wins."""
    async with emulator_factory(latency=latency) as emu:
        async with client_for(emu, max_concurrency=concurrency, requests_per_minute=rpm) as client:
            results = await collect(client.batch(memory_jobs(30), progress=False))
        started, peak = list(emu.stats.started_at), emu.stats.peak_in_flight
    assert all(r.ok for r in results)
    assert peak <= concurrency
    rate = start_rate(started)
    if expected_rate is not None:
        assert rate == pytest.approx(expected_rate, rel=0.1)
        gaps = sorted(b - a for a, b in itertools.pairwise(started))
        assert statistics.median(gaps) == pytest.approx(1 / expected_rate, rel=0.15)
        # Even spacing, not bursts: nine gaps in ten are at least 60% of the interval.
        assert gaps[len(gaps) // 10] >= 0.6 / expected_rate
    else:
        assert peak == concurrency
        assert rate <= concurrency / latency * 1.1  # concurrency, not the 1000/s pace, sets it


async def run_under_rate_limit(
    emulator_factory: EmulatorFactory, limit_rpm: float, seconds: float, settle: float, **limit: object
) -> tuple[float, float, int]:
    """Run an endless batch (no client rpm) against a rate-limited emulator for ``seconds``
    (``limit``: more of the emulator's rate-limit settings).

    Returns (successes per minute, 429 share of requests) after ``settle`` seconds,
    and the number of successes in that settled part.
    """
    retry = na.RetryPolicy(max_attempts=100, initial_wait=0.05, max_wait=1.0)

    def endless() -> Iterator[na.MergeJob]:
        index = 0
        while True:
            yield na.MergeJob(*job_images(index % 64))
            index += 1

    async with emulator_factory(rate_limit_rpm=limit_rpm, latency=0.05, **limit) as emu, \
            client_for(emu, max_concurrency=16, retry=retry) as client:
        began = time.monotonic()
        mark: tuple[float, int, int, int] | None = None
        async with client.batch(endless(), progress=False) as run:
            async for result in run:
                assert result.ok
                now = time.monotonic() - began
                if mark is None and now >= settle:
                    mark = (now, emu.stats.requests, emu.stats.statuses[429], run.summary.ok)
                if now >= seconds:
                    break
        assert mark is not None
        span = time.monotonic() - began - mark[0]
        requests = emu.stats.requests - mark[1]
        limited = emu.stats.statuses[429] - mark[2]
        successes = run.summary.ok - mark[3]
    return successes / span * 60.0, limited / requests, successes


async def test_adaptive_pace_settles_under_the_rate_limit(emulator_factory: EmulatorFactory) -> None:
    """With no rpm set, a batch finds the server's limit: few 429s and throughput near the limit."""
    per_minute, share_429, successes = await run_under_rate_limit(
        emulator_factory, limit_rpm=1200, seconds=4.0, settle=2.0)
    assert successes > 20
    assert per_minute >= 0.8 * 1200
    assert per_minute <= 1.1 * 1200  # the emulator's limit really held
    assert share_429 < 0.15


async def test_adaptive_pace_gets_every_job_through_a_sliding_window_limit(
    emulator_factory: EmulatorFactory,
) -> None:
    """The API does not say how its per-minute limit is kept: against a sliding window (here
    10 requests in any 1 s, all at once if they like) the adaptive pace loses no job."""
    retry = na.RetryPolicy(max_attempts=10, initial_wait=0.05, max_wait=0.5)
    async with emulator_factory(rate_limit_rpm=600, rate_limit_kind="window", rate_limit_window=1.0) as emu:
        async with client_for(emu, max_concurrency=8, retry=retry) as client:
            run = client.batch(memory_jobs(40), progress=False)
            results = await collect(run)
        assert [r.status for r in results] == ["ok"] * 40, run.summary.line()
        assert emu.stats.statuses[200] == 40
        assert emu.stats.statuses[429] > 0  # the limit was met, and the pace came back under it


async def test_fixed_pace_under_a_sliding_window_meets_no_429(emulator_factory: EmulatorFactory) -> None:
    """A fixed pace below a sliding-window limit never meets it: every start of 20 jobs at
    450/min against 600/min kept in 1 s windows is a success."""
    async with emulator_factory(rate_limit_rpm=600, rate_limit_kind="window", rate_limit_window=1.0) as emu:
        async with client_for(emu, max_concurrency=8, requests_per_minute=450) as client:
            results = await collect(client.batch(memory_jobs(20), progress=False))
        assert [r.status for r in results] == ["ok"] * 20
        assert dict(emu.stats.statuses) == {200: 20}


@pytest.mark.soak
async def test_adaptive_pace_meets_the_issue_figures(emulator_factory: EmulatorFactory) -> None:
    """Settled over a minute: throughput at least 90% of the limit, 429s under 10% of requests."""
    per_minute, share_429, _ = await run_under_rate_limit(emulator_factory, limit_rpm=600, seconds=75.0, settle=15.0)
    assert per_minute >= 0.9 * 600
    assert share_429 < 0.1


@pytest.mark.soak
async def test_adaptive_pace_settles_near_a_sliding_window_limit(emulator_factory: EmulatorFactory) -> None:
    """Against a sliding window (100 requests in any 5 s, all at once if they like), the adaptive
    pace settles at 80% of the limit or more (about 95% on a quiet machine) once the start's bursts have aged out."""
    per_minute, _, _ = await run_under_rate_limit(
        emulator_factory, limit_rpm=1200, seconds=60.0, settle=30.0, rate_limit_kind="window", rate_limit_window=5.0)
    assert 0.8 * 1200 <= per_minute <= 1.05 * 1200


@pytest.mark.soak
async def test_default_settings_finish_every_job_at_the_account_default_limit(
    emulator_factory: EmulatorFactory,
) -> None:
    """At 10 per minute (the account default, a burst of 3), 8 jobs at once with the default
    retries all end ok: the adaptive pace's default of 10 attempts outlasts the 429s it meets
    while it finds the limit (with 5, 3 of these 8 jobs failed)."""
    async with emulator_factory(rate_limit_rpm=10, rate_limit_burst=3) as emu:
        async with na.NovitaClient(api_key=emu.api_key, base_url=emu.url, max_concurrency=8) as client:
            assert client.retry == na.RetryPolicy(max_attempts=10)
            run = client.batch(memory_jobs(8), progress=False)
            results = await collect(run)
        assert [r.status for r in results] == ["ok"] * 8, run.summary.line()
        assert emu.stats.statuses[200] == 8


def test_default_retries_follow_the_pace() -> None:
    """Default retries: 5 attempts under a fixed pace, 10 under the adaptive one (it meets 429s
    while it finds the limit); a policy given is kept either way."""
    assert na.NovitaClient(api_key="sk_x").retry.max_attempts == 10
    assert na.NovitaClient(api_key="sk_x", requests_per_minute=10).retry.max_attempts == 5
    assert na.NovitaClient(api_key="sk_x", pacer=Pacer(requests_per_minute=10)).retry.max_attempts == 5
    assert na.NovitaClient(api_key="sk_x", pacer=Pacer()).retry.max_attempts == 10
    given = na.RetryPolicy(max_attempts=2)
    assert na.NovitaClient(api_key="sk_x", retry=given).retry is given


@pytest.mark.soak
async def test_fixed_pace_holds_over_time(emulator_factory: EmulatorFactory) -> None:
    """rpm=600 over 150 jobs: the average start rate is within 3% of 10 per second."""
    async with emulator_factory(latency=0.05) as emu:
        async with client_for(emu, max_concurrency=8, requests_per_minute=600) as client:
            await collect(client.batch(memory_jobs(150), progress=False))
        assert start_rate(emu.stats.started_at) == pytest.approx(10.0, rel=0.03)



def test_stray_429s_among_failures_do_not_spiral_the_pace_down() -> None:
    """A 429 in 33 requests and 5xx in one in 5 leave an adaptive pace near the client's capacity."""
    now = 0.0
    pacer = Pacer(None, clock=lambda: now)
    spacing: list[float] = []
    for index in range(6000):
        step = pacer.reserve(now) + 0.002  # the client can start 500 requests per second at most
        now += step
        spacing.append(step)
        if index % 33 == 32:
            pacer.on_rate_limited(None)
        elif index % 5 != 0:  # the rest are 5xx: neither a success nor a 429
            pacer.on_success()
    late = spacing[-1000:]
    # Successes lag the pace here (a fifth of requests fail), so a pacer that cut
    # from the success rate on every 429 would fall towards its floor.
    assert len(late) / sum(late) >= 0.6 * 500

# -- fatal errors stop the batch --------------------------------------------------------


@pytest.mark.parametrize(
    ("balance", "api_key", "path", "error", "reason"),
    [
        pytest.param(None, "sk_wrong_key", "", na.AuthenticationError, "INVALID_API_KEY", id="wrong-key"),
        pytest.param(6, None, "", na.InsufficientBalanceError, "BILLING_BALANCE_NOT_ENOUGH", id="balance"),
        pytest.param(None, None, "/wrong", na.NotFoundError, "API_NOT_FOUND", id="wrong-base-url"),
    ],
)
async def test_fatal_error_stops_the_batch_early(
    emulator_factory: EmulatorFactory, tmp_path: Path, balance: int | None, api_key: str | None,
    path: str, error: type[na.APIStatusError], reason: str,
) -> None:
    """After a fatal error in-flight jobs finish, the rest are not_attempted, and few requests follow."""
    concurrency, count = 4, 40
    out = tmp_path / "out"
    async with emulator_factory(latency=0.05, balance=balance) as emu:
        async with na.NovitaClient(api_key=api_key or emu.api_key, base_url=emu.url + path, retry=FAST_RETRY,
                                   max_concurrency=concurrency) as client:
            run = client.batch(memory_jobs(count), output_dir=out, ledger=out / "ledger.jsonl", progress=False)
            results = await collect(run)
        requests, successes = emu.stats.requests, sum(emu.stats.successes.values())
    summary = run.summary
    by_status = {s: [r for r in results if r.status == s] for s in ("ok", "failed", "not_attempted")}
    assert len(results) == count
    assert summary.stop_reason is not None and error.__name__ in summary.stop_reason
    assert 1 <= len(by_status["failed"]) <= concurrency
    assert all(isinstance(r.error, error) for r in by_status["failed"])
    assert summary.failed == {reason: len(by_status["failed"])}
    assert len(by_status["ok"]) <= (balance or 0) + concurrency
    assert len(by_status["not_attempted"]) == summary.not_attempted == count - summary.ok - summary.failed_total
    assert summary.not_attempted >= count - (balance or 0) - 2 * concurrency
    for result in by_status["not_attempted"]:
        assert isinstance(result.error, na.JobNotAttemptedError)
        assert isinstance(result.error.cause, error)
        assert result.attempts == 0
    # Requests refused after the first fatal answer: at most those already in flight.
    assert requests - successes <= concurrency
    assert len(by_status["ok"]) == successes  # in-flight jobs finished and were kept
    for result in by_status["ok"]:
        assert result.output is not None
        assert_valid_image(result.output)
    lines = ledger_lines(out / "ledger.jsonl")
    assert len(lines) == count == len({line["id"] for line in lines})
    assert sorted(line["status"] for line in lines) == sorted(r.status for r in results)


# -- order ------------------------------------------------------------------------------


async def test_ordered_yields_in_input_order(emulator_factory: EmulatorFactory) -> None:
    """With random latency, ordered=True yields input order; unordered yields the same set, reordered."""
    ids = [f"job{i}" for i in range(30)]
    async with emulator_factory(latency=0.005, jitter=0.06, faults=Faults(seed=5)) as emu, \
            client_for(emu, max_concurrency=6) as client:
        ordered = await collect(client.batch(memory_jobs(30), ordered=True, progress=False))
        unordered = await collect(client.batch(memory_jobs(30), progress=False))
    assert [r.job.id for r in ordered] == ids
    assert all(r.ok for r in ordered + unordered)
    assert sorted(str(r.job.id) for r in unordered) == sorted(ids)
    assert [r.job.id for r in unordered] != ids, "jitter should reorder completions (else the test proves nothing)"


async def test_ordered_with_immediate_results_mixed_in(client: na.NovitaClient, tmp_path: Path) -> None:
    """Bad rows and skipped jobs, resolved at once, still come out in their input places."""
    manifest = tmp_path / "m.jsonl"
    lines = []
    for index in range(12):
        face, image = job_images(index)
        (tmp_path / f"f{index}.png").write_bytes(face)
        (tmp_path / f"i{index}.png").write_bytes(image)
        if index % 4 == 1:
            lines.append(f'{{"face_image": "f{index}.png"')  # torn JSON: a bad row
        else:
            lines.append(f'{{"face_image": "f{index}.png", "image": "i{index}.png", "id": "j{index}"}}')
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    # A first run of the first five rows, so the second run skips some.
    await collect(client.batch(list(na.read_manifest(manifest))[:5], output_dir=out, ledger=ledger, progress=False))
    results = await collect(client.batch(na.read_manifest(manifest), output_dir=out, ledger=ledger,
                                         ordered=True, progress=False))
    expected = [f"row-{i + 1}" if i % 4 == 1 else f"j{i}" for i in range(12)]
    assert [r.job.id for r in results] == expected
    assert [r.status for r in results][:5] == ["skipped", "failed", "skipped", "skipped", "skipped"]


# -- laziness and cancellation ----------------------------------------------------------


async def test_a_million_jobs_are_never_drained_ahead(client: na.NovitaClient) -> None:
    """A 1,000,000-job generator is read only as jobs can run, and closed when the batch is left."""
    pulled = 0
    closed = False
    face, image = job_images(0)

    def million() -> Iterator[na.MergeJob]:
        nonlocal pulled, closed
        try:
            for index in range(1_000_000):
                pulled += 1
                yield na.MergeJob(face, image, id=f"m{index}")
        finally:
            closed = True

    slots = client.max_concurrency + max(2, client.max_concurrency // 4)
    received = 0
    async with client.batch(million(), progress=False) as run:
        async for result in run:
            received += 1
            assert result.ok
            assert pulled <= slots + received
            if received == 5:
                break
    at_break = pulled
    await anyio.sleep(0.2)
    assert pulled == at_break <= slots + 5
    assert closed, "the generator is closed when the batch is left"


async def test_break_cancels_cleanly_and_the_client_stays_usable(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    """Breaking out of a plain `async for` cancels the rest: no task, temp file or request left over."""
    size = 1024
    noise = [Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)) for _ in range(2)]
    encoded = []
    for image in noise:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=0)
        encoded.append(buffer.getvalue())
    out = tmp_path / "out"
    jobs = [na.MergeJob(encoded[i % 2], encoded[(i + 1) % 2], id=f"big{i}") for i in range(12)]
    async with emulator_factory(merge_workers=4, jitter=0.1) as emu, client_for(emu, max_concurrency=4) as client:
        async for result in client.batch(jobs, output_dir=out, ledger=out / "ledger.jsonl", progress=False):
            assert result.ok
            break
        with anyio.fail_after(5):
            while batch_tasks() or emu.stats.in_flight:  # noqa: ASYNC110  # polling state no event announces
                await anyio.sleep(0.01)
        assert temp_files(out) == []
        for path in results_in(out):
            assert_valid_image(path)
        assert len(ledger_lines(out / "ledger.jsonl")) < 12
        # Still usable: its connection slots and pace were all given back.
        again = await client.merge_face(*job_images(1))
        assert again.attempts == 1


async def test_stop_lets_in_flight_jobs_finish(emulator_factory: EmulatorFactory, tmp_path: Path) -> None:
    """stop(): no new request is sent, jobs in flight finish and are recorded, the rest are left."""
    out = tmp_path / "out"
    async with emulator_factory(latency=0.15) as emu, client_for(emu, max_concurrency=4) as client:
        results = []
        async with client.batch(memory_jobs(40), output_dir=out, ledger=out / "ledger.jsonl",
                                progress=False) as run:
            async for result in run:
                results.append(result)
                if len(results) == 2:
                    run.stop()
        requests = emu.stats.requests
    assert run.summary.interrupted
    assert 2 < len(results) < 40
    assert all(r.ok for r in results)
    assert requests == len(results), "every request sent was seen through to its result"
    assert len(ledger_lines(out / "ledger.jsonl")) == len(results) == len(results_in(out))


async def test_one_jobs_exception_never_cancels_the_others(client: na.NovitaClient) -> None:
    """A job the client cannot even start (a bad input type, a flat image) fails alone."""
    face, image = job_images(0)
    jobs = [
        na.MergeJob(face, image, id="good1"),
        na.MergeJob(12345, image, id="not-an-image"),  # type: ignore[arg-type]  # deliberately wrong
        na.MergeJob(face, b"not an image at all", id="garbage"),
        "not a job",
        na.MergeJob(face, image, id="good2"),
    ]
    results = await collect(client.batch(jobs, progress=False))  # type: ignore[arg-type]  # a str among jobs
    by_id = {r.job.id: r for r in results}
    assert len(results) == 5
    assert by_id["good1"].ok and by_id["good2"].ok
    assert by_id["not-an-image"].status == by_id["garbage"].status == by_id["job-3"].status == "failed"
    assert isinstance(by_id["job-3"].error, TypeError)
    assert isinstance(by_id["garbage"].error, na.InvalidImageError)


async def test_a_job_whose_output_is_a_folder_fails_alone_unsent(
    client: na.NovitaClient, emulator: Emulator, tmp_path: Path
) -> None:
    """A job naming an existing folder as its output fails with OutputError before it is sent."""
    (tmp_path / "out" / "taken").mkdir(parents=True)
    jobs = [na.MergeJob(*job_images(i), id=f"j{i}", output="taken" if i == 1 else None) for i in range(3)]
    results = await collect(client.batch(jobs, output_dir=tmp_path / "out", progress=False))
    by_id = {r.job.id: r for r in results}
    assert by_id["j0"].ok and by_id["j2"].ok
    assert by_id["j1"].status == "failed" and isinstance(by_id["j1"].error, na.OutputError)
    assert emulator.stats.requests == 2


async def test_a_repeated_job_is_refused_not_done_twice(
    client: na.NovitaClient, emulator: Emulator, tmp_path: Path
) -> None:
    """A job repeating an earlier job's id, or its output file, fails with DuplicateJobError
    unsent, writes no ledger line over the earlier record, and the others go on; a re-run
    skips what was done and refuses the repeats again."""
    out = tmp_path / "out"
    pairs = [job_images(i) for i in range(5)]
    jobs = [
        na.MergeJob(*pairs[0], id="x"),
        na.MergeJob(*pairs[1], id="x"),  # the same id, other images
        na.MergeJob(*pairs[2], id="a/b"),
        na.MergeJob(*pairs[3], id="a_b"),  # a different id, but the same file name
        na.MergeJob(*pairs[4], id="y", output="x.png"),  # an explicit output taken by job "x"
        na.MergeJob(*pairs[2], id="z"),
    ]
    for attempt in ("first run", "re-run"):
        run = client.batch(jobs, output_dir=out, ledger=out / "ledger.jsonl", progress=False)
        results = {(r.job.id, r.status): r for r in await collect(run)}
        done = "ok" if attempt == "first run" else "skipped"
        assert sorted(results) == sorted([("x", done), ("x", "failed"), ("a/b", done), ("a_b", "failed"),
                                          ("y", "failed"), ("z", done)]), attempt
        for key in (("x", "failed"), ("a_b", "failed"), ("y", "failed")):
            error = results[key].error
            assert isinstance(error, na.DuplicateJobError), attempt
            assert error.job_id == key[0]
        assert "repeats the id" in str(results[("x", "failed")].error)
        assert results[("a_b", "failed")].error.output == str(out / "a_b.png")  # type: ignore[union-attr]
        assert "x.png" in str(results[("y", "failed")].error)
        assert run.summary.failed == {"DuplicateJobError": 3}
    assert emulator.stats.requests == 3  # x, a/b and z, once each over both runs
    # The repeats' images never reached the server: x.png is job "x"'s result.
    assert [job_key(*pairs[i]) in emulator.stats.attempts for i in range(5)] == [True, False, True, False, False]
    assert_valid_image(out / "x.png")
    lines = ledger_lines(out / "ledger.jsonl")
    assert sorted((line["id"], line["status"]) for line in lines) == [("a/b", "ok"), ("x", "ok"), ("z", "ok")]


async def test_identical_rows_run_once(client: na.NovitaClient, emulator: Emulator, tmp_path: Path) -> None:
    """The same pair of files twice (one id from their paths) is merged once."""
    pairs = write_inputs(tmp_path / "in", 2)
    jobs = [na.MergeJob(str(f), str(t)) for f, t in (pairs[0], pairs[1], pairs[0])]
    results = await collect(client.batch(jobs, output_dir=tmp_path / "out", progress=False))
    assert [r.status for r in results].count("ok") == 2
    (repeat,) = [r for r in results if r.status == "failed"]
    assert isinstance(repeat.error, na.DuplicateJobError)
    assert [r.job.id for r in results].count(repeat.job.id) == 2
    assert emulator.stats.requests == 2


async def test_results_in_memory_without_an_output_dir(client: na.NovitaClient) -> None:
    """With no output_dir each result carries the image bytes."""
    results = await collect(client.batch(memory_jobs(3), response_image_type="webp", progress=False))
    for result in results:
        assert result.output is None and result.result is not None
        assert result.result.data is not None
        assert Image.open(io.BytesIO(result.result.data)).format == "WEBP"


async def test_async_iterable_jobs_are_consumed_lazily(client: na.NovitaClient) -> None:
    """An async generator works as a job source and is closed when the batch is abandoned."""
    pulled = 0
    closed = False

    async def source() -> AsyncIterator[na.MergeJob]:
        nonlocal pulled, closed
        try:
            for index in range(10_000):
                pulled += 1
                yield na.MergeJob(*job_images(index % 3), id=f"a{index}")
        finally:
            closed = True

    async with client.batch(source(), progress=False) as run:
        async for _ in run:
            break
    assert closed
    assert pulled < 20


async def test_a_job_source_that_fails_raises_after_in_flight_jobs(client: na.NovitaClient) -> None:
    """An error reading the job stream surfaces to the consumer once the jobs already taken are done."""

    def source() -> Iterator[na.MergeJob]:
        yield from memory_jobs(3)
        raise OSError("the disk went away")

    results = []
    with pytest.raises(OSError, match="disk went away"):
        async for result in client.batch(source(), progress=False):
            results.append(result)
    assert [r.status for r in results] == ["ok"] * 3


def _output_error(code: int) -> na.OutputError:
    """An OutputError caused by an OSError with errno ``code``, as a result write raises it."""
    try:
        try:
            raise OSError(code, os.strerror(code))
        except OSError as exc:
            raise na.OutputError(f"cannot write out/a.png: {exc.strerror}") from exc
    except na.OutputError as error:
        return error


@pytest.mark.parametrize(
    ("error", "fatal"),
    [
        pytest.param(na.AuthenticationError(status=403, reason="INVALID_API_KEY", message="x"), True, id="auth"),
        pytest.param(na.PermissionDeniedError(status=403, reason="API_NOT_ALLOWED", message="x"), True,
                     id="permission"),
        pytest.param(na.InsufficientBalanceError(status=400, reason="BILLING_BALANCE_NOT_ENOUGH", message="x"),
                     True, id="balance"),
        pytest.param(na.ClientClosedError("closed"), True, id="client-closed"),
        pytest.param(na.NotFoundError(status=404, reason="API_NOT_FOUND", message="x"), True, id="not-found"),
        pytest.param(_output_error(errno.ENOSPC), True, id="disk-full"),
        pytest.param(_output_error(errno.EROFS), True, id="read-only-disk"),
        pytest.param(_output_error(errno.EACCES), False, id="one-folder-not-writable"),
        pytest.param(na.OutputError("the output out is an existing folder"), False, id="output-a-folder"),
        pytest.param(na.NoFaceDetectedError(status=400, reason="IMAGE_NO_FACE_DETECTED", message="x"), False,
                     id="no-face"),
        pytest.param(na.ServerError(status=503, reason=None, message="x"), False, id="server"),
        pytest.param(na.InvalidImageError("bad"), False, id="invalid-image"),
    ],
)
def test_which_errors_stop_a_batch(error: BaseException, fatal: bool) -> None:
    """Only errors every later job would meet too stop the batch; per-job ones do not."""
    assert is_fatal(error) is fatal


@pytest.mark.soak
async def test_thousands_of_jobs_with_faults_stay_bounded(emulator_factory: EmulatorFactory, tmp_path: Path) -> None:
    """3,000 jobs through every transient fault: all ok, concurrency and job buffer bounded, one line each."""
    out = tmp_path / "out"
    pulled = 0
    received = 0

    def jobs() -> Iterator[na.MergeJob]:
        nonlocal pulled
        for index in range(3000):
            pulled += 1
            yield na.MergeJob(*job_images(index % 500), id=f"s{index}", output=f"{index % 10}/s{index}.png")

    async with emulator_factory(faults=Faults(rates=FAULT_RATES, seed=99)) as emu, \
            client_for(emu, max_concurrency=16, retry=PATIENT_RETRY) as client, \
            client.batch(jobs(), output_dir=out, ledger=out / "ledger.jsonl", progress=False) as run:
        async for result in run:
            received += 1
            assert result.ok, result.error
            assert pulled <= received + 16 + 4
    assert emu.stats.peak_in_flight <= 16
    assert run.summary.ok == 3000 and run.summary.retries > 0
    assert len({line["id"] for line in ledger_lines(out / "ledger.jsonl")}) == 3000
    assert len(results_in(out)) == 3000 and temp_files(out) == []


async def test_stop_does_not_wait_for_queued_pacing_turns(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    """At 12 requests a minute, jobs queued for their turn stop at once, not one turn (5 s) each."""
    out = tmp_path / "out"
    async with emulator_factory() as emu, client_for(emu, max_concurrency=4, requests_per_minute=12) as client:
        results = []
        async with client.batch(memory_jobs(20), output_dir=out, ledger=out / "ledger.jsonl",
                                progress=False) as run:
            async for result in run:
                results.append(result)
                run.stop()  # the first result (sent at once); three more jobs wait 5, 10, 15 s
                stopped = time.monotonic()
        elapsed = time.monotonic() - stopped
        requests = emu.stats.requests
    assert elapsed < 2.0, f"the stop waited {elapsed:.1f} s for pacing turns"
    assert [r.ok for r in results] == [True] and requests == 1
    assert len(ledger_lines(out / "ledger.jsonl")) == 1  # the others are left for a re-run


async def test_stop_ends_a_retry_back_off_at_once(emulator_factory: EmulatorFactory, tmp_path: Path) -> None:
    """A job sleeping 30 s before its retry is left for a re-run as soon as the batch stops."""
    slow_retry = na.RetryPolicy(max_attempts=3, initial_wait=30.0, max_wait=30.0)
    out = tmp_path / "out"
    async with emulator_factory(faults=Faults(fail_first=1, fail_first_kind="503")) as emu:
        async with client_for(emu, max_concurrency=1, retry=slow_retry) as client:
            async with client.batch(memory_jobs(2), output_dir=out, ledger=out / "ledger.jsonl",
                                    progress=False) as run:

                async def stop_soon() -> None:
                    while emu.stats.requests < 2:  # noqa: ASYNC110  # polling a counter no event announces
                        await anyio.sleep(0.01)
                    await anyio.sleep(0.05)  # both first attempts failed (503); their retries wait 30 s
                    run.stop()

                started = time.monotonic()
                async with anyio.create_task_group() as group:
                    group.start_soon(stop_soon)
                    results = [result async for result in run]
            elapsed = time.monotonic() - started
        requests = emu.stats.requests
    assert elapsed < 3.0, f"the stop waited {elapsed:.1f} s for a retry back-off"
    # Each job's first attempt went out (the slot is free during a back-off); no retry did.
    assert results == [] and requests == 2
    assert not (out / "ledger.jsonl").exists() or ledger_lines(out / "ledger.jsonl") == []
