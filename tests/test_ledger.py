"""The ledger and resume: one line per finished job, and re-runs that skip what is done."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import anyio
import pytest

import novita_async as na
from novita_async._jobs import JobResult, JobStatus
from novita_async._ledger import Ledger, ledger_record, load_done_ids, read_ledger
from novita_async.emulator import Emulator

from .batch_support import (
    EmulatorFactory,
    assert_valid_image,
    client_for,
    collect,
    csv_manifest,
    job_images,
    ledger_lines,
    memory_jobs,
    results_in,
    temp_files,
)
from .conftest import FAST_RETRY, flat_image, make_image

pytestmark = pytest.mark.anyio


async def run_batch(emulator: Emulator, jobs: object, out: Path, *, stop_after: int | None = None,
                    how: str = "break", concurrency: int = 4) -> tuple[list[JobResult], na.BatchSummary]:
    """Run ``jobs`` into ``out`` with its ledger; optionally stop after ``stop_after`` results."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY,
                               max_concurrency=concurrency) as client:
        run = client.batch(jobs, output_dir=out, ledger=out / "ledger.jsonl", progress=False)  # type: ignore[arg-type]  # test jobs
        results = []
        async with run:
            async for result in run:
                results.append(result)
                if stop_after is not None and len(results) == stop_after:
                    if how == "break":
                        break
                    if how == "aclose":
                        await run.aclose()
                    else:
                        run.stop()
    return results, run.summary


@pytest.mark.parametrize("how", [pytest.param(h, id=h) for h in ("break", "aclose", "stop")])
async def test_rerun_skips_done_jobs_and_sends_only_the_rest(
    emulator_factory: EmulatorFactory, tmp_path: Path, how: str
) -> None:
    """A run stopped part-way, re-run with the same ledger, sends only the jobs not yet done."""
    out = tmp_path / "out"
    async with emulator_factory(latency=0.03) as first:
        await run_batch(first, memory_jobs(20), out, stop_after=5, how=how)
    done = {line["id"] for line in ledger_lines(out / "ledger.jsonl") if line["status"] == "ok"}
    assert 5 <= len(done) < 20
    async with emulator_factory() as second:
        results, summary = await run_batch(second, memory_jobs(20), out)
        assert second.stats.requests == 20 - len(done)
    assert summary.skipped == len(done)
    assert {r.job.id for r in results if r.status == "skipped"} == done
    assert summary.ok == 20 - len(done)
    lines = ledger_lines(out / "ledger.jsonl")
    assert len(lines) == 20, "skipped jobs add no line; every job has exactly one"
    assert load_done_ids(out / "ledger.jsonl") == {f"job{i}" for i in range(20)}
    assert len(results_in(out)) == 20 and temp_files(out) == []


