"""The batch ledger: one JSON line per finished job, appended as each ends.

The ledger is what makes a batch resumable: a re-run skips every job whose
last line says ``ok`` and whose output still exists.  The other ledgers
beside it (``ledger*.jsonl`` in its folder: the shards of the same run, or a
run under another ledger name) count too, read only: a job one of them
finished is done, as ``status`` counts it, so finishing a crashed shard's work
from another worker, or changing the number of shards, sends nothing twice.

A job done or found to have no face keeps its input files' sizes and
modification times on its line (``inputs``).  A re-run sends a done job again
when either input now has another size (new data at the same path: the old
result is not its result), and does not send a "no face" job whose files have
not changed at all (it would get the same answer).  Sizes only for done jobs:
copying a dataset or checking it out anew resets every modification time, and
sending every job again after a copy would cost far more than it saves.

One run at a time writes a ledger: opening it takes an exclusive advisory lock
(``flock``) on it, held until :meth:`Ledger.close`, so a second run on the same
file stops with :class:`LedgerInUseError` before it sends anything.  Readers
(``status``, a shard reading its siblings) take no lock.  Where ``fcntl`` does
not exist (Windows) there is no lock, and two runs on one ledger are not
stopped; on a network file system the lock is only as good as its locking.

Each line is written with one ``write`` on an append-mode file and flushed at
once, so a crash can lose at most the line being written (a torn last line is
ignored on load).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from novita_async._errors import ConfigurationError, LedgerInUseError, OutputError
from novita_async._jobs import JobResult, JobStatus, MergeJob

if sys.platform != "win32":
    import fcntl

__all__ = [
    "LEDGER_GLOB",
    "Ledger",
    "input_fingerprint",
    "is_ledger_record",
    "ledger_record",
    "load_done_ids",
    "read_ledger",
    "same_file",
]

logger = logging.getLogger("novita_async")


#: The ledgers of one output folder: ``ledger.jsonl``, ``ledger.shard-K-of-N.jsonl``...
LEDGER_GLOB = "ledger*.jsonl"

#: The API's reason for a refusal that depends only on the two images.
NO_FACE = "IMAGE_NO_FACE_DETECTED"


def input_fingerprint(job: MergeJob) -> list[list[int]] | None:
    """``[[size, mtime_ns], [size, mtime_ns]]`` of a job's two input files (blocking: two stats).

    None when an input is not a path (bytes, a file object, an image: nothing
    tells whether it changed) or cannot be read.
    """
    fingerprint = []
    for value in (job.face_image, job.image):
        if not isinstance(value, (str, os.PathLike)):
            return None
        try:
            info = os.stat(value)
        except (OSError, ValueError):
            return None
        fingerprint.append([info.st_size, info.st_mtime_ns])
    return fingerprint


def ledger_record(result: JobResult, inputs: list[list[int]] | None = None) -> dict[str, Any]:
    """The ledger line for a job result (pure); ``inputs`` is its :func:`input_fingerprint`, if kept."""
    error = result.error
    record = {
        "id": result.job.id,
        "status": result.status,
        "output": str(result.output) if result.output is not None else None,
        "image_type": result.result.image_type if result.result is not None else None,
        "error_type": type(error).__name__ if error is not None else None,
        "error_status": getattr(error, "status", None),
        "error_reason": result.error_reason,
        "error_message": str(error) if error is not None else None,
        "attempts": result.attempts,
        "elapsed": round(result.elapsed, 4),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if inputs is not None:
        record["inputs"] = inputs
    return record


def is_ledger_record(fields: dict[str, Any]) -> bool:
    """Whether a JSON object is a ledger line (an ``id`` and a ``status``, no image paths)."""
    return (isinstance(fields.get("id"), str) and isinstance(fields.get("status"), str)
            and "face_image" not in fields)


def _not_a_ledger(path: Path) -> str | None:
    """What the first line of an existing file is, when it is not a ledger's; else None.

    A line cut short by a crash is still a ledger's: it begins as every record does.
    """
    with path.open("rb") as handle:
        first = handle.readline(4096).strip()
    if not first or first.startswith(b'{"id":'):
        return None
    try:
        fields = json.loads(first)
    except ValueError:
        return "text that is not JSON"
    if isinstance(fields, dict) and is_ledger_record(fields):
        return None
    return "JSON that is not a job record"


def read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    """The last record per job id in a ledger (torn or foreign lines are skipped)."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    with path.open("rb") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records[record["id"]] = record
    return records


