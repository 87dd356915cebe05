"""The emulator's per-key rate limits: the two ways a per-minute limit is commonly kept."""

from __future__ import annotations

import collections

__all__ = ["SlidingWindow", "TokenBucket"]


class TokenBucket:
    """Per-key rate limit: ``rpm`` per minute, ``burst`` at once."""

    def __init__(self, rpm: float, burst: int) -> None:
        self.rate = rpm / 60.0
        self.burst = float(max(1, burst))
        self._tokens: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> float:
        """Take a token; return 0 if allowed, else seconds until one is free."""
        tokens, last = self._tokens.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._tokens[key] = (tokens - 1.0, now)
            return 0.0
        self._tokens[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


class SlidingWindow:
    """Per-key rate limit: at most ``rpm * window / 60`` requests in any ``window`` seconds.

    The other way a per-minute limit is commonly kept: with no burst allowance
    beyond the window's count, but the whole count may come at once.
    """

    def __init__(self, rpm: float, window: float) -> None:
        self.window = window
        self.limit = max(1, int(rpm * window / 60.0))
        self._starts: dict[str, collections.deque[float]] = {}

    def take(self, key: str, now: float) -> float:
        """Count a request; return 0 if allowed, else seconds until the window has room."""
        starts = self._starts.setdefault(key, collections.deque())
        while starts and starts[0] <= now - self.window:
            starts.popleft()
        if len(starts) < self.limit:
            starts.append(now)
            return 0.0
        return starts[0] + self.window - now
