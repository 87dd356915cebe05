"""Checks of what callers pass to the client: a bad argument is refused at once,
named, with its fix, not found out at first use."""

from __future__ import annotations

import ipaddress
import os
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from novita_async._config import RetryPolicy
from novita_async._errors import ConfigurationError
from novita_async._pacing import PacerProtocol

__all__ = ["check_base_url", "check_client_types", "check_max_concurrency", "check_output"]


def check_base_url(base_url: str) -> str:
    """``base_url`` without a trailing slash; refuses a non-http(s) URL, warns of plain HTTP."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"base_url {base_url!r} is not an http(s) URL; pass e.g. 'https://api.novita.ai' "
            "or the emulator's 'http://127.0.0.1:PORT'"
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        warnings.warn(
            f"base_url {base_url!r} is plain HTTP to a non-loopback host: the API key and "
            "images travel unencrypted. Use https.",
            UserWarning,
            stacklevel=3,
        )
    return base_url.rstrip("/")


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (plain HTTP to it stays on the machine)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_client_types(**arguments: object) -> None:
    """Refuse a constructor argument of the wrong type now, naming it, not at first use."""
    expected: dict[str, tuple[type, ...]] = {
        "api_key": (str,), "base_url": (str,), "retry": (RetryPolicy,),
        "session": (aiohttp.ClientSession,), "pacer": (PacerProtocol,),
        "auto_resize": (bool,), "validate": (bool,),
    }
    hints = {
        "api_key": "pass the key as a str ('sk_...')",
        "retry": "pass na.RetryPolicy(max_attempts=...)",
        "session": "pass an aiohttp.ClientSession, or None for the client's own",
        "pacer": "pass a na.Pacer (or any na.PacerProtocol), or requests_per_minute=... instead",
    }
    for name, value in arguments.items():
        if value is None and name not in ("auto_resize", "validate"):
            continue
        if not isinstance(value, expected[name]):
            wanted = " or ".join(kind.__name__ for kind in expected[name])
            hint = hints.get(name, f"pass a {wanted}")
            # Never the value of a key, even a malformed one.
            shown = type(value).__name__ if name == "api_key" else f"{type(value).__name__} {value!r:.40}"
            raise ConfigurationError(f"{name} must be a {wanted}, got {shown}: {hint}")
    if isinstance(arguments["session"], aiohttp.ClientSession) and arguments["session"].closed:
        raise ConfigurationError("session is already closed: pass an open aiohttp.ClientSession, "
                                 "or None for the client's own")


def check_output(output: object) -> Path | None:
    """``merge_face``'s ``output`` as a Path; a ConfigurationError for anything but a file path."""
    if output is None:
        return None
    path = os.fspath(output) if isinstance(output, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        shown = f"{type(output).__name__} {output!r:.40}"
        raise ConfigurationError(
            f"output must be the path of the result file (a non-empty str or os.PathLike), "
            f"got {shown}; pass output=None to keep the result in memory"
        )
    return Path(path)




def check_max_concurrency(value: object) -> int:
    """``max_concurrency`` as given, if it is an int of at least 1 (bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"max_concurrency must be an int >= 1, got {value!r}")
    return value
