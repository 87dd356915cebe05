"""The command line as real processes: serve, Ctrl-C, SIGKILL and resume, the demo, ``python -m``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import novita_async as na
from novita_async.emulator import DEFAULT_API_KEY

from .batch_support import assert_valid_image, csv_manifest, ledger_lines, results_in, temp_files, write_inputs

#: The child processes must not inherit a user's key or endpoint either.
CHILD_ENV = {k: v for k, v in os.environ.items() if not k.startswith("NOVITA_")}


def novita(*args: object) -> list[str]:
    """The argv of ``python -m novita_async ARGS``."""
    return [sys.executable, "-m", "novita_async", *map(str, args)]


@contextmanager
def served(*options: object) -> Iterator[str]:
    """``novita-async serve --port 0 OPTIONS`` as a process; yields the URL it printed first."""
    process = subprocess.Popen(novita("serve", "--port", "0", "--engine", "composite", *options),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if serve hangs
            process.kill()
            process.communicate()
    assert process.returncode == 0


def stats(url: str) -> dict[str, Any]:
    """The emulator's counters, over HTTP."""
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=5) as response:
        data: dict[str, Any] = json.load(response)
    return data


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def line_count(path: Path) -> int:
    """Complete lines in a file (0 when it does not exist yet)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def lines_reach(path: Path, target: int) -> Callable[[], bool]:
    """A condition: ``path`` has at least ``target`` complete lines."""
    return lambda: line_count(path) >= target


def start_batch(manifest: Path, out: Path, url: str, *extra: object) -> subprocess.Popen[str]:
    """``novita-async batch`` as a process."""
    return subprocess.Popen(
        novita("batch", manifest, "-o", out, "--concurrency", 4, "--no-progress", "--base-url", url,
               "--api-key", DEFAULT_API_KEY, *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)


def test_python_dash_m_runs_the_cli() -> None:
    """`python -m novita_async --version` is the novita-async command."""
    done = subprocess.run(novita("--version"), capture_output=True, text=True, timeout=60, env=CHILD_ENV)
    assert done.returncode == 0
    assert done.stdout.strip() == f"novita-async {na.__version__}"


def test_serve_prints_its_url_first_and_answers() -> None:
    """`serve --port 0` prints the URL on the first stdout line, serves the API, and stops on Ctrl-C."""
    with served() as url:
        with urllib.request.urlopen(f"{url}/_emulator/health", timeout=5) as response:
            assert json.load(response) == {"ok": True, "engine": "composite"}
        assert stats(url)["requests"] == 0


def test_serve_on_a_busy_port_is_one_line_and_exit_2() -> None:
    """A second `serve --port P` on a taken port: one line naming P and the fix, exit 2, no traceback."""
    with served() as url:
        port = url.rsplit(":", 1)[1]
        done = subprocess.run(novita("serve", "--port", port, "--engine", "composite"), capture_output=True,
                              text=True, timeout=60, env=CHILD_ENV)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == (f"novita-async serve: error: port {port} is in use on 127.0.0.1: "
                           "pick another with --port, or --port 0 for a free one\n")


@pytest.mark.parametrize(("signum", "code"), [pytest.param(signal.SIGINT, 130, id="ctrl-c"),
                                              pytest.param(signal.SIGTERM, 143, id="sigterm")])
def test_a_signal_finishes_in_flight_jobs_and_exits_128_plus_its_number(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    """SIGINT (Ctrl-C) or SIGTERM (a service manager stopping the worker) mid-batch: no new jobs,
    in-flight ones finish and are recorded, a summary, and the exit code the shell gives a
    process that signal ended (130, 143)."""
    manifest = csv_manifest(tmp_path / "data", 40)
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    with served("--latency", "0.25") as url:
        process = start_batch(manifest, out, url)
        wait_for(lambda: line_count(ledger) >= 4)
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
        seen = stats(url)
    assert process.returncode == code, err
    assert "interrupted: finishing jobs in flight" in err
    assert ("press Ctrl-C again" if signum == signal.SIGINT else "send SIGTERM again") in err
    assert "Traceback" not in err
    lines = ledger_lines(ledger)  # every line is complete JSON
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)) < 40
    assert {line["status"] for line in lines} == {"ok"}
    summary = next(line for line in err.splitlines() if line.startswith("ok "))
    assert summary.startswith(f"ok {len(lines)}, failed 0") and summary.endswith("; interrupted")
    # Everything the server merged was received and recorded: in-flight jobs were finished.
    assert sum(seen["successes"].values()) == seen["requests"] == len(lines)
    outputs = results_in(out)
    assert len(outputs) == len(lines)
    for path in outputs:
        assert_valid_image(path)
    assert temp_files(out) == []


def test_sigterm_during_merge_exits_143_writing_nothing(tmp_path: Path) -> None:
    """SIGTERM while `merge` waits for its answer: one line, exit 143, no result or temporary file."""
    face, image = write_inputs(tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    out.mkdir()
    with served("--latency", "5") as url:
        process = subprocess.Popen(
            novita("merge", face, image, "-o", out / "r.png", "--base-url", url, "--api-key", DEFAULT_API_KEY),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
        wait_for(lambda: stats(url)["in_flight"] == 1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 143, err
    assert err == "terminated: no result written\n"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("signum", "code", "says"),
    [
        pytest.param(signal.SIGTERM, 143, "terminated: no result written\n", id="sigterm"),
        pytest.param(signal.SIGINT, 130, "novita-async: interrupted\n", id="ctrl-c"),
    ],
)
def test_a_signal_during_merge_removes_the_folders_it_made(
    tmp_path: Path, signum: signal.Signals, code: int, says: str
) -> None:
    """Stopped while `merge` waits for its answer, with -o in folders that did not exist: the folders it
    made are gone again; the folder that was there before stays."""
    face, image = write_inputs(tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    out.mkdir()
    with served("--latency", "5") as url:
        process = subprocess.Popen(
            novita("merge", face, image, "-o", out / "new" / "deeper" / "r.png", "--base-url", url,
                   "--api-key", DEFAULT_API_KEY),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
        wait_for(lambda: stats(url)["in_flight"] == 1)
        assert (out / "new" / "deeper").is_dir()  # made before the request was sent
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
    assert process.returncode == code, err
    assert err == says
    assert list(out.iterdir()) == []


#: Runs ``python -m novita_async ARGS`` (as runpy does for -m) with a real SIGINT sent to itself the
#: moment the module named first starts to import: Ctrl-C at a known point of the start-up.
_INTERRUPTED_WHILE_IMPORTING = """
import os, runpy, signal, sys

