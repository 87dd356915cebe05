"""Shards and status: N workers split a job stream exactly, and one summary reads all their ledgers."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import novita_async as na
from novita_async._cli import main
from novita_async._jobs import job_identity
from novita_async._manifest import BadRow, ManifestError, read_manifest
from novita_async._shard import assign_id, parse_shard, shard_rpm
from novita_async._status import run_status
from novita_async.emulator import EmulatorConfig

from .batch_support import (
    ThreadedEmulator,
    csv_manifest,
    ledger_lines,
    write_csv,
    write_folder_inputs,
    write_inputs,
)
from .conftest import flat_image

# -- the partition ------------------------------------------------------------------------


def _ids(jobs: Iterator[Any]) -> list[str]:
    return [job.id for job in jobs]


def test_shard_of_is_pinned() -> None:
    """The hash is SHA-256 of the id, so every machine and Python agrees (values pinned)."""
    assert [na.shard_of(f"job-{i}", 4) for i in range(8)] == [0, 2, 1, 3, 3, 0, 3, 2]
    assert [na.shard_of(x, 7) for x in ("a", "b", "face1__photo1")] == [4, 0, 2]


def test_shard_of_agrees_across_processes() -> None:
    """A process with another hash seed puts the same ids in the same shards (unlike hash())."""
    ids = [f"row-{i}" for i in range(50)]
    code = ("import json, sys; from novita_async import shard_of; "
            "print(json.dumps([shard_of(i, 5) for i in json.loads(sys.argv[1])]))")
    other = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], capture_output=True,
                           text=True, check=True, env={"PYTHONHASHSEED": "12345"})
    assert json.loads(other.stdout) == [na.shard_of(i, 5) for i in ids]


@pytest.mark.parametrize("count", [pytest.param(n, id=f"{n}-shards") for n in (1, 2, 3, 7)])
def test_shards_cover_every_job_exactly_once(count: int) -> None:
    """N shards of 500 jobs: disjoint, and together every job once."""
    jobs = [na.MergeJob(f"/f/{i}.png", f"/i/{i}.png") for i in range(500)]
    shards = [_ids(na.shard_jobs(jobs, k, count)) for k in range(count)]
    everything = list(itertools.chain.from_iterable(shards))
    assert sorted(everything) == sorted(job_identity(j, i) for i, j in enumerate(jobs))
    assert len(set(everything)) == 500
    if count > 1:
        assert all(40 < len(s) < 500 for s in shards)  # each shard gets a share


def test_positional_ids_count_the_whole_stream() -> None:
    """Jobs without paths are numbered by their place in the full stream, not in the shard."""
    jobs = [na.MergeJob(b"face", b"image") for _ in range(60)]
    shards = [_ids(na.shard_jobs(iter(jobs), k, 3)) for k in range(3)]
    assert sorted(itertools.chain.from_iterable(shards)) == sorted(f"job-{i}" for i in range(60))
    assert all(na.shard_of(job_id, 3) == k for k, ids in enumerate(shards) for job_id in ids)


def test_sharding_is_deterministic_and_lazy() -> None:
    """The same stream splits the same way twice, and is read only as far as asked."""
    taken = 0

    def stream() -> Iterator[na.MergeJob]:
        nonlocal taken
        for i in itertools.count():
            taken += 1
            yield na.MergeJob(f"/f/{i}.png", f"/i/{i}.png")

    first = _ids(itertools.islice(na.shard_jobs(stream(), 1, 4), 10))
    assert taken < 200  # an endless stream: only what the 10 jobs needed
    taken = 0
    assert _ids(itertools.islice(na.shard_jobs(stream(), 1, 4), 10)) == first


async def _agen(jobs: list[na.MergeJob]) -> AsyncIterator[na.MergeJob]:
    for job in jobs:
        yield job


@pytest.mark.anyio
async def test_async_streams_shard_the_same_way() -> None:
    """An async iterable splits exactly as the same jobs in a list do."""
    jobs = [na.MergeJob(b"f", b"i") if i % 2 else na.MergeJob(f"/f{i}", "/i") for i in range(40)]
    for k in range(3):
        got = [job.id async for job in na.shard_jobs(_agen(jobs), k, 3)]
        assert got == _ids(na.shard_jobs(jobs, k, 3))


def test_bad_rows_go_to_exactly_one_shard(tmp_path: Path) -> None:
    """A manifest row that cannot be read is reported by one worker, not by all."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (tmp_path / name).write_bytes(b"")
    manifest = write_csv(tmp_path / "m.csv", ("face_image", "image"),
                         [("a.png", "b.png"), ("", "b.png"), ("c.png", "d.png")])
    items = [item for k in range(3) for item in na.shard_jobs(read_manifest(manifest), k, 3)]
    assert sorted(type(i).__name__ for i in items) == ["BadRow", "MergeJob", "MergeJob"]
    assert [i.id for i in items if isinstance(i, BadRow)] == ["row-3"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param("0/1", (0, 1), id="only"), pytest.param(" 2/3 ", (2, 3), id="spaces"),
     pytest.param("9/10", (9, 10), id="last")],
)
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    """K/N parses to (K, N), K counted from 0."""
    assert parse_shard(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [pytest.param("3/3", r"0\.\.2", id="index-too-big"),
     pytest.param("-1/3", r"0\.\.2", id="negative"),
     pytest.param("1/0", ">= 1", id="zero-shards"),
     pytest.param("1", "not K/N", id="no-slash"),
     pytest.param("a/b", "not K/N", id="not-numbers")],
)
def test_parse_shard_errors_say_what_is_wrong(text: str, message: str) -> None:
    """A bad K/N says which part is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_shard(text)


def test_rpm_split() -> None:
    """Each of N workers gets the account's pace divided by N; no pace stays no pace."""
    assert shard_rpm(60, 4) == 15
    assert shard_rpm(None, 4) is None


