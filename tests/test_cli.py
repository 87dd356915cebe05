"""The command line as a user runs it: in-process against a live emulator, and as real processes."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from novita_async._cli import _client_from_args, build_parser, main
from novita_async.emulator import EmulatorConfig, Faults

from .batch_support import (
    ThreadedEmulator,
    assert_valid_image,
    csv_manifest,
    ledger_lines,
    results_in,
    write_csv,
    write_inputs,
)
from .conftest import flat_image

SUMMARY = re.compile(r"^ok (\d+), failed (\d+).*skipped (\d+) \(resumed\)", re.MULTILINE)


@pytest.fixture
def emu() -> Iterator[ThreadedEmulator]:
    """An emulator serving from its own thread (main() runs its own event loop)."""
    with ThreadedEmulator(EmulatorConfig(engine="composite")) as server:
        yield server


def connect(server: ThreadedEmulator) -> list[str]:
    """The connection options for ``server``."""
    return ["--base-url", server.url, "--api-key", server.api_key]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def summary_counts(err: str) -> tuple[int, int, int]:
    """(ok, failed, skipped) from the summary line on stderr."""
    match = SUMMARY.search(err)
    assert match, f"no summary line in {err!r}"
    ok, failed, skipped = match.groups()
    return int(ok), int(failed), int(skipped)


# -- merge ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "fmt"), [pytest.param(t, f, id=t) for t, f in
                                           (("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG"))])
def test_merge_writes_the_requested_type(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, fmt: str
) -> None:
    """`merge FACE IMAGE -o OUT --type T` writes a T image and exits 0."""
    [(face, image)] = write_inputs(tmp_path, 1)
    out = tmp_path / "out" / "merged.img"
    code, _, err = run_cli(capsys, "merge", face, image, "-o", out, "--type", kind, *connect(emu))
    assert code == 0, err
    assert_valid_image(out, fmt)
    assert f"wrote {out} ({kind}, 1 attempt" in err


def test_merge_failure_exits_1_with_the_reason(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An API refusal (no face) is exit 1 with the API's reason, not a traceback."""
    [(_, image)] = write_inputs(tmp_path, 1)
    faceless = tmp_path / "flat.png"
    faceless.write_bytes(flat_image())
    code, _, err = run_cli(capsys, "merge", faceless, image, "-o", tmp_path / "o.png", *connect(emu))
    assert code == 1
    assert "IMAGE_NO_FACE_DETECTED" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        pytest.param(["merge", "{tmp}/nope.png", "{tmp}/face000.png", "-o", "{tmp}/o.png"], "nope.png",
                     id="missing-input"),
        pytest.param(["batch", "{tmp}/m.csv", "-o", "{tmp}/out", "--concurrency", "0"], "max_concurrency",
                     id="bad-concurrency"),
        pytest.param(["batch", "{tmp}/bad.csv", "-o", "{tmp}/out"], "lacks column(s) image", id="missing-column"),
        pytest.param(["batch", "{tmp}/none.csv", "-o", "{tmp}/out"], "no such manifest", id="missing-manifest"),
        pytest.param(["batch", "-o", "{tmp}/out"], "give a MANIFEST", id="no-jobs"),
        pytest.param(["batch", "{tmp}/m.csv", "--faces", "{tmp}", "--images", "{tmp}", "-o", "{tmp}/out"],
                     "not both", id="manifest-and-folders"),
        pytest.param(["batch", "--faces", "{tmp}/nope", "--images", "{tmp}", "-o", "{tmp}/out"], "not a folder",
                     id="missing-folder"),
        pytest.param(["batch", "{tmp}/m.csv", "-o", "{tmp}/out", "--ledger", "{tmp}/face000.png/ledger.jsonl"],
                     "ledger", id="ledger-unwritable"),
    ],
)
def test_usage_and_input_errors_exit_2_without_a_traceback(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    """Bad arguments or inputs: exit 2, one clear line, no traceback."""
    write_inputs(tmp_path, 1)
    write_csv(tmp_path / "m.csv", ("face_image", "image"), [("face000.png", "photo000.png")])
    write_csv(tmp_path / "bad.csv", ("face_image", "picture"), [("face000.png", "photo000.png")])
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_cli(capsys, *args, *connect(emu))
    assert code == 2, err
    assert "error:" in err and says in err
    assert "Traceback" not in err


def test_key_and_url_come_from_the_environment(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOVITA_API_KEY and NOVITA_BASE_URL stand in for --api-key and --base-url; no key at all is exit 2."""
    [(face, image)] = write_inputs(tmp_path, 1)
    monkeypatch.setenv("NOVITA_BASE_URL", emu.url)
    code, _, err = run_cli(capsys, "merge", face, image, "-o", tmp_path / "a.png")
    assert code == 2 and "NOVITA_API_KEY" in err
    monkeypatch.setenv("NOVITA_API_KEY", emu.api_key)
    code, _, err = run_cli(capsys, "merge", face, image, "-o", tmp_path / "a.png")
    assert code == 0, err


# -- batch ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "ext", "fmt"), [pytest.param("png", ".png", "PNG", id="png"),
                                                  pytest.param("jpeg", ".jpg", "JPEG", id="jpeg")])
def test_batch_from_a_csv_manifest(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, ext: str, fmt: str
) -> None:
    """`batch MANIFEST -o OUT --type T`: every job written as T, a ledger, a summary, exit 0."""
    manifest = csv_manifest(tmp_path / "data", 6)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "batch", manifest, "-o", out, "--type", kind, "--no-progress", *connect(emu))
    assert code == 0, err
    assert summary_counts(err) == (6, 0, 0)
    outputs = results_in(out)
    assert len(outputs) == 6 and {p.suffix for p in outputs} == {ext}
    for path in outputs:
        assert_valid_image(path, fmt)
    assert len(ledger_lines(out / "ledger.jsonl")) == 6
    assert f"ledger: {out / 'ledger.jsonl'}" in err


def test_file_io_option(emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--file-io threads` runs the batch the same way; an unknown mode exits 2 naming the choices."""
    manifest = csv_manifest(tmp_path / "data", 4)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "batch", manifest, "-o", out, "--file-io", "threads", "--no-progress",
                           *connect(emu))
    assert code == 0, err
    # The choice reaches the client (a run in threads looks the same from outside).
    args = build_parser().parse_args(["batch", str(manifest), "-o", str(out), "--file-io", "threads",
                                      *map(str, connect(emu))])
    assert _client_from_args(args)._files.mode == "threads"
    assert summary_counts(err) == (4, 0, 0) and len(results_in(out)) == 4
    with pytest.raises(SystemExit) as exited:
        main(["batch", str(manifest), "-o", str(out), "--file-io", "fast", *connect(emu)])
    assert exited.value.code == 2
    assert "argument --file-io: invalid choice: 'fast' (choose from" in capsys.readouterr().err


def test_batch_from_jsonl_with_its_own_outputs_and_ledger(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A JSONL manifest with output and id keys, and --ledger elsewhere."""
    write_inputs(tmp_path / "data" / "in", 3)
    manifest = tmp_path / "data" / "jobs.jsonl"
    manifest.write_text("".join(
        json.dumps({"face_image": f"in/face{i:03d}.png", "image": f"in/photo{i:03d}.png",
                    "output": f"sub/r{i}.webp", "id": f"r{i}", "response_image_type": "webp"}) + "\n"
        for i in range(3)))
    out, ledger = tmp_path / "out", tmp_path / "logs" / "run.jsonl"
    code, _, err = run_cli(capsys, "batch", manifest, "-o", out, "--ledger", ledger, "--no-progress", *connect(emu))
    assert code == 0, err
    for index in range(3):
        assert_valid_image(out / "sub" / f"r{index}.webp", "WEBP")
    assert sorted(line["id"] for line in ledger_lines(ledger)) == ["r0", "r1", "r2"]


def test_bad_rows_exit_1_naming_their_rows(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows with a missing value or file fail with their row number; the others are done; exit 1."""
    write_inputs(tmp_path / "in", 3)
    manifest = write_csv(tmp_path / "m.csv", ("face_image", "image"), [
        ("in/face000.png", "in/photo000.png"),
        ("", "in/photo001.png"),
        ("in/face002.png", "in/gone.png"),
        ("in/face002.png", "in/photo002.png"),
    ])
    code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--no-progress", *connect(emu))
    assert code == 1
    assert summary_counts(err) == (2, 2, 0)
    assert "row 3: face_image is empty" in err and "row 4: image file 'in/gone.png' not found" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("pair", "names"), [
    pytest.param("zip", ["face000__photo000", "face001__photo001"], id="zip"),
    pytest.param("product", ["face000__photo000", "face000__photo001", "face001__photo000", "face001__photo001"],
                 id="product"),
])
def test_batch_from_two_folders(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], pair: str, names: list[str]
) -> None:
    """`--faces DIR --images DIR --pair P` writes {face}__{image}.{ext} for each pair."""
    pairs = write_inputs(tmp_path / "in", 2)
    for folder in ("faces", "images"):
        (tmp_path / folder).mkdir()
    for face, image in pairs:
        shutil.copy(face, tmp_path / "faces" / face.name)
        shutil.copy(image, tmp_path / "images" / image.name)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "batch", "--faces", tmp_path / "faces", "--images", tmp_path / "images",
                           "--pair", pair, "-o", out, "--type", "webp", "--no-progress", *connect(emu))
    assert code == 0, err
    assert [p.name for p in results_in(out)] == [f"{n}.webp" for n in names]


