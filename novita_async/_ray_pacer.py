"""The cluster-wide pacer of :mod:`novita_async.ray`: one Ray actor spaces every actor's request starts.

The API's rate limit belongs to the account, so the clients of all actors draw
their turns from one named actor (:func:`shared_pacer`), which keeps a
:class:`~novita_async._pacing.Pacer` and applies a 429 seen anywhere to every
later start.  :class:`ActorPacer` is the client side of it.  Ray is imported
only when a function here is called.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from typing import Any, NamedTuple

import anyio

from novita_async._config import env_api_key, env_base_url
from novita_async._pacing import Pacer

__all__ = ["ActorPacer", "Booking", "import_ray", "shared_pacer"]


def import_ray() -> Any:
    """Ray, with Ray Data loaded; an ImportError naming the extra to install if it is missing."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(
            "novita_async.ray needs Ray Data: install the extra with "
            "pip install 'novita_async[ray]'"
        ) from exc
    return ray


class Booking(NamedTuple):
    """A start slot booked with the shared pacer.

    Attributes:
        delay: Seconds the caller must wait before it starts (0: start now).
        rate: The shared pace, requests per second (None: unthrottled).
        epoch: The pacer's 429 count when the slot was booked.
        start: When the slot begins, on the pacer's monotonic clock (seconds).
    """

    delay: float
    rate: float | None
    epoch: int
    start: float


