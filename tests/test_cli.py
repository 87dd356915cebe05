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
from .conftest import flat_image, make_image

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


def test_a_failed_merge_leaves_no_folder_it_made(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A merge the API refuses (exit 1) takes away the folders it made for -o; a successful one keeps them."""
    [(face, image)] = write_inputs(tmp_path / "in", 1)
    faceless = tmp_path / "flat.png"
    faceless.write_bytes(flat_image())
    code, _, err = run_cli(capsys, "merge", faceless, image, "-o", tmp_path / "out" / "sub" / "o.png", *connect(emu))
    assert code == 1, err
    assert emu.stats.requests == 1  # the folders were made: the request was sent
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "merge", face, image, "-o", tmp_path / "out" / "sub" / "o.png", *connect(emu))
    assert code == 0, err
    assert_valid_image(tmp_path / "out" / "sub" / "o.png")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        pytest.param(["merge", "{tmp}/nope.png", "{tmp}/face000.png", "-o", "{tmp}/o.png"], "nope.png",
                     id="missing-input"),
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


def parse_error(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    """main(argv) refused by the argument parser: exit 2; returns stderr."""
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in argv])
    assert exited.value.code == 2
    return capsys.readouterr().err


#: Python names that must not reach a command-line user in place of the flags.
PYTHON_NAMES = ("max_concurrency", "requests_per_minute", "Timeout.", "RetryPolicy.", "api_key=", "auto_resize")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        pytest.param(["batch", "{m}", "--concurrency", "0"], "--concurrency: '0': must be at least 1",
                     id="concurrency-0"),
        pytest.param(["merge", "{face}", "{photo}", "--concurrency", "-2"], "--concurrency: '-2': must be at least 1",
                     id="merge-concurrency"),
        pytest.param(["batch", "{m}", "--rpm", "0"], "--rpm: '0': must be above 0", id="rpm-0"),
        pytest.param(["batch", "{m}", "--rpm", "nan"], "--rpm: 'nan': must be a finite number", id="rpm-nan"),
        pytest.param(["batch", "{m}", "--timeout", "0"], "--timeout: '0': must be above 0", id="timeout-0"),
        pytest.param(["batch", "{m}", "--timeout", "inf"], "--timeout: 'inf': must be a finite number",
                     id="timeout-inf"),
        pytest.param(["batch", "{m}", "--max-attempts", "0"], "--max-attempts: '0': must be at least 1",
                     id="max-attempts-0"),
        pytest.param(["batch", "{m}", "--max-attempts", "2.5"], "--max-attempts: '2.5' is not a whole number",
                     id="max-attempts-fraction"),
        pytest.param(["batch", "{m}", "--grace", "-1"], "--grace: '-1': must be at least 0", id="grace-negative"),
        pytest.param(["batch", "{m}", "--shard", "0/2", "--rpm", "60", "--rpm-per-worker", "0"],
                     "--rpm-per-worker: '0': must be above 0", id="rpm-per-worker-0"),
        pytest.param(["batch", "{m}", "--shard", "-1/3"], "--shard: shard index must be in 0..2 for 3 shards, got -1",
                     id="shard-negative"),
    ],
)
def test_numeric_flags_are_refused_naming_the_flag(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    """0, negatives, inf or nan where meaningless: exit 2 naming the flag (not a Python name); nothing sent."""
    [(face, photo)] = write_inputs(tmp_path, 1)
    manifest = write_csv(tmp_path / "m.csv", ("face_image", "image"), [(face.name, photo.name)])
    args = [a.format(m=manifest, face=face, photo=photo) for a in argv]
    err = parse_error(capsys, *args, "-o", tmp_path / "out", *connect(emu))
    assert f"error: argument {says}\n" in err, err
    assert not [name for name in PYTHON_NAMES if name in err], err
    assert "pacing at" not in err and "Traceback" not in err
    assert emu.stats.requests == 0 and not (tmp_path / "out").exists()


def test_shard_pacing_is_said_only_once_the_settings_are_good(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard's "pacing at R/min" line comes after the settings are checked, not before their error."""
    manifest = csv_manifest(tmp_path / "data", 2)
    code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--shard", "0/2", "--rpm", "60")
    assert code == 2 and err.startswith("novita-async: error: no API key"), err
    assert "pacing at" not in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        pytest.param(["--jobs", "0"], "--jobs", id="jobs-0"),
        pytest.param(["--jobs", "-3"], "--jobs", id="jobs-negative"),
        pytest.param(["--concurrency", "0"], "--concurrency", id="concurrency-0"),
        pytest.param(["--latency", "-1"], "--latency", id="latency-negative"),
    ],
)
def test_demo_refuses_bad_numbers_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    """`demo --jobs 0` and friends: exit 2 naming the flag, before any input is made."""
    err = parse_error(capsys, "demo", *argv, "--no-progress", "-o", tmp_path / "demo")
    assert f"argument {flag}: " in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(("where", "says"), [
    pytest.param("m1.png", "output folder {tmp}/m1.png is a file: give a folder (it is created if missing)",
                 id="a-file"),
    pytest.param("m1.png/demo", "output folder {tmp}/m1.png/demo cannot be made: {tmp}/m1.png is a file, not a folder",
                 id="under-a-file"),
])
def test_demo_output_in_place_of_a_file_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, says: str
) -> None:
    """`demo -o FILE`: one line saying the folder is a file, exit 2, no traceback."""
    (tmp_path / "m1.png").write_bytes(b"not a folder")
    code, _, err = run_cli(capsys, "demo", "--jobs", "1", "--no-progress", "-o", tmp_path / where)
    assert code == 2, err
    assert err == f"novita-async: error: {says.format(tmp=tmp_path)}\n"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_demo_that_cannot_write_its_inputs_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`demo -o` where no folder can be made (not even by root): one line, exit 2, no traceback."""
    code, _, err = run_cli(capsys, "demo", "--jobs", "1", "--no-progress", "-o", "/proc/self/novita-demo")
    assert code == 2, err
    assert err.endswith("novita-async: error: cannot write the demo's inputs in /proc/self/novita-demo: "
                        "No such file or directory\n"), err


@pytest.mark.parametrize(("argv", "says"), [
    pytest.param(["-o", "{tmp}/m1.png"],
                 "output folder {tmp}/m1.png is a file: give a folder (it is created if missing)", id="output-a-file"),
    pytest.param(["-o", "{tmp}/m1.png/out"],
                 "output folder {tmp}/m1.png/out cannot be made: {tmp}/m1.png is a file, not a folder",
                 id="output-under-a-file"),
    pytest.param(["-o", "{tmp}/out", "--ledger", "{tmp}/emptydir"],
                 "ledger {tmp}/emptydir is a folder: give a file path such as {tmp}/emptydir/ledger.jsonl",
                 id="ledger-a-folder"),
    pytest.param(["-o", "{tmp}/out", "--ledger", "{tmp}/m1.png/l.jsonl"],
                 "ledger {tmp}/m1.png/l.jsonl cannot be made: {tmp}/m1.png is a file, not a folder",
                 id="ledger-under-a-file"),
    pytest.param(["-o", "{tmp}/{long}"], "output folder {tmp}/{long} cannot be used: File name too long",
                 id="output-name-too-long"),
    pytest.param(["-o", "{tmp}/out", "--ledger", "{tmp}/{long}"],
                 "ledger {tmp}/{long} cannot be used: File name too long", id="ledger-name-too-long"),
])
def test_batch_output_and_ledger_are_checked_before_the_run(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    """A file where the output folder goes, or a folder where the ledger goes: exit 2 before any job, no summary."""
    manifest = csv_manifest(tmp_path / "data", 2)
    (tmp_path / "m1.png").write_bytes(b"not a folder")
    (tmp_path / "emptydir").mkdir()
    long_name = "x" * 300  # over any file system's limit on a name
    args = [a.format(tmp=tmp_path, long=long_name) for a in argv]
    code, _, err = run_cli(capsys, "batch", manifest, *args, "--no-progress", *connect(emu))
    assert code == 2, err
    assert err == f"novita-async: error: {says.format(tmp=tmp_path, long=long_name)}\n"
    assert emu.stats.requests == 0
    assert not (tmp_path / "out").exists() and list((tmp_path / "emptydir").iterdir()) == []


def test_batch_refuses_the_manifest_as_its_ledger(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--ledger` naming the manifest: exit 2 before any job; the manifest is not written to."""
    manifest = csv_manifest(tmp_path / "data", 2)
    before = manifest.read_bytes()
    code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--ledger", manifest,
                           "--no-progress", *connect(emu))
    assert code == 2, err
    assert err == (f"novita-async: error: the ledger {manifest} is the manifest: give --ledger another "
                   "file (or leave it out: the ledger is then ledger.jsonl in the output folder)\n")
    assert manifest.read_bytes() == before and emu.stats.requests == 0


