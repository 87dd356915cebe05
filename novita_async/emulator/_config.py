"""The emulator's settings: contract limits, latency, faults, rate limit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from novita_async._config import MAX_IMAGE_BYTES, Timeout

__all__ = ["DEFAULT_API_KEY", "FAULT_KINDS", "IMAGE_LIMITS", "EmulatorConfig", "Faults"]

#: The key the emulator accepts unless told otherwise (and the demo uses).
DEFAULT_API_KEY = "sk_emulator_local"

#: The two readings of the API's "at most 30 MB" per image, in bytes: the docs
#: do not say which.  "mib" is the client's reading (the larger, see
#: novita_async._config.MAX_IMAGE_BYTES) and the emulator's default; "mb"
#: refuses the files between the two, as the API would if it counts in MB.
IMAGE_LIMITS: Mapping[str, int] = MappingProxyType({"mib": MAX_IMAGE_BYTES, "mb": 30_000_000})

#: Fault kinds and what each does to one attempt.
FAULT_KINDS: Mapping[str, str] = MappingProxyType({
    "500": "500 CREATE_TASK_FAILED (JSON body)",
    "502_html": "502 with an HTML body, as a proxy sends",
    "503": "503 surge protection (JSON body)",
    "429": "429 RATE_LIMIT_EXCEEDED without Retry-After",
    "429_retry_after": "429 RATE_LIMIT_EXCEEDED with Retry-After: 1",
    "429_retry_date": "429 RATE_LIMIT_EXCEEDED with Retry-After as an HTTP date, 1 to 2 s ahead",
    "drop": "connection closed without an answer",
    "truncate": "200 whose body stops half-way, then the connection closes",
    "slow": "500 TASK_FAILED only after slow_seconds (by default longer than the client's whole-attempt timeout)",
    "drip": "200 whose body, the real merged answer, trickles out one byte per drip_interval seconds "
            "(by default longer than the client's read timeout)",
    "bad_json": "200 whose body is not JSON",
    "no_image_file": "200 with JSON lacking image_file",
    "bad_base64": "200 whose image_file is not valid base64",
    "huge_error": "500 with a 10 MB error body",
    "wrong_content_type": "200 success body labelled text/plain",
    "504_html": "504 gateway timeout with an HTML body, as a proxy sends",
    "invalid_image_size": "400 INVALID_IMAGE_SIZE (JSON body)",
    "billing_auth_failed": "403 BILLING_AUTH_FAILED (JSON body)",
    "api_not_allowed": "403 API_NOT_ALLOWED (JSON body)",
    "billing_failed": "500 BILLING_FAILED (JSON body)",
    "get_result_failed": "500 GET_RESULT_FAILED (JSON body)",
})


@dataclass(frozen=True)
class Faults:
    """Failures the emulator injects, for tests and for users' own chaos runs.

    Args:
        rates: Probability per attempt of each fault kind (see ``FAULT_KINDS``);
            the rates add up to the share of attempts that fail.
        fail_first: Fail the first N attempts of each job (a job is its pair of
            images), whatever the rates say.
        fail_first_kind: The fault used for ``fail_first``.
        seed: Seed for the fault dice (None: random).
        slow_seconds: How long a ``slow`` answer takes (default 200: longer
            than the client's default ``Timeout.total`` of 180 s, so with
            defaults it is a timeout, as its name says).
        drip_interval: Seconds between bytes of a ``drip`` answer (default
            150: longer than the client's default ``Timeout.read`` of 120 s,
            so with defaults the read timeout catches it).

    Example:
        >>> Faults(rates={"503": 0.1, "drop": 0.05}).total_rate
        0.15000000000000002
    """

    rates: Mapping[str, float] = field(default_factory=dict)
    fail_first: int = 0
    fail_first_kind: str = "503"
    seed: int | None = None
    # Tied to the client's defaults so each fault stays what its name says if they change.
    slow_seconds: float = Timeout.total + 20.0
    drip_interval: float = Timeout.read + 30.0

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULT_KINDS)
        if self.fail_first_kind not in FAULT_KINDS:
            unknown.add(self.fail_first_kind)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(FAULT_KINDS)}")
        if any(not 0 <= r <= 1 for r in self.rates.values()) or self.total_rate > 1:
            raise ValueError("fault rates must be in [0, 1] and add up to at most 1")
        _require(self.fail_first >= 0, "fail_first", self.fail_first, "0 or more attempts")
        _require(self.slow_seconds >= 0, "slow_seconds", self.slow_seconds, "0 or more seconds")
        _require(self.drip_interval >= 0, "drip_interval", self.drip_interval, "0 or more seconds")
        object.__setattr__(self, "rates", MappingProxyType(dict(self.rates)))

    @property
    def total_rate(self) -> float:
        """Share of attempts that get some fault."""
        return sum(self.rates.values())


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator behaves.

    Args:
        api_keys: Keys it accepts (compared in constant time).
        latency: Seconds each merge takes on top of the merge itself, once the
            body is parsed (an image refused while merging, such as one with no
            face, waits too, as the service finds that while merging).
        jitter: Up to this many seconds more, uniformly at random.
        faults: Failures to inject.
        rate_limit_rpm: Per-key limit in requests per minute (None: unlimited).
        rate_limit_burst: Requests a key may make at once before the pace applies
            (the ``"bucket"`` kind).
        rate_limit_kind: How the limit is kept, as the API does not say:
            ``"bucket"`` (a token bucket: ``rate_limit_rpm`` per minute, refilled
            evenly, ``rate_limit_burst`` at once) or ``"window"`` (at most
            ``rate_limit_rpm * rate_limit_window / 60`` requests in any sliding
            ``rate_limit_window`` seconds, all at once if they like).
        rate_limit_window: The sliding window's length in seconds (60: "per minute").
        rate_limit_retry_after: Send ``Retry-After`` with rate-limit 429s.
        merge_workers: Merges run at once in worker threads.
        engine: ``"auto"`` (the real face merge when the [local] extra is
            installed, else the composite), ``"face"`` or ``"composite"``.
        balance: Successful merges before ``BILLING_BALANCE_NOT_ENOUGH`` (None: unlimited).
        max_image_bytes: Largest image file accepted, in bytes (each image,
            decoded from base64): 30 MiB by default; ``IMAGE_LIMITS["mb"]``
            (30,000,000) reads the API's "30 MB" in decimal megabytes.
        max_body_bytes: Largest request body accepted (two 30 MB images as base64, plus slack).
        max_body_bytes_held: Request body bytes held at once (read, parsed or
            being merged), across all requests: a request reserves its
            Content-Length (``max_body_bytes`` without one) before its body is
            read, and waits, unread, while the budget is full; one body larger
            than the whole budget is served alone.  The process holds more:
            a few times each held body while it is parsed and merged (its
            JSON text, the decoded images, their pixels), plus the answers
            being sent, which are not counted.
        body_read_timeout: Seconds a request's body may take to arrive once the
            emulator starts reading it; past that the connection is closed
            without an answer, as a proxy does with a client that stalls.
        png_level: zlib level of PNG results, 0-9; 0 stores them uncompressed
            (cheapest for the emulator; benchmarks use it so the emulator's
            CPU does not crowd the client's).
        keepalive_timeout: Seconds an idle keep-alive connection stays open
            before the emulator closes it, as servers and their load balancers
            do (aiohttp's default: 75).
    """

    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    latency: float = 0.0
    jitter: float = 0.0
    faults: Faults = field(default_factory=Faults)
    rate_limit_rpm: float | None = None
    rate_limit_burst: int = 3
    rate_limit_retry_after: bool = False
    rate_limit_kind: str = "bucket"
    rate_limit_window: float = 60.0
    merge_workers: int = 2
    engine: str = "auto"
    balance: int | None = None
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_body_bytes: int = 2 * 41 * 1024 * 1024 + 64 * 1024
    png_level: int = 1
    keepalive_timeout: float = 75.0
    max_body_bytes_held: int = 512 * 1024 * 1024
    body_read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.keepalive_timeout > 0:
            raise ValueError(f"keepalive_timeout must be a positive number of seconds, "
                             f"not {self.keepalive_timeout!r}")
        if not 0 <= self.png_level <= 9:
            raise ValueError(f"png_level must be 0-9, not {self.png_level}")
        if self.engine not in ("auto", "face", "composite"):
            raise ValueError(f"engine must be 'auto', 'face' or 'composite', not {self.engine!r}")
        if not self.api_keys:
            raise ValueError("api_keys must hold at least one key the emulator accepts")
        _require(self.latency >= 0, "latency", self.latency, "0 or more seconds")
        _require(self.jitter >= 0, "jitter", self.jitter, "0 or more seconds")
        _require(self.rate_limit_rpm is None or self.rate_limit_rpm > 0, "rate_limit_rpm",
                 self.rate_limit_rpm, "a positive number of requests per minute, or None for no limit")
        _require(self.rate_limit_burst >= 1, "rate_limit_burst", self.rate_limit_burst, "1 or more")
        _require(self.rate_limit_kind in ("bucket", "window"), "rate_limit_kind", self.rate_limit_kind,
                 "'bucket' or 'window'")
        _require(self.rate_limit_window > 0, "rate_limit_window", self.rate_limit_window,
                 "a positive number of seconds")
        _require(self.merge_workers >= 1, "merge_workers", self.merge_workers, "1 or more")
        _require(self.balance is None or self.balance >= 0, "balance", self.balance,
                 "0 or more merges, or None for no limit")
        _require(self.max_image_bytes > 0, "max_image_bytes", self.max_image_bytes, "a positive number of bytes")
        _require(self.max_body_bytes > 0, "max_body_bytes", self.max_body_bytes, "a positive size")
        _require(self.max_body_bytes_held > 0, "max_body_bytes_held", self.max_body_bytes_held,
                 "a positive number of bytes")
        # No timeout is unbounded: infinity would bring back the stalled upload held forever.
        _require(math.isfinite(self.body_read_timeout) and self.body_read_timeout > 0,
                 "body_read_timeout", self.body_read_timeout, "a positive, finite number of seconds")


def _require(ok: bool, name: str, value: object, what: str) -> None:
    """Refuse a setting with a message naming it, its value and what it must be."""
    if not ok:
        raise ValueError(f"{name} must be {what}, not {value!r}")
