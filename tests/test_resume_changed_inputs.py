"""Re-runs over new data at the same paths: a done job whose input now has another size is sent
again (its old result is not this input's); a copy or a touch (same sizes) sends nothing."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import novita_async as na
from novita_async._cli import main
from novita_async.emulator import Emulator, EmulatorConfig, job_key

from .batch_support import ThreadedEmulator, assert_valid_image, client_for, ledger_lines, write_csv, write_inputs
from .conftest import flat_image, make_image

#: Another picture with a face, of another size than write_inputs' faces.
NEW_FACE = make_image((72, 72), color=(180, 100, 60), seed=7)


@pytest.fixture
def emu() -> Iterator[ThreadedEmulator]:
    """An emulator serving from its own thread (main() runs its own event loop)."""
    with ThreadedEmulator(EmulatorConfig(engine="composite")) as server:
        yield server


def _jobs(tmp_path: Path) -> list[na.MergeJob]:
    """Two jobs on files, ids ``a`` and ``b``."""
    return [na.MergeJob(face, image, id=name) for name, (face, image) in zip("ab", write_inputs(tmp_path / "in", 2),
                                                                            strict=True)]


async def _run(emulator: Emulator, jobs: list[na.MergeJob], tmp_path: Path, *, ledger: str = "ledger.jsonl",
               output_dir: bool = True) -> tuple[dict[str, na.JobResult], na.BatchSummary]:
    out = tmp_path / "out"
    results = {}
    async with client_for(emulator) as client:
        run = client.batch(jobs, output_dir=out if output_dir else None, ledger=out / ledger)
        async with run:
            async for result in run:
                results[result.job.id or ""] = result
                await anyio.sleep(0.01)  # a consumer that takes its time with each result
    return results, run.summary


def _face(job: na.MergeJob) -> Path:
    """The job's face file."""
    return Path(str(job.face_image))


def _read(path: object) -> bytes:
    """The bytes of a file."""
    return Path(str(path)).read_bytes()