def test_batch_refuses_a_ledger_that_is_another_file(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--ledger` naming a file that is not a ledger (another CSV): exit 2, the file unchanged."""
    manifest = csv_manifest(tmp_path / "data", 2)
    other = shutil.copy(manifest, tmp_path / "other.csv")
    code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--ledger", other,
                           "--no-progress", *connect(emu))
    assert code == 2, err
    assert err.startswith(f"novita-async: error: {other} is not a ledger: its first line is text")
    assert Path(other).read_bytes() == manifest.read_bytes() and emu.stats.requests == 0


def test_batch_refuses_a_ledger_given_as_the_manifest(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Re-running "the ledger" as the manifest: exit 2 at once, the ledger unchanged (it used
    to read its own new records back as bad rows, without end)."""
    manifest = csv_manifest(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert run_cli(capsys, "batch", manifest, "-o", out, "--no-progress", *connect(emu))[0] == 0
    ledger = out / "ledger.jsonl"
    before = ledger.read_bytes()
    code, _, err = run_cli(capsys, "batch", ledger, "-o", out, "--no-progress", *connect(emu))
    assert code == 2, err
    assert "this is a ledger (its lines have 'id' and 'status'), not a manifest" in err
    assert ledger.read_bytes() == before and emu.stats.requests == 2


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_batch_names_an_output_folder_the_system_will_not_make(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output folder that cannot be made (under /proc): exit 2 naming it and the fix, no
    summary of a run that did not start."""
    manifest = csv_manifest(tmp_path / "data", 2)
    code, _, err = run_cli(capsys, "batch", manifest, "-o", "/proc/self/novita-out", "--no-progress",
                           *connect(emu))
    assert code == 2, err
    assert err == ("novita-async: error: output folder /proc/self/novita-out cannot be made: No such file "
                   "or directory; give a folder you can write to\n")
    assert emu.stats.requests == 0


def test_batch_stops_at_an_unclosed_quote_and_resumes_once_it_is_closed(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows before an unclosed quote run; the command then exits 2 naming the row (the rows
    after it are not passed over in silence); fixed, a re-run sends only the rest."""
    pairs = write_inputs(tmp_path / "in", 4)
    lines = [f"{f.name},{t.name}" for f, t in pairs]
    lines[2] = '"' + lines[2]
    manifest = tmp_path / "in" / "m.csv"
    manifest.write_text("face_image,image\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "batch", manifest, "-o", out, "--no-progress", "--ordered", *connect(emu))
    assert code == 2, err
    assert f"novita-async: error: {manifest} row 4: a quoted value runs over a line break" in err
    assert summary_counts(err) == (2, 0, 0) and emu.stats.requests == 2
    manifest.write_text("face_image,image\n" + "\n".join(f"{f.name},{t.name}" for f, t in pairs) + "\n")
    code, _, err = run_cli(capsys, "batch", manifest, "-o", out, "--no-progress", *connect(emu))
    assert code == 0, err
    assert summary_counts(err) == (2, 0, 2) and emu.stats.requests == 4


def test_batch_refuses_a_base_url_with_credentials_before_any_job(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batch` shares merge's check of the flags: user:password@ in the base URL is exit 2, nothing
    sent (each job used to fail alone with the same error, exit 1)."""
    manifest = csv_manifest(tmp_path / "data", 3)
    url = emu.url.replace("http://", "http://user:s3cret@")
    code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--no-progress",
                           "--base-url", url, "--api-key", emu.api_key)
    assert code == 2, err
    assert err.startswith("novita-async: error: --base-url holds a user name") and "s3cret" not in err
    assert emu.stats.requests == 0


def test_merge_into_an_existing_folder_is_exit_2(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`merge FACE IMAGE -o EXISTING_DIR` is an input error (exit 2), found before anything is sent."""
    [(face, photo)] = write_inputs(tmp_path, 1)
    (tmp_path / "results").mkdir()
    code, _, err = run_cli(capsys, "merge", face, photo, "-o", tmp_path / "results", *connect(emu))
    assert code == 2, err
    assert "is an existing folder" in err and "Traceback" not in err
    assert emu.stats.requests == 0


@pytest.mark.parametrize(("name", "fmt"), [pytest.param("m.jpg", "JPEG", id="jpg"),
                                           pytest.param("m.JPEG", "JPEG", id="jpeg-upper"),
                                           pytest.param("m.webp", "WEBP", id="webp"),
                                           pytest.param("m.out", "PNG", id="unknown-is-png")])
def test_merge_takes_the_type_from_the_output_extension(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, fmt: str
) -> None:
    """Without --type, the result's format follows -o's extension (else png): no JPEG named .png."""
    [(face, photo)] = write_inputs(tmp_path, 1)
    code, _, err = run_cli(capsys, "merge", face, photo, "-o", tmp_path / name, *connect(emu))
    assert code == 0, err
    assert_valid_image(tmp_path / name, fmt)


def test_merge_type_that_contradicts_the_extension_is_exit_2(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o x.jpg --type png` would write a PNG named .jpg: refused before anything is sent."""
    [(face, photo)] = write_inputs(tmp_path, 1)
    code, _, err = run_cli(capsys, "merge", face, photo, "-o", tmp_path / "x.jpg", "--type", "png", *connect(emu))
    assert code == 2
    assert f"-o {tmp_path / 'x.jpg'} names a jpeg file but --type is png" in err
    assert emu.stats.requests == 0 and not (tmp_path / "x.jpg").exists()


def test_pair_with_a_manifest_is_exit_2(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--pair only pairs folders; given with a manifest it would be silently ignored, so it is refused."""
    manifest = csv_manifest(tmp_path, 1)
    code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--pair", "product",
                           "--no-progress", *connect(emu))
    assert code == 2
    assert "--pair pairs the files of --faces and --images" in err
    assert emu.stats.requests == 0


def test_image_hints_name_the_auto_resize_flag(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An over-size input's fix says `--auto-resize`, in merge's error and in batch's failure line."""
    [(_, photo)] = write_inputs(tmp_path, 1)
    wide = tmp_path / "wide.png"
    wide.write_bytes(make_image(size=(2100, 40)))
    code, _, err = run_cli(capsys, "merge", wide, photo, "-o", tmp_path / "o.png", *connect(emu))
    assert code == 2, err
    assert "pass --auto-resize" in err and "auto_resize" not in err
    manifest = write_csv(tmp_path / "m.csv", ("face_image", "image"), [("wide.png", photo.name)])
    code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--no-progress", *connect(emu))
    assert code == 1, err
    assert "pass --auto-resize" in err and "auto_resize" not in err
    assert emu.stats.requests == 0


def test_key_and_url_come_from_the_environment(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOVITA_API_KEY and NOVITA_BASE_URL stand in for --api-key and --base-url; no key at all is exit 2."""
    [(face, image)] = write_inputs(tmp_path, 1)
    monkeypatch.setenv("NOVITA_BASE_URL", emu.url)
    code, _, err = run_cli(capsys, "merge", face, image, "-o", tmp_path / "a.png")
    assert code == 2 and "NOVITA_API_KEY" in err
    assert "pass --api-key KEY" in err and "api_key=" not in err  # the flag, not the Python parameter
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


def two_folders(root: Path, count: int) -> tuple[Path, Path]:
    """``count`` input pairs as ``root/faces/faceNNN.png`` and ``root/images/photoNNN.png``."""
    faces, images = root / "faces", root / "images"
    faces.mkdir()
    images.mkdir()
    for face, image in write_inputs(root / "in", count):
        shutil.copy(face, faces / face.name)
        shutil.copy(image, images / image.name)
    return faces, images


@pytest.mark.parametrize(("pair", "names"), [
    pytest.param("zip", ["face000__photo000", "face001__photo001"], id="zip"),
    pytest.param("product", ["face000__photo000", "face000__photo001", "face001__photo000", "face001__photo001"],
                 id="product"),
])
def test_batch_from_two_folders(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], pair: str, names: list[str]
) -> None:
    """`--faces DIR --images DIR --pair P` writes {face}__{image}.{ext} for each pair."""
    two_folders(tmp_path, 2)
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
    assert ("to go on: check the API key (--api-key, or $NOVITA_API_KEY), then run the same command "
            "again (jobs done are skipped)\n") in err
    # Both slots may send before the first 403 comes back, or the second may be stopped at the gate.
    sent = emu.stats.requests
    assert sent in (1, 2)
    assert f"not attempted {12 - sent}" in err


@pytest.mark.parametrize(("config", "argv", "says"), [
    pytest.param({"balance": 2}, [], "top up the account's balance, then run the same command again",
                 id="balance"),
    pytest.param({}, ["--base-url", "{url}/v3"], "check the base URL (--base-url, or $NOVITA_BASE_URL): the "
                 "server's address without /v3/merge-face; then run", id="wrong-url"),
])
def test_a_batch_stopped_early_says_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, int], argv: list[str], says: str
) -> None:
    """An empty balance or a wrong base URL: after the summary, the fix and that a re-run resumes."""
    manifest = csv_manifest(tmp_path / "data", 6)
    with ThreadedEmulator(EmulatorConfig(engine="composite", **config)) as server:  # type: ignore[arg-type]
        code, _, err = run_cli(capsys, "batch", manifest, "-o", tmp_path / "out", "--no-progress",
                               "--concurrency", "1", *connect(server), *[a.format(url=server.url) for a in argv])
    assert code == 1, err
    assert f"to go on: {says}" in err


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


def test_progress_bar_of_a_run_over_folders_has_a_total(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`batch --faces --images --pair product` draws a bar with its total (2 x 2 = 4 jobs)."""
    two_folders(tmp_path, 2)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    code, _, err = run_cli(capsys, "batch", "--faces", tmp_path / "faces", "--images", tmp_path / "images",
                           "--pair", "product", "-o", tmp_path / "out", *connect(emu))
    assert code == 0
    assert "4/4" in err and summary_counts(err) == (4, 0, 0)


# -- serve and status -------------------------------------------------------------------


def test_serve_on_a_busy_port_says_so(emu: ThreadedEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --port P` with P taken: one line naming the port and the way out, exit 2."""
    port = emu.url.rsplit(":", 1)[1]
    code, out, err = run_cli(capsys, "serve", "--port", port, "--engine", "composite")
    assert code == 2 and out == ""
    assert err == (f"novita-async serve: error: port {port} is in use on 127.0.0.1: "
                   "pick another with --port, or --port 0 for a free one\n")


def test_serve_on_an_address_not_of_this_machine_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --host ADDRESS` not of this machine (TEST-NET-1, never local): one line, exit 2."""
    code, out, err = run_cli(capsys, "serve", "--host", "192.0.2.1", "--port", "0", "--engine", "composite")
    assert code == 2 and out == ""
    assert "error: --host 192.0.2.1 is not an address of this machine" in err and "Traceback" not in err


def test_serve_names_an_address_not_of_this_machine_whatever_python_says() -> None:
    """Python 3.13's asyncio reports a host it could not bind with an OSError without errno
    ("could not bind on any address"); the line still names the problem and the fix."""
    from novita_async.emulator._cli import _bind_problem

    errno_less = OSError("could not bind on any address out of [('192.0.2.1', 0)]")
    assert _bind_problem(errno_less, "192.0.2.1", 0) == (
        "--host 192.0.2.1 is not an address of this machine: give one of its own, such as 127.0.0.1")
    assert _bind_problem(OSError("something else"), "192.0.2.1", 0) == (
        "cannot listen on 192.0.2.1 port 0: something else")


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range(capsys: pytest.CaptureFixture[str], port: str) -> None:
    """`serve --port 99999`: the parser refuses it naming --port, exit 2."""
    assert "argument --port: " in parse_error(capsys, "serve", "--port", port)


def folder_batch_done(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], count: int
) -> tuple[list[object], Path]:
    """A finished `batch --faces --images` of ``count`` pairs: its folder options and output folder."""
    two_folders(tmp_path, count)
    folders: list[object] = ["--faces", tmp_path / "faces", "--images", tmp_path / "images"]
    out_dir = tmp_path / "out"
    assert run_cli(capsys, "batch", *folders, "-o", out_dir, "--no-progress", *connect(emu))[0] == 0
    return folders, out_dir


def test_status_of_a_run_over_folders_says_folders(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --faces --images` counts the jobs left from the folders, and says so (not "manifest")."""
    folders, out_dir = folder_batch_done(emu, tmp_path, capsys, 2)
    code, out, _ = run_cli(capsys, "status", out_dir, *folders)
    assert code == 0
    assert "folders: 2 jobs; left 0" in out and "manifest" not in out


@pytest.mark.parametrize("where", ["missing.jsonl", "empty_folder"])
def test_status_of_no_ledger_at_all_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """`status` on a path with no ledger (a typo, a folder no batch wrote to): one line, exit 2,
    not a table of zeros with exit 0."""
    (tmp_path / "empty_folder").mkdir()
    code, out, err = run_cli(capsys, "status", tmp_path / where)
    assert code == 2 and out == ""
    assert f"no ledger found at {tmp_path / where}" in err and "Traceback" not in err


def test_status_of_a_file_that_is_not_a_ledger_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status MANIFEST` (the manifest given in the ledger's place): one line saying so, exit 2,
    not a table of zeros."""
    manifest = csv_manifest(tmp_path / "data", 2)
    code, out, err = run_cli(capsys, "status", manifest)
    assert code == 2 and out == ""
    assert f"{manifest} holds no ledger records" in err


def test_status_counts_a_shard_not_started_among_others(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One ledger missing among several is a shard not started yet: no error."""
    _, out_dir = folder_batch_done(emu, tmp_path, capsys, 1)
    code, out, _ = run_cli(capsys, "status", out_dir / "ledger.jsonl", out_dir / "ledger.shard-1-of-2.jsonl")
    assert code == 0
    assert "(not found)" in out and out.splitlines()[-2].split()[:2] == ["all", "1"]


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


@pytest.mark.parametrize("argv", [
    pytest.param(["-v", "batch", "m.csv", "-o", "out"], id="before-the-command"),
    pytest.param(["batch", "m.csv", "-o", "out", "-v"], id="after-the-command"),
    pytest.param(["status", "out", "-v"], id="status"),
])
def test_verbose_goes_before_or_after_the_command(argv: list[str]) -> None:
    """`-v` is read wherever it is put; without it the level stays 0."""
    assert build_parser().parse_args(argv).verbose == 1
    assert build_parser().parse_args([a for a in argv if a != "-v"]).verbose == 0