def load_done_ids(path: Path) -> set[str]:
    """Ids whose last ledger line is ``ok``."""
    return {job_id for job_id, rec in read_ledger(path).items() if rec.get("status") == JobStatus.OK}


class Ledger:
    """An append-only JSONL file of job outcomes, locked for this run while open.

    Args:
        path: The ledger file; created (with its folder) if missing.

    Raises:
        LedgerInUseError: Another open :class:`Ledger` (this process or another)
            holds the file.
        ConfigurationError: The file exists and is not a ledger.
        OutputError: The file cannot be made, opened or read (a folder, a
            read-only or full disk).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = -1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered binary append: each record is one write(2), never interleaved.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._start()
        except OSError as exc:
            self.close()
            raise OutputError(f"cannot open the ledger {self.path}: {exc.strerror or exc}. Give a ledger "
                              "file in a folder you can write to (with free space)") from exc
        except BaseException:
            self.close()
            raise
        self.lines_written = 0

    def _start(self) -> None:
        """Lock the file, check that it is a ledger, and take in what it and its siblings say."""
        # Locked before anything is read: what this run sees as done stays done.
        _lock(self._fd, self.path)
        foreign = _not_a_ledger(self.path)
        if foreign is not None:
            # Appending records to someone's file (a manifest given as the
            # ledger) would spoil it; reading it back, a run could feed on itself.
            raise ConfigurationError(
                f"{self.path} is not a ledger: its first line is {foreign}. Give a new file "
                "(or the ledger an earlier run of this batch wrote); the manifest is the "
                "command's first argument")
        self._load_all()
        self._repair_torn_tail()

    def _load_all(self) -> None:
        self._done: set[str] = set()
        # Input sizes of done jobs whose record has them: (face_image, image).
        self._done_sizes: dict[str, tuple[int, int]] = {}
        # Jobs with a "no face" record that still stands, with their inputs as they were then.
        self._no_face: dict[str, tuple[list[list[int]], str]] = {}
        siblings = [p for p in sorted(self.path.parent.glob(LEDGER_GLOB)) if not same_file(p, self.path)]
        elsewhere: set[str] = set()
        for sibling in siblings:
            elsewhere |= self._load(sibling)
        #: Jobs only the other ledgers of the folder record as done.
        self.from_siblings = len(elsewhere - self._load(self.path))
        if self.from_siblings:
            logger.info("%d job(s) done according to the other ledgers in %s (%s): not sent again",
                        self.from_siblings, self.path.parent, ", ".join(p.name for p in siblings))

    def _load(self, path: Path) -> set[str]:
        """Take in a ledger's records; return the ids it has done.

        Done in any ledger is done.  Across ledgers (the last record per id
        wins within one), a "no face" record stands beside a done one only
        when it is for inputs of other sizes: the job was sent again because
        they changed, and found no face in them.
        """
        done = set()
        for job_id, record in read_ledger(path).items():
            inputs = _fingerprint_of(record.get("inputs"))
            if record.get("status") == JobStatus.OK:
                done.add(job_id)
                self._done.add(job_id)
                if inputs is not None:
                    self._done_sizes[job_id] = _sizes(inputs)
                no_face = self._no_face.get(job_id)
                if no_face is not None and self._done_sizes.get(job_id) in (None, _sizes(no_face[0])):
                    del self._no_face[job_id]
            elif record.get("error_reason") == NO_FACE and inputs is not None:
                done_sizes = self._done_sizes.get(job_id)
                if job_id not in self._done or (done_sizes is not None and done_sizes != _sizes(inputs)):
                    self._no_face[job_id] = (inputs, str(record.get("error_message") or ""))
        return done

    def _repair_torn_tail(self) -> None:
        # A crash mid-line leaves no newline at the end; start on a fresh line
        # so the next record is not glued to the torn one.
        size = os.fstat(self._fd).st_size
        if size:
            with self.path.open("rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def is_done(self, job_id: str) -> bool:
        """Whether an earlier run finished this job successfully."""
        return job_id in self._done

    def changed_input(self, job: MergeJob) -> tuple[str, int, int] | None:
        """For a done job, the first input whose size differs from its done record's: (name, then, now).

        None when neither differs, or when nothing tells (a record without
        input sizes, written before they were kept; inputs that are not files
        or cannot be read now).  Blocking but small: two stats.
        """
        then = self._done_sizes.get(job.id or "")
        if then is None:
            return None
        now = input_fingerprint(job)
        if now is None:
            return None
        for name, size_then, (size_now, _mtime) in zip(("face_image", "image"), then, now, strict=True):
            if size_now != size_then:
                return name, size_then, size_now
        return None

    def no_face_before(self, job: MergeJob) -> str | None:
        """The earlier "no face" message for this job if neither input file changed since, else None.

        Blocking but small: two stats, and only for jobs that had no face.
        """
        earlier = self._no_face.get(job.id or "")
        if earlier is None or input_fingerprint(job) != earlier[0]:
            return None
        return earlier[1]

    def append(self, result: JobResult, inputs: list[list[int]] | None = None) -> None:
        """Record a finished job (blocking but tiny: one write).

        ``inputs`` is the job's :func:`input_fingerprint` from before it was
        sent; it is kept on an ``ok`` line (for :meth:`changed_input`) and on
        a "no face" line (for :meth:`no_face_before`).
        """
        kept = inputs if result.status == JobStatus.OK or result.error_reason == NO_FACE else None
        line = json.dumps(ledger_record(result, kept), separators=(",", ":"), default=str) + "\n"
        view = memoryview(line.encode())
        while view:
            # A nearly full disk takes part of a line and returns short without
            # an error; writing the rest raises the real one (ENOSPC) instead of
            # counting a torn line as recorded.
            view = view[os.write(self._fd, view) :]
        self.lines_written += 1
        if result.status == JobStatus.OK and result.job.id:
            self._done.add(result.job.id)
            # Done with the inputs it was sent with: nothing of before holds.
            self._done_sizes.pop(result.job.id, None)
            self._no_face.pop(result.job.id, None)

    def close(self) -> None:
        """Close the file, which releases its lock. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _lock(fd: int, path: Path) -> None:
    """Take the ledger's exclusive advisory lock without waiting, or raise :class:`LedgerInUseError`.

    ``flock`` locks belong to the open file, not to the process: two batches
    of one process on one ledger exclude each other too.
    """
    if sys.platform == "win32":
        return  # no fcntl: no lock (see the module's docstring)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LedgerInUseError(str(path)) from None
    except OSError as exc:
        # A file system without flock: running unlocked beats refusing to run.
        logger.warning("cannot lock the ledger %s (%s): another run on it would not be stopped",
                       path, exc.strerror or exc)


def _fingerprint_of(value: Any) -> list[list[int]] | None:
    """A record's ``inputs`` if it is an :func:`input_fingerprint` (two [size, mtime_ns] pairs), else None."""
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(pair, list) and len(pair) == 2
                    and all(type(number) is int for number in pair) for pair in value)):
        return value
    return None


def _sizes(fingerprint: list[list[int]]) -> tuple[int, int]:
    """The two input sizes of a fingerprint."""
    return fingerprint[0][0], fingerprint[1][0]


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (by their absolute paths while either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # b not created yet
        return os.path.abspath(a) == os.path.abspath(b)