# -- status --------------------------------------------------------------------------------


def _ledger(path: Path, *records: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_status_sums_ledgers(tmp_path: Path) -> None:
    """Done, failed by reason and not attempted add up over ledgers; a missing ledger is empty."""
    a = _ledger(tmp_path / "ledger.shard-0-of-3.jsonl",
                {"id": "j1", "status": "failed", "error_reason": "RATE_LIMIT_EXCEEDED"},
                {"id": "j1", "status": "ok"},
                {"id": "j2", "status": "failed", "error_reason": "IMAGE_NO_FACE_DETECTED"})
    b = _ledger(tmp_path / "ledger.shard-1-of-3.jsonl",
                {"id": "j3", "status": "ok"}, {"id": "j4", "status": "not_attempted"})
    with b.open("a") as handle:
        handle.write('{"id": "j5", "sta')  # a tail torn by a crash
    status = run_status([a, b, tmp_path / "ledger.shard-2-of-3.jsonl"])
    assert (status.total.done, dict(status.total.failed), status.total.not_attempted) == (
        2, {"IMAGE_NO_FACE_DETECTED": 1}, 1)
    assert status.ledgers[2][1] is None and status.left is None
    table = status.table()
    assert "(not found)" in table and "IMAGE_NO_FACE_DETECTED 1" in table and "unknown" in table


def test_status_with_manifest_counts_what_is_left(tmp_path: Path) -> None:
    """With the manifest: never-run jobs, left, and ids from elsewhere; done in any ledger wins."""
    manifest = write_csv(tmp_path / "m.csv", ("face_image", "image", "id"),
                         [("a.png", "b.png", "j1"), ("a.png", "b.png", "j2"), ("a.png", "c.png", "j3"),
                          ("a.png", "c.png", "j3"), ("a.png", "d.png", "")])
    _ledger(tmp_path / "ledger.shard-0-of-2.jsonl",
            {"id": "j1", "status": "failed", "error_reason": "ServerError"},
            {"id": "old", "status": "ok"})
    _ledger(tmp_path / "ledger.shard-1-of-2.jsonl", {"id": "j1", "status": "ok"},
            {"id": "j2", "status": "failed", "error_reason": "IMAGE_NO_FACE_DETECTED"})
    status = run_status([tmp_path], manifest=manifest)
    # j3 twice is one job; the last row gets a path-hash id and was never run.
    assert status.manifest_jobs == 4
    assert (status.total.done, status.never_run, status.left, status.foreign) == (1, 2, 3, 1)
    assert "left 3 (2 never run, 1 failed or not attempted)" in status.table()


def test_status_needs_a_readable_manifest(tmp_path: Path) -> None:
    """A manifest that is not there is an error, not an empty run."""
    with pytest.raises(ManifestError):
        run_status([tmp_path], manifest=tmp_path / "nope.csv")


# -- the command line ----------------------------------------------------------------------


@pytest.fixture
def emu() -> Iterator[ThreadedEmulator]:
    """An emulator on its own thread (main() runs its own event loop)."""
    with ThreadedEmulator(EmulatorConfig(engine="composite")) as server:
        yield server


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _per_minute(starts: Iterable[float]) -> float:
    """The pace of request starts, per minute, over the run."""
    ordered = sorted(starts)
    assert len(ordered) >= 4, ordered
    return (len(ordered) - 1) / (ordered[-1] - ordered[0]) * 60


def _batch(server: ThreadedEmulator, manifest: Path, out: Path, *extra: object) -> list[object]:
    return ["batch", manifest, "-o", out, "--no-progress", "--base-url", server.url,
            "--api-key", server.api_key, *extra]


def test_cli_shards_do_every_job_once_and_resume_per_shard(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three `--shard K/3` workers: each its own ledger, every job once; a re-run redoes only what is gone."""
    manifest = csv_manifest(tmp_path, 30)
    out = tmp_path / "out"
    for k in range(3):
        code, _, err = _run(capsys, *_batch(emu, manifest, out, "--shard", f"{k}/3"))
        assert code == 0, err
    ledgers = [out / f"ledger.shard-{k}-of-3.jsonl" for k in range(3)]
    ids = [[r["id"] for r in ledger_lines(p)] for p in ledgers]
    assert sorted(itertools.chain.from_iterable(ids)) == sorted(
        assign_id(item, i)[0] for i, item in enumerate(read_manifest(manifest)))
    assert len(set(itertools.chain.from_iterable(ids))) == 30
    assert sum(emu.stats.successes.values()) == 30 and set(emu.stats.successes.values()) == {1}
    assert not (out / "ledger.jsonl").exists()

    # Shard 1 again, after losing two of its results: only those two are sent.
    lost = [Path(r["output"]) for r in ledger_lines(ledgers[1])[:2]]
    for path in lost:
        path.unlink()
    code, _, err = _run(capsys, *_batch(emu, manifest, out, "--shard", "1/3"))
    assert code == 0, err
    assert emu.stats.requests == 32
    assert all(path.is_file() for path in lost)

    code, text, _ = _run(capsys, "status", out, "--manifest", manifest)
    assert code == 0
    assert text.splitlines()[-2].split() == ["all", "30", "0", "0", "30"]
    assert "left 0 (0 never run" in text


def test_rows_naming_one_output_meet_in_one_shard(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two rows with ids of different shards and one output: the same shard gets both, and refuses
    the second as a duplicate, instead of two workers each writing the file (the later over the
    earlier, both recorded ok)."""
    ids = [f"row{i}" for i in range(8)]
    first = ids[0]
    second = next(i for i in ids if na.shard_of(i, 2) != na.shard_of(first, 2))  # apart by id
    (face, photo), (face2, photo2) = write_inputs(tmp_path / "in", 2)
    manifest = write_csv(tmp_path / "manifest.csv", ("face_image", "image", "output", "id"), [
        (face, photo, "same.png", first), (face2, photo2, "./same.png", second)])
    out = tmp_path / "out"
    codes = [_run(capsys, *_batch(emu, manifest, out, "--shard", f"{k}/2"))[0] for k in range(2)]
    assert sorted(codes) == [0, 1]  # one shard did both rows: one ok, one refused
    lines = [line for k in range(2) for line in ledger_lines(out / f"ledger.shard-{k}-of-2.jsonl")]
    assert [line["status"] for line in lines] == ["ok"]  # a refused duplicate writes no line
    assert emu.stats.requests == 1
    assert (out / "same.png").is_file()


def test_a_run_with_other_shards_or_none_sends_nothing_the_folder_s_ledgers_record_done(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finishing shard 0/2's folder without --shard sends only what it left; three shards done,
    then `--shard 0/2` (the worker count changed) sends nothing: every ledger of the folder counts."""
    manifest = csv_manifest(tmp_path, 20)
    out = tmp_path / "out"
    code, _, err = _run(capsys, *_batch(emu, manifest, out, "--shard", "0/2"))
    assert code == 0, err
    first = emu.stats.requests
    assert 0 < first < 20
    code, text, err = _run(capsys, *_batch(emu, manifest, out))
    assert code == 0, err
    assert emu.stats.requests == 20  # the rest, once each
    assert f"skipped {first}" in text + err

    again = tmp_path / "again"
    for k in range(3):
        assert _run(capsys, *_batch(emu, manifest, again, "--shard", f"{k}/3"))[0] == 0
    sent = emu.stats.requests
    for k in range(2):
        code, _, err = _run(capsys, *_batch(emu, manifest, again, "--shard", f"{k}/2"))
        assert code == 0, err
    assert emu.stats.requests == sent
    code, text, _ = _run(capsys, "status", again, "--manifest", manifest)
    assert "left 0 (0 never run" in text


def test_cli_shard_paces_at_its_share(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--rpm 1800 --shard 0/3` starts at most 600/min; `--rpm-per-worker` overrides the split."""
    manifest = csv_manifest(tmp_path, 24)
    code, _, err = _run(capsys, *_batch(emu, manifest, tmp_path / "a", "--shard", "0/3",
                                        "--rpm", 1800, "--concurrency", 4))
    assert code == 0, err
    assert "pacing at 600/min (account total 1800/min)" in err
    # 600/min: 0.1 s apart on average, not 1800/min's 0.033 s (one gap may be
    # shorter when the sleep before it overshot: the pace does not bank idle time).
    assert _per_minute(emu.stats.started_at) == pytest.approx(600, rel=0.1)

    emu.stats.started_at.clear()
    code, _, err = _run(capsys, *_batch(emu, manifest, tmp_path / "b", "--shard", "1/3",
                                        "--rpm", 1800, "--rpm-per-worker", 300))
    assert code == 0, err
    assert "pacing at 300/min" in err
    assert _per_minute(emu.stats.started_at) == pytest.approx(300, rel=0.1)


def test_cli_status_reports_failures_by_reason(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A faceless image in one shard shows in the summary of all shards, by reason; exit 0."""
    pairs = write_inputs(tmp_path / "in", 6)
    (tmp_path / "in" / "flat.png").write_bytes(flat_image())
    rows = [(str(f), str(t)) for f, t in pairs] + [(str(tmp_path / "in" / "flat.png"), str(pairs[0][1]))]
    manifest = write_csv(tmp_path / "m.csv", ("face_image", "image"), rows)
    out = tmp_path / "out"
    codes = [_run(capsys, *_batch(emu, manifest, out, "--shard", f"{k}/2"))[0] for k in range(2)]
    assert sorted(codes) == [0, 1]  # the shard with the faceless row reports a failure
    code, text, _ = _run(capsys, "status", *sorted(out.glob("ledger.shard-*.jsonl")),
                         "--manifest", manifest)
    assert code == 0
    assert "failed by reason: IMAGE_NO_FACE_DETECTED 1" in text
    assert "left 1 (0 never run, 1 failed or not attempted)" in text
    code, text, _ = _run(capsys, "status", out, "--json")
    assert json.loads(text)["total"] == {"done": 6, "failed": {"IMAGE_NO_FACE_DETECTED": 1},
                                         "not_attempted": 0, "recorded": 7}


@pytest.mark.parametrize(
    ("argv", "message"),
    [pytest.param(["--shard", "3/3"], "0..2", id="shard-out-of-range"),
     pytest.param(["--rpm-per-worker", "10"], "--rpm-per-worker goes with --shard", id="rpm-per-worker-alone")],
)
def test_cli_shard_usage_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --shard or a lone --rpm-per-worker exits 2 with a message, no traceback."""
    manifest = csv_manifest(tmp_path, 1)
    try:
        code = main(["batch", str(manifest), "-o", str(tmp_path / "o"), "--api-key", "sk_x",
                     "--base-url", "http://127.0.0.1:9", *argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_status_of_a_run_over_two_folders(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --faces --images` counts what is left of a folder run, as the batch pairs them."""
    faces, images = write_folder_inputs(tmp_path, 3)
    out = tmp_path / "out"
    code, _, _ = _run(capsys, "batch", "--faces", faces, "--images", images, "-o", out, "--no-progress",
                      "--base-url", emu.url, "--api-key", emu.api_key)
    assert code == 0
    write_folder_inputs(tmp_path, 2, start=3)  # two more pairs since
    code, text, _ = _run(capsys, "status", out, "--faces", faces, "--images", images)
    assert code == 0
    assert "left 2 (2 never run, 0 failed or not attempted)" in text
    code, text, _ = _run(capsys, "status", out, "--faces", faces, "--images", images, "--pair", "product",
                         "--json")
    assert json.loads(text)["manifest_jobs"] == 25


@pytest.mark.parametrize(
    ("argv", "message"),
    [pytest.param(["--faces", "{tmp}"], "both --faces DIR and --images DIR", id="faces-alone"),
     pytest.param(["--manifest", "{tmp}/m.csv", "--faces", "{tmp}", "--images", "{tmp}"], "not both",
                  id="manifest-and-folders"),
     pytest.param(["--faces", "{tmp}/nope", "--images", "{tmp}"], "nope", id="missing-folder")],
)
def test_cli_status_usage_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Status with half a folder pair, or two kinds of job list, or a missing folder: exit 2, said why."""
    code = main(["status", str(tmp_path), *(a.format(tmp=tmp_path) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_status_takes_a_manifest_or_jobs_not_both(tmp_path: Path) -> None:
    """run_status(manifest=..., jobs=...) is a usage mistake, said as such."""
    with pytest.raises(ValueError, match="not both"):
        run_status([tmp_path], manifest=tmp_path / "m.csv", jobs=[])


def test_cli_status_of_nothing_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Status before any shard started: with the manifest, every ledger 'not found' and every job
    left, exit 0; without it there is nothing to say, and a mistyped path would pass for that: exit 2."""
    ledgers = [tmp_path / "ledger.shard-0-of-2.jsonl", tmp_path / "ledger.shard-1-of-2.jsonl"]
    manifest = csv_manifest(tmp_path / "data", 3)
    code, text, _ = _run(capsys, "status", *ledgers, "--manifest", manifest)
    assert code == 0 and text.count("(not found)") == 2
    assert "manifest: 3 jobs; left 3 (3 never run" in text
    code, text, err = _run(capsys, "status", *ledgers)
    assert code == 2 and text == ""
    assert f"no ledger found at {ledgers[0]}, {ledgers[1]}" in err and "--manifest" in err