module, sys.argv = sys.argv[1], ["novita_async", *sys.argv[2:]]

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
runpy.run_module("novita_async", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "module",
    [
        pytest.param("novita_async._cli_batch", id="loading-the-command"),
        pytest.param("novita_async.emulator._cli", id="building-the-parser"),
    ],
)
def test_ctrl_c_while_the_command_loads_is_one_line_and_exit_130(module: str) -> None:
    """Ctrl-C while `python -m novita_async` imports the command's modules or builds its parser: one line,
    exit 130, no traceback."""
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_WHILE_IMPORTING, module, "--version"],
                          capture_output=True, text=True, timeout=60, env=CHILD_ENV)
    assert "Traceback" not in done.stderr
    assert (done.returncode, done.stderr, done.stdout) == (130, "novita-async: interrupted\n", "")


def test_second_ctrl_c_stops_at_once_with_a_consistent_ledger(tmp_path: Path) -> None:
    """A second SIGINT cancels the jobs in flight instead of waiting; the ledger stays whole."""
    manifest = csv_manifest(tmp_path / "data", 12)
    out = tmp_path / "out"
    with served("--latency", "3") as url:
        process = start_batch(manifest, out, url)
        wait_for(lambda: stats(url)["in_flight"] == 4)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        stopping = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
        took = time.monotonic() - stopping
    assert process.returncode == 130, err
    assert took < 2.0, "the second Ctrl-C did not wait for the 3 s merges"
    assert "Traceback" not in err and "; interrupted" in err
    assert ledger_lines(out / "ledger.jsonl") == []
    assert temp_files(out) == [] and results_in(out) == []


