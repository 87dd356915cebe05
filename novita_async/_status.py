"""Where a run stands: one summary across the ledgers of its shards.

The ledgers are the truth of a run (a line per finished job, the last line
per id wins), so an operator can read them while the workers run or after
they died.  With the manifest at hand the summary also counts the jobs no
ledger mentions yet: what is left.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novita_async._jobs import JobStatus, MergeJob
from novita_async._ledger import LEDGER_GLOB, read_ledger
from novita_async._manifest import BadRow, read_manifest
from novita_async._shard import assign_id

__all__ = ["LedgerCounts", "RunStatus", "ledger_files", "run_status"]


@dataclass
class LedgerCounts:
    """Counts of job outcomes, from one ledger or from all of them.

    Attributes:
        done: Jobs whose last record is ``ok``.
        failed: Jobs whose last record is a failure, by reason.
        not_attempted: Jobs recorded as not sent (the batch stopped early).
        recorded: Distinct job ids recorded.
    """

    done: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    not_attempted: int = 0
    recorded: int = 0

    @property
    def failed_total(self) -> int:
        """All failed jobs."""
        return sum(self.failed.values())

    def add(self, record: dict[str, Any]) -> None:
        """Count one job's last record."""
        self.recorded += 1
        status = record.get("status")
        if status == JobStatus.OK:
            self.done += 1
        elif status == JobStatus.NOT_ATTEMPTED:
            self.not_attempted += 1
        else:
            self.failed[str(record.get("error_reason") or status or "unknown")] += 1


@dataclass
class RunStatus:
    """A run seen through its ledgers (and, optionally, its manifest).

    Attributes:
        ledgers: Each ledger file with its own counts (None: the file does not
            exist yet, e.g. a shard that has not started).
        total: Counts over all ledgers; a job recorded in several counts once,
            as done if any ledger says so.
        manifest_jobs: Distinct jobs (ids) in the manifest (None without a manifest).
        never_run: Manifest jobs that no ledger mentions.
        foreign: Recorded ids that are not in the manifest (another manifest's
            ledger, or a manifest edited since).
        source: What listed the run's jobs, as the table names it (``"manifest"``,
            ``"jobs"`` for ``run_status(jobs=...)``, ``"folders"`` from the command line).
    """

    ledgers: list[tuple[Path, LedgerCounts | None]]
    total: LedgerCounts
    manifest_jobs: int | None = None
    never_run: int = 0
    foreign: int = 0
    source: str = "manifest"

    @property
    def left(self) -> int | None:
        """Manifest jobs not done yet (never run, failed or not attempted); None without a manifest."""
        return None if self.manifest_jobs is None else self.manifest_jobs - self.total.done

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot."""
        def counts(c: LedgerCounts) -> dict[str, Any]:
            return {"done": c.done, "failed": dict(c.failed), "not_attempted": c.not_attempted,
                    "recorded": c.recorded}

        return {
            "ledgers": {str(p): (counts(c) if c is not None else None) for p, c in self.ledgers},
            "total": counts(self.total),
            "manifest_jobs": self.manifest_jobs,
            "left": self.left,
            "never_run": self.never_run if self.manifest_jobs is not None else None,
            "foreign": self.foreign,
        }

    def table(self) -> str:
        """A short table for the terminal: one row per ledger, one for all."""
        header = ("ledger", "done", "failed", "not attempted", "recorded")
        rows: list[tuple[str, ...]] = []
        for path, c in self.ledgers:
            if c is None:
                rows.append((path.name, "-", "-", "-", "-  (not found)"))
            else:
                rows.append((path.name, str(c.done), str(c.failed_total), str(c.not_attempted),
                             str(c.recorded)))
        t = self.total
        rows.append(("all", str(t.done), str(t.failed_total), str(t.not_attempted), str(t.recorded)))
        width = max(len(r[0]) for r in [header, *rows])
        lines = [
            f"{r[0]:<{width}}  {r[1]:>6}  {r[2]:>6}  {r[3]:>13}  {r[4]:>8}" for r in [header, *rows]
        ]
        if t.failed:
            lines.append("failed by reason: " + ", ".join(f"{r} {n}" for r, n in t.failed.most_common()))
        if self.manifest_jobs is None:
            lines.append("left: unknown (give --manifest to count the jobs no ledger mentions)")
        else:
            not_done = t.failed_total + t.not_attempted
            lines.append(f"{self.source}: {self.manifest_jobs} jobs; left {self.left} "
                         f"({self.never_run} never run, {not_done} failed or not attempted)")
            if self.foreign:
                lines.append(f"note: {self.foreign} recorded job(s) are not in the {self.source}")
        return "\n".join(lines)


def ledger_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The ledger files named: files as given, folders as their ``ledger*.jsonl`` files."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(path.glob(LEDGER_GLOB)))
        else:
            files.append(path)
    return files


def run_status(
    ledgers: Sequence[str | os.PathLike[str]],
    *,
    manifest: str | os.PathLike[str] | None = None,
    jobs: Iterable[MergeJob | BadRow] | None = None,
) -> RunStatus:
    """Summarise a run from its ledgers (shards' or not), and what is left of its jobs.

    Args:
        ledgers: Ledger files, or folders whose ``ledger*.jsonl`` files to read.
            A missing file counts as an empty ledger (a shard not started yet).
        manifest: The run's CSV/JSONL manifest: adds the jobs no ledger records.
        jobs: The run's jobs, instead of a manifest (such as
            ``jobs_from_folders(...)`` for a run over two folders).

    Raises:
        ManifestError: the manifest cannot be read.
        ValueError: both ``manifest`` and ``jobs`` were given.

    Example:
        >>> print(run_status(["out/"], manifest="jobs.csv").table())  # doctest: +SKIP
    """
    if manifest is not None and jobs is not None:  # before reading any ledger
        raise ValueError("give the run's manifest or its jobs, not both")
    merged: dict[str, dict[str, Any]] = {}
    per_file: list[tuple[Path, LedgerCounts | None]] = []
    for path in ledger_files(ledgers):
        if not path.is_file():
            per_file.append((path, None))
            continue
        records = read_ledger(path)
        counts = LedgerCounts()
        for job_id, record in records.items():
            counts.add(record)
            # Done in any ledger means done: a batch given that ledger skips it.
            if job_id not in merged or record.get("status") == JobStatus.OK:
                merged[job_id] = record
        per_file.append((path, counts))
    total = LedgerCounts()
    source = "manifest" if manifest is not None else "jobs"
    if manifest is not None:
        jobs = read_manifest(manifest)
    if jobs is None:
        for record in merged.values():
            total.add(record)
        return RunStatus(ledgers=per_file, total=total)
    # A row repeated in the manifest has the same id: it is one job to the
    # batch (done once, then skipped), so it counts once here too.
    seen: set[str] = set()
    never_run = recorded = 0
    for position, item in enumerate(jobs):
        job_id, _ = assign_id(item, position)
        if job_id in seen:
            continue
        seen.add(job_id)
        last = merged.get(job_id)
        if last is None:
            never_run += 1
        else:
            recorded += 1
            total.add(last)
    return RunStatus(ledgers=per_file, total=total, manifest_jobs=len(seen), never_run=never_run,
                     foreign=len(merged) - recorded, source=source)
