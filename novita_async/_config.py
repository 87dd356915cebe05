"""Configuration value objects; every default of the library lives here.

Everything is a small frozen dataclass so a config can be shared between
clients and tasks without anyone mutating it under another's feet.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from novita_async._errors import ConfigurationError

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "ERROR_BODY_CAP",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_SIDE",
    "MIN_IMAGE_SIDE",
    "READ_CHUNK",
    "RESPONSE_IMAGE_TYPES",
    "RetryPolicy",
    "Timeout",
    "check_number",
]

DEFAULT_BASE_URL = "https://api.novita.ai"
API_KEY_ENV = "NOVITA_API_KEY"
BASE_URL_ENV = "NOVITA_BASE_URL"
MERGE_FACE_PATH = "/v3/merge-face"

#: The API's limits for each input image (the file, before base64).  "30 MB"
#: is read as 30 MiB, the larger of its two readings: a file between the two
#: is sent, and the API's own answer decides, rather than refused here when
#: the service may well take it.
MAX_IMAGE_BYTES = 30 * 1024 * 1024
MAX_IMAGE_SIDE = 2048
#: Smallest width or height taken.  The API answers INVALID_IMAGE_SIZE below
#: some size its docs do not give; 16 pixels is our reading (no face detector
#: finds a face in fewer), kept by the client's checks and by the emulator.
MIN_IMAGE_SIDE = 16

#: Output formats the API accepts for ``extra.response_image_type``.
RESPONSE_IMAGE_TYPES = ("png", "webp", "jpeg")

#: Bytes read from a source per step.  A multiple of 3 so each chunk encodes
#: to whole base64 quanta with no padding in the middle of the string.
READ_CHUNK = 3 * 128 * 1024

#: How much of an error body is read; the rest is discarded unread.
ERROR_BODY_CAP = 64 * 1024


def check_number(name: str, value: object, *, minimum: float = 0.0, above: bool = False,
                 maximum: float = math.inf) -> float:
    """``value`` if it is a finite int or float within bounds, else a ConfigurationError naming ``name``.

    A bool is not a number here (``True`` seconds is a mistake, not 1), and
    neither nan nor infinity is a meaningful wait, pace or limit.

    Args:
        name: The argument, as the message names it (``"Timeout.total"``).
        minimum: The lowest value allowed.
        above: Whether ``minimum`` itself is excluded.
        maximum: The highest value allowed.
    """
    bound = f"> {minimum:g}" if above else f">= {minimum:g}"
    if maximum < math.inf:
        bound = f"between {minimum:g} and {maximum:g}"
    if (
        isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or value < minimum or (above and value == minimum)
        or value > maximum
    ):
        raise ConfigurationError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


@dataclass(frozen=True)
class Timeout:
    """Time limits for one attempt, in seconds; none is unbounded.

    Args:
        total: Wall-clock limit for one attempt: upload, server work, download.
            Novita advises clients to allow more than 60 s.
        connect: Limit for opening the TCP/TLS connection.
        read: Longest silence allowed between two reads of the response.
        pool: Longest wait for a free slot in the client's concurrency pool.
            Queued jobs wait here *before* their attempt clock starts.

    Example:
        >>> Timeout(total=90.0).connect
        10.0
    """

    total: float = 180.0
    connect: float = 10.0
    read: float = 120.0
    pool: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("total", "connect", "read", "pool"):
            check_number(f"Timeout.{name} (seconds)", getattr(self, name), above=True)

    @classmethod
    def of(cls, value: Timeout | float | None) -> Timeout:
        """Coerce a number of seconds or ``None`` (defaults) to a Timeout.

        A number is the time allowed for one attempt however it is spent: it
        sets ``total`` and ``read`` (the server may stay silent all of it
        while it merges), and caps ``connect``.

        Example:
            >>> Timeout.of(300).read
            300.0
        """
        if value is None:
            return cls()
        if isinstance(value, Timeout):
            return value
        total = float(check_number("timeout (a Timeout, or seconds for the total)", value, above=True))
        return cls(total=total, read=total, connect=min(cls.connect, total))


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry a transient failure (5xx, 408, 429, network).

    Waits grow exponentially from ``initial_wait`` to ``max_wait`` with full
    jitter; a server's ``Retry-After`` is honoured up to ``max_retry_after``.

    Args:
        max_attempts: Attempts in all, the first included (1 disables retries).
        initial_wait: First backoff, seconds (each wait is capped at ``max_wait``).
        max_wait: Cap on one backoff, seconds.
        total_timeout: Give up retrying once this many seconds have passed since
            the first attempt started sending (waits for a free slot or the pace
            before it, and a retry's wait for a free slot, do not count).  A
            retry whose wait for the pace (a 429 cool-down) would end later is
            not made; the running attempt is not cut short.
        jitter: Fraction of each wait that is randomised (0 = none, 1 = full).
        max_retry_after: Cap on a server-requested wait, seconds.

    Example:
        >>> RetryPolicy(max_attempts=3, initial_wait=0.5).max_wait
        60.0
    """

    @classmethod
    def default_for(cls, *, fixed_pace: bool) -> RetryPolicy:
        """The default policy: 5 attempts under a fixed pace, 10 under the adaptive one.

        The adaptive pace starts unthrottled and finds the limit through 429s, so
        a job sent early can meet several in a row: at the account default of
        10 per minute, 8 jobs at once lost 3 to 429s with 5 attempts and none
        with 10.
        """
        return cls() if fixed_pace else cls(max_attempts=10)

    max_attempts: int = 5
    initial_wait: float = 1.0
    max_wait: float = 60.0
    total_timeout: float = 900.0
    jitter: float = 1.0
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        attempts: object = self.max_attempts  # checked at run time, whatever the annotation says
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(f"RetryPolicy.max_attempts must be an int >= 1, got {attempts!r}")
        for name in ("initial_wait", "max_wait", "total_timeout", "max_retry_after"):
            check_number(f"RetryPolicy.{name} (seconds)", getattr(self, name))
        check_number("RetryPolicy.jitter", self.jitter, maximum=1.0)

    def backoff(self, retry_number: int, rand: float) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based); ``rand`` in [0, 1)."""
        # The exponent is capped: 2.0 ** 1024 overflows, and far fewer doublings
        # already reach any sensible max_wait.
        exponent = min(max(retry_number - 1, 0), 64)
        base = min(self.max_wait, self.initial_wait * 2.0**exponent)
        return base * (1.0 - self.jitter) + base * self.jitter * rand


def env_api_key() -> str | None:
    """The API key from the environment, or None when unset or blank."""
    value = os.environ.get(API_KEY_ENV, "").strip()
    return value or None


def env_base_url() -> str:
    """The base URL from the environment, else the public endpoint."""
    return os.environ.get(BASE_URL_ENV, "").strip() or DEFAULT_BASE_URL