def test_rerun_resumes(emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Running the same command again sends nothing and reports every job skipped (resumed)."""
    manifest = csv_manifest(tmp_path / "data", 4)
    argv = ["batch", manifest, "-o", tmp_path / "out", "--no-progress", *connect(emu)]
    assert run_cli(capsys, *argv)[0] == 0
    sent = emu.stats.requests
    code, _, err = run_cli(capsys, *argv)
    assert code == 0
    assert summary_counts(err) == (0, 0, 4)
    assert emu.stats.requests == sent


def test_fatal_error_exits_1_and_says_why(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong key stops the batch early: exit 1, the rest not attempted, the reason in the summary."""
    manifest = csv_manifest(tmp_path / "data", 12)
    code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--no-progress", "--concurrency", "2",
                           "--base-url", emu.url, "--api-key", "sk_not_this_one")
    assert code == 1
    assert "stopped early: AuthenticationError" in err
    # Both slots may send before the first 403 comes back, or the second may be stopped at the gate.
    sent = emu.stats.requests
    assert sent in (1, 2)
    assert f"not attempted {12 - sent}" in err


def test_ordered_reports_failures_in_manifest_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--ordered: with random server latency, failure lines still come in row order."""
    write_inputs(tmp_path / "in", 1)
    (tmp_path / "in" / "flat.png").write_bytes(flat_image())
    rows = [("in/flat.png" if i % 3 == 0 else "in/face000.png", "in/photo000.png", f"r{i:02d}.png", f"r{i:02d}")
            for i in range(24)]
    manifest = write_csv(tmp_path / "m.csv", ("face_image", "image", "output", "id"), rows)
    config = EmulatorConfig(engine="composite", latency=0.01, jitter=0.08, faults=Faults(seed=3))
    with ThreadedEmulator(config) as server:
        code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--ordered", "--no-progress",
                               "--concurrency", "8", *connect(server))
    assert code == 1
    failed = re.findall(r"^failed (r\d+):", err, re.MULTILINE)
    assert failed == [f"r{i:02d}" for i in range(0, 24, 3)]


@pytest.mark.parametrize(("flag", "bar"), [pytest.param([], True, id="default"),
                                           pytest.param(["--no-progress"], False, id="no-progress")])
def test_progress_bar_on_a_terminal_unless_no_progress(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    flag: list[str], bar: bool,
) -> None:
    """On a terminal a bar is drawn (done, failed, retries, rate); --no-progress turns it off."""
    manifest = csv_manifest(tmp_path / "data", 3)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", *flag, *connect(emu))
    assert code == 0
    # The manifest is counted up front, so the bar has a total (3/3) and an ETA.
    assert ("3/3" in err and "job/s" in err and "failed=0" in err and "retries=0" in err) is bar
    assert summary_counts(err) == (3, 0, 0)


# -- help -------------------------------------------------------------------------------


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_option_has_help_text() -> None:
    """Every option and argument of every command explains itself in --help."""
    parser = build_parser()
    commands = subparsers(parser)
    assert {"merge", "batch", "serve", "demo"} <= set(commands)
    for name, sub in [("novita-async", parser), *commands.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"
        assert sub.format_help()


@pytest.mark.parametrize("command", ["merge", "batch", "serve", "demo"])
def test_help_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`COMMAND --help` prints usage and exits 0."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: novita-async " + command in capsys.readouterr().out

