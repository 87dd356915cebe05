"""What the emulator saw: the counters tests and benchmarks read."""

from __future__ import annotations

import hashlib
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STARTS_KEPT", "EmulatorStats", "job_key"]

#: Request start times kept for ``EmulatorStats.started_at`` (a bounded window,
#: so a million-request soak run does not grow the emulator's memory).
STARTS_KEPT = 100_000


@dataclass
class EmulatorStats:
    """What the emulator saw; tests read it to check the client's behaviour.

    Attributes:
        requests: Requests received on the merge-face route.
        statuses: Responses sent, by status (dropped connections are not here).
        faults: Faults injected, by kind.
        in_flight / peak_in_flight: Requests being handled now / at most at once.
        attempts: Attempts per job (a job is keyed by its two images' hashes).
        successes: Successful answers per job.
        chunked_requests: Requests that used chunked transfer encoding.
        missing_content_length: Requests without a Content-Length header.
        enterprise_requests: Valid requests that asked for the enterprise plan.
        handled: Successful merges timed in ``handling_seconds``.
        handling_seconds: The emulator's own time on those requests, from the
            body received to the answer ready (parse, wait for a merge worker,
            decode, merge, encode), not counting the latency knob or network
            I/O; benchmarks divide by ``handled`` for the per-request time.
        handling_cpu_seconds: CPU seconds of the parse and merge steps.
        connections: TCP connections that carried merge-face requests (a
            client that keeps its connections alive opens few).
        started_at: ``time.monotonic()`` of the latest requests (at most
            ``STARTS_KEPT``), for measuring a client's pace.
        first_request_at: ``time.monotonic()`` of the first request, or None.
        body_bytes_held / peak_body_bytes_held: Request body bytes reserved
            under ``max_body_bytes_held`` now / at most at once (a request
            reserves its Content-Length before reading its body and gives it
            back once its images are merged or refused).
        body_waits: Requests that waited for room in that budget before their
            body was read.
        body_read_timeouts: Requests dropped because their body took longer
            than ``body_read_timeout`` to arrive.
    """

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    successes: Counter[str] = field(default_factory=Counter)
    chunked_requests: int = 0
    missing_content_length: int = 0
    enterprise_requests: int = 0
    started_at: deque[float] = field(default_factory=lambda: deque(maxlen=STARTS_KEPT))
    first_request_at: float | None = None
    handled: int = 0
    handling_seconds: float = 0.0
    handling_cpu_seconds: float = 0.0
    connections: int = 0
    body_bytes_held: int = 0
    peak_body_bytes_held: int = 0
    body_waits: int = 0
    body_read_timeouts: int = 0
    # The connections' transports seen so far; weak, so a closed one's memory
    # (and identity) can be reused without being mistaken for it.
    _transports: weakref.WeakSet[object] = field(default_factory=weakref.WeakSet, repr=False)

    def count_connection(self, transport: object) -> None:
        """Count a connection (its transport) the first time it carries a request."""
        if transport is not None and transport not in self._transports:
            self._transports.add(transport)
            self.connections += 1

    def note_body_bytes(self, held: int) -> None:
        """Record the body bytes held now (and the peak)."""
        self.body_bytes_held = held
        self.peak_body_bytes_held = max(self.peak_body_bytes_held, held)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot."""
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "faults": dict(self.faults),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "attempts": dict(self.attempts),
            "successes": dict(self.successes),
            "chunked_requests": self.chunked_requests,
            "missing_content_length": self.missing_content_length,
            "enterprise_requests": self.enterprise_requests,
            "handled": self.handled,
            "handling_seconds": self.handling_seconds,
            "handling_cpu_seconds": self.handling_cpu_seconds,
            "connections": self.connections,
            "body_bytes_held": self.body_bytes_held,
            "peak_body_bytes_held": self.peak_body_bytes_held,
            "body_waits": self.body_waits,
            "body_read_timeouts": self.body_read_timeouts,
            # time.monotonic() of the first request (system-wide on Linux).
            "first_request_at": self.first_request_at,
        }


def job_key(face: bytes, image: bytes) -> str:
    """The emulator's identity of a job: hashes of its two decoded images."""
    return hashlib.sha1(face).hexdigest()[:16] + ":" + hashlib.sha1(image).hexdigest()[:16]
