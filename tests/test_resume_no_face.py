"""Re-runs: jobs the API found no face in are not sent again while their files are unchanged, and
an earlier run's settled records (done, no face) are never written over by a later run's lines."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import novita_async as na
from novita_async._cli import main
from novita_async._manifest import BadRow
from novita_async.emulator import Emulator, EmulatorConfig

from .batch_support import ThreadedEmulator, client_for, ledger_lines, write_csv, write_inputs
from .conftest import flat_image, make_image


@pytest.fixture
def emu() -> Iterator[ThreadedEmulator]:
    """An emulator serving from its own thread (main() runs its own event loop)."""
    with ThreadedEmulator(EmulatorConfig(engine="composite")) as server:
        yield server


def _jobs(tmp_path: Path) -> list[na.MergeJob]:
    """Two jobs: ``a`` has faces, ``b``'s face image is flat (no face to the emulator)."""
    (face_a, image_a), (face_b, image_b) = write_inputs(tmp_path / "in", 2)
    face_b.write_bytes(flat_image())
    return [na.MergeJob(face_a, image_a, id="a"), na.MergeJob(face_b, image_b, id="b")]


def _copy(source: object, target: object) -> None:
    """Overwrite the file ``target`` with ``source`` (bytes, or the bytes of a file)."""
    data = source if isinstance(source, bytes) else Path(str(source)).read_bytes()
    Path(str(target)).write_bytes(data)


async def _run(emulator: Emulator, jobs: Iterable[na.MergeJob | BadRow], tmp_path: Path,
               *, resend_no_face: bool = False, **client: Any) -> tuple[dict[str, na.JobResult], na.BatchSummary]:
    async with client_for(emulator, **client) as batch_client:
        run = batch_client.batch(jobs, output_dir=tmp_path / "out", ledger=tmp_path / "out" / "ledger.jsonl",
                                 resend_no_face=resend_no_face)
        async with run:
            results = {result.job.id or "": result async for result in run}
    return results, run.summary


@pytest.mark.anyio
async def test_a_job_with_no_face_is_not_sent_again_while_its_files_are_unchanged(
    emulator: Emulator, tmp_path: Path
) -> None:
    """The re-run fails it at once with NoFaceFoundBeforeError (a NoFaceDetectedError), sends
    nothing, and leaves the ledger's record (with the inputs' sizes and times) as it was."""
    jobs = _jobs(tmp_path)
    first, _ = await _run(emulator, jobs, tmp_path)
    assert first["b"].error_reason == "IMAGE_NO_FACE_DETECTED"
    ledger = tmp_path / "out" / "ledger.jsonl"
    recorded = ledger_lines(ledger)
    [no_face] = [line for line in recorded if line["id"] == "b"]
    stats = [os.stat(str(path)) for path in (jobs[1].face_image, jobs[1].image)]
    assert no_face["inputs"] == [[info.st_size, info.st_mtime_ns] for info in stats]
    sent = emulator.stats.requests

    again, summary = await _run(emulator, jobs, tmp_path)
    assert emulator.stats.requests == sent
    assert again["a"].status == "skipped"
    error = again["b"].error
    assert again["b"].status == "failed" and isinstance(error, na.NoFaceFoundBeforeError)
    assert again["b"].error_reason == "IMAGE_NO_FACE_DETECTED"
    assert "in an earlier run" in str(error) and "--resend-no-face" in str(error)
    assert summary.failed == {"IMAGE_NO_FACE_DETECTED": 1} and summary.no_face_before == 1
    assert "not sent again 1 (no face in an earlier run)" in summary.line()
    assert ledger_lines(ledger) == recorded


@pytest.mark.anyio
async def test_a_changed_input_file_is_sent_again(emulator: Emulator, tmp_path: Path) -> None:
    """Replacing the faceless image (a new size or time) sends the job again, and now it merges."""
    jobs = _jobs(tmp_path)
    await _run(emulator, jobs, tmp_path)
    sent = emulator.stats.requests
    _copy(jobs[0].face_image, jobs[1].face_image)
    again, summary = await _run(emulator, jobs, tmp_path)
    assert emulator.stats.requests == sent + 1
    assert again["b"].status == "ok" and summary.no_face_before == 0


@pytest.mark.anyio
async def test_resend_no_face_sends_it_anyway(emulator: Emulator, tmp_path: Path) -> None:
    """resend_no_face=True sends the job again; its new answer is recorded."""
    jobs = _jobs(tmp_path)
    await _run(emulator, jobs, tmp_path)
    sent = emulator.stats.requests
    again, summary = await _run(emulator, jobs, tmp_path, resend_no_face=True)
    assert emulator.stats.requests == sent + 1
    assert type(again["b"].error) is na.NoFaceDetectedError and summary.no_face_before == 0
    assert sorted(line["id"] for line in ledger_lines(tmp_path / "out" / "ledger.jsonl")) == ["a", "b", "b"]


@pytest.mark.anyio
async def test_inputs_that_are_not_files_are_sent_again(emulator: Emulator, tmp_path: Path) -> None:
    """Bytes carry no size and time to compare: such a job is sent on every run, as before."""
    _face, image = write_inputs(tmp_path / "in", 1)[0]
    jobs = [na.MergeJob(flat_image(), image.read_bytes(), id="b")]
    await _run(emulator, jobs, tmp_path)
    assert "inputs" not in ledger_lines(tmp_path / "out" / "ledger.jsonl")[0]
    again, _ = await _run(emulator, jobs, tmp_path)
    assert emulator.stats.requests == 2
    assert type(again["b"].error) is na.NoFaceDetectedError


