"""The batch ledger: one JSON line per finished job, appended as each ends.

The ledger is what makes a batch resumable: a re-run skips every job whose
last line says ``ok`` and whose output still exists.  Each line is written
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

from novita_async._jobs import JobResult, JobStatus

__all__ = ["Ledger", "ledger_record", "load_done_ids", "read_ledger"]

logger = logging.getLogger("novita_async")


def ledger_record(result: JobResult) -> dict[str, Any]:
    """The ledger line for a job result (pure)."""
    error = result.error
    return {
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
        self._done = load_done_ids(self.path)
        # Unbuffered binary append: each record is one write(2), never interleaved.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._repair_torn_tail()
        self.lines_written = 0

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

    def append(self, result: JobResult) -> None:
        """Record a finished job (blocking but tiny: one write)."""
        line = json.dumps(ledger_record(result), separators=(",", ":"), default=str) + "\n"
        view = memoryview(line.encode())
        while view:
            # A nearly full disk takes part of a line and returns short without
            # an error; writing the rest raises the real one (ENOSPC) instead of
            # counting a torn line as recorded.
            view = view[os.write(self._fd, view) :]
        self.lines_written += 1
        if result.status == JobStatus.OK and result.job.id:
            self._done.add(result.job.id)

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