class _PaceKeeper:
    """The shared pacer's state (run as a Ray actor; plain Python, so it tests without Ray).

    A token-spacing scheduler: :meth:`reserve` books the next start slot and
    returns how long the caller must sleep, so callers never hold a lock
    across a sleep and a slow caller never delays the others.
    The pacing rules are :class:`~novita_async._pacing.Pacer`'s, unchanged:
    the cluster behaves as one client whose requests happen to start in
    several processes.  As in ``Pacer.wait_turn``:

    * a slot booked before a 429 is not used at the old pace: each booking
      carries an epoch, bumped by every 429, and a caller whose epoch is
      stale when it wakes books again (without this, 8 requests in flight
      against a 120/min limit drew twice the 429s and ended at half the limit);
    * a caller cancelled before its turn gives its slot back, and the next
      bookings take the slots given back before new ones (without this, a
      batch broken off with 30 calls queued at 6 a minute would leave the next
      call waiting five minutes behind slots nobody uses).
    """

    def __init__(self, requests_per_minute: float | None = None) -> None:
        self._pacer = Pacer(requests_per_minute)
        self._rpm = requests_per_minute
        self._epoch = 0
        # Starts of the slots given back in this epoch, earliest first.  Kept
        # here, not in the Pacer: its schedule is booked through its public
        # reserve() only, so a slot given back is handed out again from here.
        self._returned: list[float] = []
        self.reservations = 0

    def configure(self, requests_per_minute: float | None) -> None:
        """Change the pace (a no-op when it is the same)."""
        if requests_per_minute != self._rpm:
            self._pacer = Pacer(requests_per_minute)
            self._rpm = requests_per_minute
            self._returned.clear()

    def reserve(self) -> Booking:
        """Book a start: a slot given back if one is still ahead, else the next one of the pace."""
        self.reservations += 1
        now = time.monotonic()
        while self._returned and self._returned[0] <= now:
            self._returned.pop(0)  # its time has passed
        start = self._returned.pop(0) if self._returned else now + self._pacer.reserve(now)
        return Booking(start - now, self._pacer.rate, self._epoch, start)

    def rebook(self, epoch: int) -> Booking:
        """After sleeping to a slot booked in ``epoch``: go now if no 429 came since, else book again."""
        if epoch == self._epoch:
            return Booking(0.0, self._pacer.rate, epoch, time.monotonic())
        return self.reserve()

    def give_back(self, booking: Booking) -> None:
        """A caller was cancelled before its slot: let the next booking have it.

        Ignored once the slot has passed, after a 429 (the schedule started
        again from the cool-down), and with no pace (slots are not spaced).
        """
        if booking.epoch != self._epoch or self._pacer.rate is None or booking.start <= time.monotonic():
            return
        bisect.insort(self._returned, booking.start)

    def on_success(self) -> None:
        """A request somewhere succeeded."""
        self._pacer.on_success()

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A request somewhere got a 429 (``retry_after``: the server's hint, seconds): slow everyone."""
        self._pacer.on_rate_limited(retry_after)
        # Every 429, even one the pacer counts as part of an overshoot it has
        # already answered: re-booking once too often costs a call, not a 429.
        self._epoch += 1
        self._returned.clear()

    def stats(self) -> dict[str, Any]:
        """Reservations, slots waiting to be taken again, 429s reported, and the pace now (per minute)."""
        rate = self._pacer.rate
        return {
            "reservations": self.reservations,
            "returned": len(self._returned),
            "rate_limited": self._pacer.rate_limited,
            "requests_per_minute": rate * 60.0 if rate is not None else None,
            "fixed": self._pacer.fixed,
        }


def _pacer_name(api_key: str, base_url: str) -> str:
    # One budget per account and endpoint; a hash, so the key never shows in
    # Ray's dashboard or state API.
    digest = hashlib.sha256(f"{base_url}\0{api_key}".encode()).hexdigest()[:16]
    return f"novita_async.pacer.{digest}"


def shared_pacer(
    *,
    requests_per_minute: float | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    name: str | None = None,
) -> Any:
    """The cluster-wide pacer for an account: a named Ray actor, created once.

    Every :func:`merge_faces` call with the same key and base URL (in the same
    Ray namespace) shares it, so datasets processed at once still keep to one
    budget.  Wrap it in an :class:`ActorPacer` to give it to a client of your own.

    Args:
        requests_per_minute: The account's pace; None adapts to 429s (AIMD).
            Changes the pace of an existing pacer of that name.
        api_key: Defaults to ``$NOVITA_API_KEY``; only its hash names the actor.
        base_url: Defaults to ``$NOVITA_BASE_URL`` or the public endpoint.
        name: The actor's name, instead of one derived from key and URL.

    Returns:
        A Ray actor handle with ``reserve`` and ``rebook`` (each gives a
        :class:`Booking`), ``give_back``, ``on_success``, ``on_rate_limited``
        and ``stats`` methods.
    """
    ray = import_ray()
    if name is None:
        key = api_key if api_key is not None else env_api_key()
        name = _pacer_name(key or "", base_url or env_base_url())
    actor_class = ray.remote(num_cpus=0, max_restarts=-1)(_PaceKeeper)
    handle = actor_class.options(name=name, get_if_exists=True).remote(requests_per_minute)
    ray.get(handle.configure.remote(requests_per_minute))
    return handle


class ActorPacer:
    """A :class:`~novita_async.PacerProtocol` backed by a :func:`shared_pacer` actor.

    Each attempt asks the actor for a start slot (one small actor call, two
    when it has to wait) and sleeps until it comes; successes and 429s are
    reported without waiting.
    Ray runs one caller's calls to an actor in order, so a 429 reported here
    is applied before this process's next booking.

    Example:
        >>> pacer = ActorPacer(shared_pacer(requests_per_minute=10), fixed=True)  # doctest: +SKIP
        >>> client = NovitaClient(pacer=pacer)  # doctest: +SKIP
    """

    def __init__(self, actor: Any, *, fixed: bool, rate: float | None = None) -> None:
        """Wrap ``actor`` (a :func:`shared_pacer` handle); ``fixed``: whether it has a set pace."""
        self._actor = actor
        self._fixed = fixed
        self._rate = rate

    @property
    def fixed(self) -> bool:
        """Whether the shared pace is fixed."""
        return self._fixed

    @property
    def rate(self) -> float | None:
        """The shared pace (requests per second) as of this process's last booking."""
        return self._rate

    async def wait_turn(self) -> None:
        """Book a slot with the shared pacer and sleep until it (again, if a 429 came meanwhile).

        Cancelled before its turn, it gives the slot back to the shared pacer.
        """
        # Ray's ObjectRefs are awaitable from any asyncio loop.
        booked = self._actor.reserve.remote()
        try:
            booking: Booking = await booked
            self._rate = booking.rate
            while booking.delay > 0:
                await anyio.sleep(booking.delay)
                booked = self._actor.rebook.remote(booking.epoch)
                booking = await booked
                self._rate = booking.rate
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled (an error: the actor is gone)
                # The reference, not its value: a booking still on its way here
                # is given back too (Ray resolves it for the actor).  Ray runs
                # one caller's calls to an actor in order, so this process's
                # next booking can already take the slot.
                self._actor.give_back.remote(booked)
            raise

    def on_success(self) -> None:
        """Report a success (the adaptive pace grows a little)."""
        self._actor.on_success.remote()

    def on_rate_limited(self, retry_after: float | None) -> None:
        """Report a 429: every actor's next start waits out the cool-down."""
        self._actor.on_rate_limited.remote(retry_after)