async def test_manifest_ids_are_stable_across_runs_and_folders(
    emulator_factory: EmulatorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same manifest gives the same ids on a re-run from another folder, so it resumes."""
    data = tmp_path / "data"
    manifest = csv_manifest(data, 12)
    out = tmp_path / "out"
    monkeypatch.chdir(data)
    async with emulator_factory() as first:
        await run_batch(first, na.read_manifest("manifest.csv"), out, stop_after=4)
    done = load_done_ids(out / "ledger.jsonl")
    monkeypatch.chdir(tmp_path)
    async with emulator_factory() as second:
        results, summary = await run_batch(second, na.read_manifest(manifest.resolve()), out)
        assert second.stats.requests == 12 - len(done)
    assert summary.skipped == len(done) >= 4
    assert {r.job.id for r in results if r.status == "skipped"} == done


async def test_a_job_whose_output_was_deleted_is_redone(emulator: Emulator, tmp_path: Path) -> None:
    """Done in the ledger but missing on disk: the job runs again."""
    out = tmp_path / "out"
    await run_batch(emulator, memory_jobs(8), out)
    (out / "job2.png").unlink()
    (out / "job5.png").unlink()
    before = emulator.stats.requests
    results, summary = await run_batch(emulator, memory_jobs(8), out)
    assert emulator.stats.requests - before == 2
    assert summary.skipped == 6 and summary.ok == 2
    assert sorted(str(r.job.id) for r in results if r.status == "ok") == ["job2", "job5"]
    assert_valid_image(out / "job2.png")


async def test_failed_jobs_run_again_on_resume(emulator: Emulator, tmp_path: Path) -> None:
    """Only ok jobs are skipped: a failed one is tried again and gets a second line."""
    out = tmp_path / "out"
    jobs = [na.MergeJob(flat_image(), make_image(), id="faceless"), na.MergeJob(make_image(), make_image(), id="fine")]
    await run_batch(emulator, jobs, out)
    _, summary = await run_batch(emulator, jobs, out)
    assert summary.skipped == 1 and summary.failed == {"IMAGE_NO_FACE_DETECTED": 1}
    lines = [line for line in ledger_lines(out / "ledger.jsonl") if line["id"] == "faceless"]
    assert [line["status"] for line in lines] == ["failed", "failed"]
    assert lines[0]["error_status"] == 400 and lines[0]["error_reason"] == "IMAGE_NO_FACE_DETECTED"


async def test_a_torn_last_line_is_tolerated(emulator: Emulator, tmp_path: Path) -> None:
    """A line cut short by a crash is ignored, and the next record starts on a line of its own."""
    out = tmp_path / "out"
    await run_batch(emulator, memory_jobs(3), out)
    ledger = out / "ledger.jsonl"
    with ledger.open("a") as handle:
        handle.write('{"id":"job1","status":"fai')  # killed mid-write
    results, summary = await run_batch(emulator, memory_jobs(5), out)
    assert summary.skipped == 3 and summary.ok == 2
    raw = ledger.read_text().splitlines()
    assert raw[3] == '{"id":"job1","status":"fai'
    parsed = [json.loads(line) for index, line in enumerate(raw) if index != 3]
    assert len(parsed) == 5
    assert {line["id"] for line in parsed[3:]} == {r.job.id for r in results if r.status == "ok"} == {"job3", "job4"}
    assert set(read_ledger(ledger)) == {f"job{i}" for i in range(5)}


async def test_each_line_is_on_disk_when_its_result_arrives(emulator: Emulator, tmp_path: Path) -> None:
    """The ledger is written before each result is handed over (another reader sees it at once)."""
    out = tmp_path / "out"
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client, \
            client.batch(memory_jobs(6), output_dir=out, ledger=out / "ledger.jsonl", progress=False) as run:
        async for result in run:
            assert result.job.id in {line["id"] for line in ledger_lines(out / "ledger.jsonl")}
            assert result.output is not None and result.output.exists()


def test_ledger_record_has_the_fields_the_issue_names(tmp_path: Path) -> None:
    """A line holds id, status, output, error status/reason/message, attempts and elapsed."""
    error = na.NoFaceDetectedError(status=400, reason="IMAGE_NO_FACE_DETECTED", message="no face")
    failed = JobResult(job=na.MergeJob("a.png", "b.png", id="x"), status=JobStatus.FAILED, error=error,
                       output=tmp_path / "x.png", attempts=1, elapsed=0.123456)
    record = ledger_record(failed)
    assert record["id"] == "x" and record["status"] == "failed"
    assert record["output"] == str(tmp_path / "x.png")
    assert (record["error_status"], record["error_reason"]) == (400, "IMAGE_NO_FACE_DETECTED")
    assert "no face" in record["error_message"]
    assert (record["attempts"], record["elapsed"]) == (1, 0.1235)
    ok = ledger_record(JobResult(job=na.MergeJob("a", "b", id="y"), status=JobStatus.OK, attempts=2))
    assert ok["error_reason"] is None and ok["error_status"] is None and ok["attempts"] == 2
    json.dumps(record)  # every value is JSON-ready


def test_read_ledger_keeps_the_last_record_per_id(tmp_path: Path) -> None:
    """The last line per id wins; blank, torn, foreign and non-object lines are skipped."""
    path = tmp_path / "ledger.jsonl"
    path.write_text(
        '{"id":"a","status":"failed"}\n'
        "\n"
        '{"id":"a","status":"ok"}\n'
        '["not", "a", "record"]\n'
        '{"no_id": true}\n'
        '{"id":"b","status":"ok"}\n'
        '{"id":"b","status":"failed"}\n'
        '{"id":"c","sta'
    )
    records = read_ledger(path)
    assert {k: v["status"] for k, v in records.items()} == {"a": "ok", "b": "failed"}
    assert load_done_ids(path) == {"a"}
    assert read_ledger(tmp_path / "missing.jsonl") == {}


def test_ledger_appends_whole_lines_and_creates_its_folder(tmp_path: Path) -> None:
    """A new ledger creates its folder; each append is one complete line; close is idempotent."""
    path = tmp_path / "deep" / "er" / "ledger.jsonl"
    ledger = Ledger(path)
    for index in range(3):
        ledger.append(JobResult(job=na.MergeJob("a", "b", id=f"j{index}"), status=JobStatus.OK))
        assert path.read_bytes().endswith(b"\n")
    ledger.close()
    ledger.close()
    assert [line["id"] for line in ledger_lines(path)] == ["j0", "j1", "j2"]
    reopened = Ledger(path)
    assert reopened.is_done("j1") and not reopened.is_done("j9")
    reopened.close()


async def test_temporary_files_of_dead_writers_are_swept_on_resume(emulator: Emulator, tmp_path: Path) -> None:
    """A re-run removes hidden temp files a killed run left; live writers' and other hosts' stay."""
    out = tmp_path / "out"
    out.mkdir()
    finished = await anyio.run_process([sys.executable, "-c", "import os; print(os.getpid())"])
    dead_pid = int(finished.stdout)  # that process has exited
    host = socket.gethostname()
    stale = out / f".job0.png.~{host}-{dead_pid}~abc123.part"
    live = out / f".job1.png.~{host}-{os.getpid()}~def456.part"
    foreign = out / f".job2.png.~another-host-{dead_pid}~ghi789.part"
    for path in (stale, live, foreign):
        path.write_bytes(b"half an image")
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client:
        results = [r async for r in client.batch(memory_jobs(2), output_dir=out, progress=False)]
    assert [r.status for r in results] == ["ok", "ok"]
    assert not stale.exists()
    assert live.exists() and foreign.exists()


def test_a_file_that_is_not_a_ledger_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """A manifest given as the ledger would get records appended to it: refused, unchanged."""
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("face_image,image\na.png,b.png\n")
    with pytest.raises(na.ConfigurationError) as caught:
        Ledger(manifest)
    assert f"{manifest} is not a ledger: its first line is text that is not JSON" in str(caught.value)
    assert manifest.read_text() == "face_image,image\na.png,b.png\n"
    Ledger(manifest.with_name("new.jsonl")).close()  # and nothing stays locked or open


def test_a_ledger_whose_first_line_was_torn_by_a_crash_still_opens(tmp_path: Path) -> None:
    """A crash in the first write leaves part of a record: still a ledger, its next record on a new line."""
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"id":"job-0","status":"o')
    ledger = Ledger(path)
    try:
        assert not ledger.is_done("job-0")
    finally:
        ledger.close()
    assert path.read_text().endswith('"o\n')


async def test_a_ledger_run_of_in_memory_jobs_without_ids_says_once_they_resume_by_place(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Jobs of bytes with no id are known to the ledger as job-<index>: the run warns once that a
    re-run takes the job at the same place as done, whatever its images are then."""
    unnamed = [na.MergeJob(*job_images(i)) for i in range(3)]
    async with client_for(emulator) as client:
        with caplog.at_level("WARNING", logger="novita_async"):
            results = await collect(client.batch(unnamed, ledger=tmp_path / "a.jsonl", progress=False))
            assert sorted(str(r.job.id) for r in results if r.ok) == ["job-0", "job-1", "job-2"]
            await collect(client.batch(memory_jobs(3), ledger=tmp_path / "b.jsonl", progress=False))
            await collect(client.batch(unnamed, progress=False))  # no ledger: nothing to resume
    warnings = [r.message for r in caplog.records if "their place in the job stream" in r.message]
    assert len(warnings) == 1 and "Give each job an id of your own" in warnings[0]


@pytest.mark.parametrize("where", [
    "folder",
    pytest.param("proc", marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")),
])
async def test_a_ledger_that_cannot_be_opened_is_an_output_error_naming_it(
    emulator: Emulator, tmp_path: Path, where: str
) -> None:
    """A folder, or a place the system will not make, given as the ledger: an OutputError that
    says it is the ledger (a bare IsADirectoryError or FileNotFoundError before), nothing sent."""
    path = tmp_path if where == "folder" else Path("/proc/self/novita/ledger.jsonl")
    async with client_for(emulator) as client:
        with pytest.raises(na.OutputError) as caught:
            await collect(client.batch(memory_jobs(2), ledger=path, progress=False))
    assert str(caught.value).startswith(f"cannot open the ledger {path}: ")
    assert "Give a ledger file in a folder you can write to" in str(caught.value)
    assert emulator.stats.requests == 0