@pytest.mark.anyio
async def test_a_batch_stopped_early_keeps_the_records_of_jobs_settled_before(
    emulator: Emulator, emulator_factory: Callable[..., Emulator], tmp_path: Path
) -> None:
    """A fatal error (balance exhausted) on a new job drains the rest as not attempted, but a job
    done before stays skipped and a no-face job stays not sent: no "not_attempted" line goes
    over their records, so the next run still sends neither."""
    jobs = _jobs(tmp_path)
    await _run(emulator, jobs, tmp_path)
    ledger = tmp_path / "out" / "ledger.jsonl"
    recorded = ledger_lines(ledger)
    # New jobs first, enough that a and b are still unread when the batch stops.
    new = [na.MergeJob(f, i, id=f"new{n}") for n, (f, i) in enumerate(write_inputs(tmp_path / "new", 6, start=7))]
    async with emulator_factory(engine="composite", balance=0) as broke:
        stopped, summary = await _run(broke, [*new, *jobs], tmp_path, max_concurrency=1)
    assert summary.stop_reason is not None
    # Whichever new job reached the server first met the empty balance (which one may vary).
    assert [stopped[job.id or ""].error_reason for job in new].count("BILLING_BALANCE_NOT_ENOUGH") == 1
    assert summary.not_attempted >= 3
    assert stopped["a"].status == "skipped"
    assert isinstance(stopped["b"].error, na.NoFaceFoundBeforeError)
    after = ledger_lines(ledger)
    assert after[: len(recorded)] == recorded
    assert {line["id"] for line in after[len(recorded):]} == {job.id for job in new}
    sent = emulator.stats.requests
    await _run(emulator, jobs, tmp_path)
    assert emulator.stats.requests == sent


@pytest.mark.anyio
async def test_a_done_job_whose_row_turned_bad_keeps_its_record(emulator: Emulator, tmp_path: Path) -> None:
    """A row done in an earlier run whose input has since moved away is skipped, not written over
    with a failure: once the file is back, nothing is merged again."""
    pairs = write_inputs(tmp_path / "in", 2)
    manifest = write_csv(tmp_path / "in" / "m.csv", ("face_image", "image"), [(f.name, i.name) for f, i in pairs])
    first, _ = await _run(emulator, na.read_manifest(manifest), tmp_path)
    assert {r.status for r in first.values()} == {"ok"}
    recorded = ledger_lines(tmp_path / "out" / "ledger.jsonl")
    moved = tmp_path / "moved.png"
    pairs[0][0].replace(moved)
    again, _ = await _run(emulator, na.read_manifest(manifest), tmp_path)
    assert sorted(r.status for r in again.values()) == ["skipped", "skipped"]
    assert ledger_lines(tmp_path / "out" / "ledger.jsonl") == recorded
    moved.replace(pairs[0][0])
    sent = emulator.stats.requests
    await _run(emulator, na.read_manifest(manifest), tmp_path)
    assert emulator.stats.requests == sent


@pytest.mark.anyio
async def test_the_files_are_fingerprinted_as_they_were_sent(
    emulator_factory: Callable[..., Emulator], tmp_path: Path
) -> None:
    """A faceless file fixed while its request is in flight is recorded as it was sent, so the
    next run sees the change and sends the job (which now merges)."""
    jobs = _jobs(tmp_path)[1:]
    sent_size = os.stat(str(jobs[0].face_image)).st_size
    async with emulator_factory(engine="composite", latency=0.5) as emu:
        async with anyio.create_task_group() as group:
            group.start_soon(_run, emu, jobs, tmp_path)
            for _ in range(500):  # until the request is at the server
                if emu.stats.in_flight:
                    break
                await anyio.sleep(0.01)
            _copy(make_image((64, 64), color=(200, 120, 80), seed=3), jobs[0].face_image)
        [line] = ledger_lines(tmp_path / "out" / "ledger.jsonl")
        assert line["error_reason"] == "IMAGE_NO_FACE_DETECTED" and line["inputs"][0][0] == sent_size
        again, _ = await _run(emu, jobs, tmp_path)
        assert again["b"].status == "ok" and emu.stats.requests == 2


@pytest.mark.parametrize(("flag", "sent"), [pytest.param([], 0, id="default"),
                                            pytest.param(["--resend-no-face"], 1, id="resend-no-face")])
def test_cli_rerun_says_what_it_did_not_send(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: list[str], sent: int
) -> None:
    """`batch` re-run: the no-face job is a failure (exit 1) either way; it is sent only with the flag."""
    jobs = _jobs(tmp_path)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps({"face_image": str(j.face_image), "image": str(j.image),
                                            "id": j.id}) + "\n" for j in jobs))
    argv = ["batch", str(manifest), "-o", str(tmp_path / "out"), "--no-progress",
            "--base-url", emu.url, "--api-key", emu.api_key]
    assert main(argv) == 1
    capsys.readouterr()
    before = emu.stats.requests
    assert main([*argv, *flag]) == 1
    err = capsys.readouterr().err
    assert emu.stats.requests == before + sent
    assert "failed b: IMAGE_NO_FACE_DETECTED" in err
    assert ("not sent again 1 (no face in an earlier run)" in err) is (sent == 0)