def test_sigkill_then_rerun_completes_without_redoing_done_jobs(tmp_path: Path) -> None:
    """Killed mid-batch and re-run: every job done once, except at most those in flight at the kill."""
    concurrency, count = 4, 40
    manifest = csv_manifest(tmp_path / "data", count)
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    with served("--latency", "0.15") as url:
        process = start_batch(manifest, out, url)
        wait_for(lambda: line_count(ledger) >= 8)
        process.kill()
        process.communicate(timeout=30)
        first = len(ledger_lines(ledger))
        assert first < count
        # Whatever the kill interrupted, no final name holds a partial image.
        for path in results_in(out):
            assert_valid_image(path)
        rerun = start_batch(manifest, out, url)
        _, err = rerun.communicate(timeout=60)
        seen = stats(url)
    assert rerun.returncode == 0, err
    assert f"skipped {first} (resumed)" in err
    successes = seen["successes"]
    assert len(successes) == count, "every job was merged"
    redone = [job for job, times in successes.items() if times > 1]
    assert max(successes.values()) <= 2
    assert len(redone) <= concurrency, "only jobs in flight at the kill were sent twice"
    records: dict[str, str] = {}
    for line in ledger_lines(ledger):
        records[line["id"]] = line["status"]
    assert len(records) == count and set(records.values()) == {"ok"}
    outputs = results_in(out)
    assert len(outputs) == count
    for path in outputs:
        assert_valid_image(path)
    assert temp_files(out) == []  # the re-run swept the temporaries the kill orphaned


def test_demo_runs_offline_and_writes_a_contact_sheet(tmp_path: Path) -> None:
    """`demo --jobs 4 --no-progress -o DIR` exits 0 with results, a ledger and contact_sheet.png."""
    folder = tmp_path / "demo"
    done = subprocess.run(novita("demo", "--jobs", 4, "--no-progress", "-o", folder), capture_output=True,
                          text=True, timeout=120, env=CHILD_ENV)
    assert done.returncode == 0, done.stderr
    sheet = folder / "contact_sheet.png"
    assert done.stdout.strip().splitlines()[-1] == str(sheet)
    assert_valid_image(sheet, "PNG")
    assert len(results_in(folder / "results")) == 4
    assert len(ledger_lines(folder / "ledger.jsonl")) == 4
    assert "ok 4, failed 0" in done.stderr


def test_demo_works_without_the_local_extra(tmp_path: Path) -> None:
    """With OpenCV, scikit-image and matplotlib absent, the demo falls back to drawn faces and still works."""
    folder = tmp_path / "demo"
    blocked = "import sys; sys.modules.update(dict.fromkeys(('cv2', 'skimage', 'matplotlib')))"
    code = (f"{blocked}; from novita_async._cli import main; "
            f"sys.exit(main(['demo', '--jobs', '3', '--no-progress', '-o', {str(folder)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=CHILD_ENV)
    assert done.returncode == 0, done.stderr
    assert "drawn faces" in done.stderr and "merge engine: composite" in done.stderr
    assert_valid_image(folder / "contact_sheet.png", "PNG")
    assert len(results_in(folder / "results")) == 3


@pytest.mark.soak
def test_sigkill_soak_many_kills_then_complete(tmp_path: Path) -> None:
    """Killed five times at random points over 300 jobs with faults, then re-run: all done, few redone."""
    concurrency, count = 4, 300
    manifest = csv_manifest(tmp_path / "data", count)
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    with served("--latency", "0.05", "--jitter", "0.05", "--fault", "503=0.05", "--fault", "drop=0.03",
                "--seed", "11") as url:
        for round_number in range(5):
            process = start_batch(manifest, out, url, "--max-attempts", 10)
            wait_for(lines_reach(ledger, line_count(ledger) + 20 + 7 * round_number), timeout=60)
            process.kill()
            process.communicate(timeout=30)
        final = start_batch(manifest, out, url, "--max-attempts", 10)
        _, err = final.communicate(timeout=300)
        seen = stats(url)
    assert final.returncode == 0, err
    successes = seen["successes"]
    assert len(successes) == count
    assert sum(times - 1 for times in successes.values()) <= 5 * concurrency
    assert {line["status"] for line in ledger_lines(ledger)} == {"ok"}
    for path in results_in(out):
        assert_valid_image(path)