@pytest.mark.anyio
async def test_a_done_job_whose_face_file_is_another_image_now_is_sent_again(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The face file replaced by another picture (another size): the job is merged again, its output
    is the new result, its new ok line keeps the new sizes, one INFO line names it, and the summary
    counts it; the unchanged job is skipped.  A run after that sends nothing."""
    jobs = _jobs(tmp_path)
    first, _ = await _run(emulator, jobs, tmp_path)
    output = first["a"].output
    assert output is not None
    old_result = output.read_bytes()
    ledger = tmp_path / "out" / "ledger.jsonl"
    [line_a] = [line for line in ledger_lines(ledger) if line["id"] == "a"]
    assert line_a["inputs"] == [[os.stat(str(p)).st_size, os.stat(str(p)).st_mtime_ns] for p in
                                (jobs[0].face_image, jobs[0].image)]
    old_size = _face(jobs[0]).stat().st_size
    _face(jobs[0]).write_bytes(NEW_FACE)
    caplog.set_level(logging.INFO, logger="novita_async")

    again, summary = await _run(emulator, jobs, tmp_path)
    assert (again["a"].status, again["b"].status) == ("ok", "skipped")
    assert emulator.stats.attempts[job_key(NEW_FACE, _read(jobs[0].image))] == 1
    assert emulator.stats.requests == 3
    assert output.read_bytes() != old_result
    assert_valid_image(output)
    assert ledger_lines(ledger)[-1]["id"] == "a" and ledger_lines(ledger)[-1]["inputs"][0][0] == len(NEW_FACE)
    assert summary.inputs_changed == 1 and summary.as_dict()["inputs_changed"] == 1
    assert "inputs changed 1 (done before, not skipped)" in summary.line()
    [message] = [r.getMessage() for r in caplog.records if "not skipped" in r.getMessage()]
    assert message == (f"job a was done, but its face_image {_face(jobs[0])} is {len(NEW_FACE)} bytes now, "
                       f"{old_size} then: not skipped")

    third, summary = await _run(emulator, jobs, tmp_path)
    assert {r.status for r in third.values()} == {"skipped"} and emulator.stats.requests == 3
    assert summary.inputs_changed == 0 and "inputs changed" not in summary.line()


@pytest.mark.anyio
async def test_a_touched_or_copied_file_is_still_skipped(emulator: Emulator, tmp_path: Path) -> None:
    """Same bytes, another modification time (a copy, a checkout, `touch`): still done, nothing sent."""
    jobs = _jobs(tmp_path)
    await _run(emulator, jobs, tmp_path)
    face = _face(jobs[0])
    info = face.stat()
    os.utime(face, ns=(info.st_atime_ns, info.st_mtime_ns - 86_400 * 10**9))
    _face(jobs[1]).write_bytes(_face(jobs[1]).read_bytes())  # rewritten: a new mtime
    again, summary = await _run(emulator, jobs, tmp_path)
    assert {r.status for r in again.values()} == {"skipped"}
    assert emulator.stats.requests == 2 and summary.inputs_changed == 0


@pytest.mark.anyio
async def test_an_ok_record_without_input_sizes_stays_done(emulator: Emulator, tmp_path: Path) -> None:
    """A ledger written before sizes were kept on ok lines: its done jobs stay done, whatever the files."""
    jobs = _jobs(tmp_path)
    await _run(emulator, jobs, tmp_path)
    ledger = tmp_path / "out" / "ledger.jsonl"
    old_format = [{k: v for k, v in line.items() if k != "inputs"} for line in ledger_lines(ledger)]
    ledger.write_text("".join(json.dumps(line) + "\n" for line in old_format))
    _face(jobs[0]).write_bytes(NEW_FACE)
    again, summary = await _run(emulator, jobs, tmp_path)
    assert {r.status for r in again.values()} == {"skipped"}
    assert emulator.stats.requests == 2 and summary.inputs_changed == 0


@pytest.mark.anyio
async def test_done_in_a_sibling_ledger_with_changed_inputs_is_sent_again(emulator: Emulator, tmp_path: Path) -> None:
    """A job another ledger of the folder records done (with sizes) is sent again when its input changed;
    then this ledger's newer record counts, and nothing more is sent."""
    jobs = _jobs(tmp_path)
    await _run(emulator, jobs, tmp_path, ledger="ledger.shard-0-of-1.jsonl")
    _face(jobs[1]).write_bytes(NEW_FACE)
    again, summary = await _run(emulator, jobs, tmp_path)
    assert (again["a"].status, again["b"].status) == ("skipped", "ok")
    assert emulator.stats.requests == 3 and summary.inputs_changed == 1
    assert [line["id"] for line in ledger_lines(tmp_path / "out" / "ledger.jsonl")] == ["b"]
    third, _ = await _run(emulator, jobs, tmp_path)
    assert {r.status for r in third.values()} == {"skipped"} and emulator.stats.requests == 3


@pytest.mark.anyio
async def test_changed_to_a_faceless_image_is_sent_once(emulator: Emulator, tmp_path: Path) -> None:
    """Done in a sibling ledger, then the face file replaced by a faceless one: sent again (no face),
    the earlier result is left in place, and the run after that does not send it a third time
    (the newer "no face" record stands)."""
    jobs = _jobs(tmp_path)
    first, _ = await _run(emulator, jobs, tmp_path, ledger="ledger.shard-0-of-1.jsonl")
    output = first["a"].output
    assert output is not None
    old_result = output.read_bytes()
    _face(jobs[0]).write_bytes(flat_image())
    again, _ = await _run(emulator, jobs, tmp_path)
    assert again["a"].error_reason == "IMAGE_NO_FACE_DETECTED" and emulator.stats.requests == 3
    assert output.read_bytes() == old_result
    assert [line["status"] for line in ledger_lines(tmp_path / "out" / "ledger.jsonl")
            if line["id"] == "a"][-1] == "failed"
    third, summary = await _run(emulator, jobs, tmp_path)
    assert isinstance(third["a"].error, na.NoFaceFoundBeforeError) and emulator.stats.requests == 3
    assert summary.no_face_before == 1 and summary.inputs_changed == 1


@pytest.mark.anyio
async def test_results_in_memory_keep_their_input_sizes_too(emulator: Emulator, tmp_path: Path) -> None:
    """Without an output folder (results handed over in memory, their ok lines written once taken),
    the lines keep the input sizes, and a changed input is sent again."""
    jobs = _jobs(tmp_path)
    await _run(emulator, jobs, tmp_path, output_dir=False)
    assert all("inputs" in line for line in ledger_lines(tmp_path / "out" / "ledger.jsonl"))
    _face(jobs[0]).write_bytes(NEW_FACE)
    again, summary = await _run(emulator, jobs, tmp_path, output_dir=False)
    assert (again["a"].status, again["b"].status) == ("ok", "skipped")
    assert again["a"].result is not None and again["a"].result.data
    assert emulator.stats.requests == 3 and summary.inputs_changed == 1


def test_cli_rerun_over_new_data_says_what_it_sent_again(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batch` re-run after a frame was rewritten: that job is merged again (exit 0), the summary says so."""
    pairs = write_inputs(tmp_path / "in", 3)
    manifest = write_csv(tmp_path / "in" / "jobs.csv", ("face_image", "image"), [(f.name, i.name) for f, i in pairs])
    argv = ["batch", str(manifest), "-o", str(tmp_path / "out"), "--no-progress",
            "--base-url", emu.url, "--api-key", emu.api_key]
    assert main(argv) == 0
    capsys.readouterr()
    pairs[2][1].write_bytes(make_image((96, 72), color=(30, 150, 200), seed=9))
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "ok 1, failed 0, skipped 2 (resumed), inputs changed 1 (done before, not skipped)" in err
    assert emu.stats.requests == 4
