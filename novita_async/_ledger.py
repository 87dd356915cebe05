"""The batch ledger: one JSON line per finished job, appended as each ends.

The ledger is what makes a batch resumable: a re-run skips every job whose
last line says ``ok`` and whose output still exists.  The other ledgers
beside it (``ledger*.jsonl`` in its folder: the shards of the same run, or a
run under another ledger name) count too, read only: a job one of them
finished is done, as ``status`` counts it, so finishing a crashed shard's work
from another worker, or changing the number of shards, sends nothing twice.

A job the API found no face in keeps its input files' sizes and modification
times on its line, so a re-run can tell that sending it again would get the
same answer.  Each line is written
with one ``write`` on an append-mode file and flushed at once, so a crash can
lose at most the line being written (a torn last line is ignored on load).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from novita_async._jobs import JobResult, JobStatus, MergeJob

__all__ = ["LEDGER_GLOB", "Ledger", "input_fingerprint", "ledger_record", "load_done_ids", "read_ledger"]

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
    """An append-only JSONL file of job outcomes.

    Args:
        path: The ledger file; created (with its folder) if missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._done: set[str] = set()
        # Jobs whose last line is "no face", with their inputs as they were then.
        self._no_face: dict[str, tuple[list[list[int]], str]] = {}
        siblings = [p for p in sorted(self.path.parent.glob(LEDGER_GLOB)) if not _same_file(p, self.path)]
        elsewhere: set[str] = set()
        for sibling in siblings:
            elsewhere |= self._load(sibling)
        #: Jobs only the other ledgers of the folder record as done.
        self.from_siblings = len(elsewhere - self._load(self.path))
        if self.from_siblings:
            logger.info("%d job(s) done according to the other ledgers in %s (%s): not sent again",
                        self.from_siblings, self.path.parent, ", ".join(p.name for p in siblings))
        # Unbuffered binary append: each record is one write(2), never interleaved.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._repair_torn_tail()
        self.lines_written = 0

    def _load(self, path: Path) -> set[str]:
        """Take in a ledger's records; return the ids it has done."""
        done = set()
        for job_id, record in read_ledger(path).items():
            if record.get("status") == JobStatus.OK:
                done.add(job_id)
                self._done.add(job_id)  # done in any ledger is done
                self._no_face.pop(job_id, None)
            elif (job_id not in self._done and record.get("error_reason") == NO_FACE
                  and isinstance(record.get("inputs"), list)):
                self._no_face[job_id] = (record["inputs"], str(record.get("error_message") or ""))
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
        sent; it is kept on a "no face" line, for :meth:`no_face_before`.
        """
        kept = inputs if result.error_reason == NO_FACE else None
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
            self._no_face.pop(result.job.id, None)

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # b not created yet
        return os.path.abspath(a) == os.path.abspath(b)
