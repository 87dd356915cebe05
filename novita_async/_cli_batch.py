"""Running a batch the command line's way: signals, a line per failure, the summary, the exit code.

``batch`` and ``demo`` share it, with the checks of the output folder and
the ledger they make before anything runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from novita_async._cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, say, signal_exit
from novita_async._config import MERGE_FACE_PATH
from novita_async._errors import (
    AuthenticationError,
    ConfigurationError,
    InsufficientBalanceError,
    NotFoundError,
    OutputError,
    PermissionDeniedError,
)
from novita_async._jobs import JobResult, JobStatus, MergeJob
from novita_async._ledger import same_file
from novita_async._manifest import BadRow, ManifestError

if TYPE_CHECKING:
    from novita_async._client import NovitaClient
    from novita_async._summary import BatchSummary

__all__ = ["check_ledger", "check_output_folder", "estimate_rows", "make_folders", "run_batch_command"]


def _report(result: JobResult) -> None:
    if result.status == JobStatus.FAILED:
        say(f"failed {result.job.id}: {result.error_reason}: {result.error}")


async def run_batch_command(
    client: NovitaClient,
    jobs: Iterable[MergeJob | BadRow],
    *,
    output_dir: Path,
    ledger: Path,
    response_image_type: str = "png",
    ordered: bool = False,
    progress: bool | None = None,
    grace: float = 60.0,
    total: int | None = None,
    resend_no_face: bool = False,
) -> tuple[int, BatchSummary]:
    """Run a batch as the CLI does: signals, per-failure lines, summary. Returns (exit code, summary).

    Raises:
        UsageError: The ledger is in use by another run (nothing was sent).
    """
    run = client.batch(jobs, output_dir=output_dir, ledger=ledger, ordered=ordered,
                       progress=progress, response_image_type=response_image_type, total=total,
                       resend_no_face=resend_no_face)
    loop = asyncio.get_running_loop()
    scope = anyio.CancelScope()
    interrupts = 0
    first_signal = signal.SIGINT
    timers: list[asyncio.TimerHandle] = []
    failure: str | None = None

    def on_signal(signum: signal.Signals) -> None:
        nonlocal interrupts, first_signal
        interrupts += 1
        if interrupts == 1:
            first_signal = signum  # the exit code says which signal stopped the run
            run.stop()
            again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGTERM again"
            say(f"interrupted: finishing jobs in flight (up to {grace:g} s); {again} to stop now")
            timers.append(loop.call_later(grace, scope.cancel))
        else:
            scope.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
    try:
        with scope:
            async for result in run:
                _report(result)
    except ConfigurationError as exc:
        # The ledger in use, or not a ledger: refused before the first job, so
        # no summary of a run that did not start.
        raise UsageError(str(exc)) from None
    except (ManifestError, OSError) as exc:
        # The job stream or the ledger failed part-way; jobs in flight finished.
        failure = str(exc)
    finally:
        for timer in timers:
            timer.cancel()
        await run.aclose()
        for signum in installed:
            loop.remove_signal_handler(signum)
    summary = run.summary
    if scope.cancelled_caught or interrupts:
        summary.interrupted = True
    if failure is None or summary.total:  # no summary of a run that did not start
        say(summary.line())
        say(f"results: {output_dir}  ledger: {ledger}")
    hint = _after_a_stop(run.stop_error)
    if hint is not None:
        say(f"to go on: {hint}")
    if failure is not None:
        say(f"novita-async: error: {failure}")
        return EXIT_USAGE, summary
    if summary.interrupted:
        return signal_exit(first_signal), summary
    return (EXIT_FAILED if summary.failed_total or summary.not_attempted else EXIT_OK), summary


def _after_a_stop(error: BaseException | None) -> str | None:
    """What to do after the batch stopped early on ``error``: the fix, then the same command."""
    again = "then run the same command again (jobs done are skipped)"
    if isinstance(error, InsufficientBalanceError):
        return f"top up the account's balance, {again}"
    if isinstance(error, AuthenticationError):
        return f"check the API key (--api-key, or $NOVITA_API_KEY), {again}"
    if isinstance(error, PermissionDeniedError):
        return f"check that the key's account may use Merge Face (its plan and billing), {again}"
    if isinstance(error, NotFoundError):
        return (f"check the base URL (--base-url, or $NOVITA_BASE_URL): the server's address without "
                f"{MERGE_FACE_PATH}; {again}")
    if isinstance(error, OutputError):
        return f"free space on the results' disk (or give -o a writable folder), {again}"
    return None


def check_output_folder(folder: Path) -> None:
    """Raise :class:`UsageError` unless ``folder`` is a folder or can be made one."""
    try:
        blocker = _file_in_the_way(folder)
    except OSError as exc:  # a name too long, no permission to look
        raise UsageError(f"output folder {folder} cannot be used: {exc.strerror or exc}") from None
    if blocker == folder:
        raise UsageError(f"output folder {folder} is a file: give a folder (it is created if missing)")
    if blocker is not None:
        raise UsageError(f"output folder {folder} cannot be made: {blocker} is a file, not a folder")


def check_ledger(ledger: Path, *, manifest: Path | None = None) -> None:
    """Raise :class:`UsageError` unless ``ledger`` is a file or can be made one.

    ``manifest``, when given, must be another file: a run appending to the
    file it reads its jobs from would read its own records back as jobs.
    """
    try:
        is_folder = ledger.is_dir()
        blocker = _file_in_the_way(ledger.parent)
    except OSError as exc:
        raise UsageError(f"ledger {ledger} cannot be used: {exc.strerror or exc}") from None
    if is_folder:
        raise UsageError(f"ledger {ledger} is a folder: give a file path such as {ledger / 'ledger.jsonl'}")
    if blocker is not None:
        raise UsageError(f"ledger {ledger} cannot be made: {blocker} is a file, not a folder")
    if manifest is not None and same_file(manifest, ledger):
        raise UsageError(f"the ledger {ledger} is the manifest: give --ledger another file "
                         "(or leave it out: the ledger is then ledger.jsonl in the output folder)")


def make_folders(output_dir: Path, ledger: Path) -> None:
    """Make the output folder and the ledger's, once both passed their checks, or raise :class:`UsageError`.

    Made before the run, so that a folder the system will not make (under
    ``/proc``, on a read-only disk) is named with the fix, not reported after
    a run of nothing as a bare error number.
    """
    for folder, what in ((output_dir, "output folder"), (ledger.parent, "the ledger's folder")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{what} {folder} cannot be made: {exc.strerror or exc}; give a folder "
                             "you can write to") from None


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest of ``folder`` and its parents that exists, if it is a file rather than a folder."""
    for path in (folder, *folder.parents):
        try:
            mode = path.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there yet (it is made), or under the file in the way
        return None if stat.S_ISDIR(mode) else path
    return None


#: Manifests up to this size are counted up front for the progress bar's total
#: (a quick read); larger ones show a count and a rate without a total.
_COUNT_LIMIT = 64 * 1024 * 1024


def estimate_rows(manifest: str | None) -> int | None:
    """Rows in a manifest (non-blank lines, less a CSV's header), for the progress bar; None if unknown."""
    if manifest is None:
        return None
    path = Path(manifest)
    try:
        if path.stat().st_size > _COUNT_LIMIT:
            return None
        with path.open("rb") as handle:
            rows = sum(1 for line in handle if line.strip())
    except OSError:
        return None
    is_csv = path.suffix.lower() not in (".jsonl", ".ndjson", ".json")
    return max(0, rows - 1) if is_csv else rows
