"""Checks of what callers pass to the client: a bad argument is refused at once,
named, with its fix, not found out at first use."""

from __future__ import annotations

import ipaddress
import os
import unicodedata
import warnings
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import aiohttp

from novita_async._config import API_KEY_ENV, MERGE_FACE_PATH, RetryPolicy, env_api_key
from novita_async._errors import ConfigurationError
from novita_async._jobs import MergeJob
from novita_async._pacing import PacerProtocol

__all__ = ["check_base_url", "check_client_types", "check_job_stream", "check_max_concurrency", "check_output"]


def check_base_url(base_url: str) -> str:
    """``base_url`` stripped of surrounding spaces and a trailing slash, if requests can use it.

    Refuses now, naming the fix, what every request would otherwise find out
    later (a retried connection error, a 404): a non-http(s) URL, a port out
    of range, a query or fragment, the endpoint's own path; warns of plain
    HTTP to another machine.
    """
    # Spaces around a pasted URL are a slip, stripped as around a key or $NOVITA_BASE_URL.
    url = base_url.strip()
    parts = _split_base_url(url, base_url)
    problem = _base_url_problem(url, parts)
    if problem is not None:
        raise ConfigurationError(f"base_url {base_url!r} {problem}")
    assert parts.hostname is not None  # _split_base_url refuses a URL without a host
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        warnings.warn(
            f"base_url {url!r} is plain HTTP to a non-loopback host: the API key and "
            "images travel unencrypted. Use https.",
            UserWarning,
            stacklevel=3,
        )
    return url.rstrip("/")


def _split_base_url(url: str, given: str) -> SplitResult:
    """``url``'s parts, if it is http(s)://host[:port][/path]; a ConfigurationError otherwise."""
    example = "pass e.g. 'https://api.novita.ai' or the emulator's 'http://127.0.0.1:PORT'"
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "http://[::1" and the like
        raise ConfigurationError(f"base_url {given!r} is not a valid URL ({exc}); {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"base_url {given!r} is not an http(s) URL; {example}")
    try:
        port = parts.port  # parsed on access: a ValueError for "abc" or 99999
    except ValueError:
        port = 0
    if port == 0:
        # No server listens there: each request would be a connection error,
        # retried for up to RetryPolicy.total_timeout before anyone is told.
        raise ConfigurationError(
            f"base_url {given!r} has no usable port: give a number from 1 to 65535 after the host "
            "(the emulator prints its URL, port included), or no port for the scheme's default")
    return parts


def _base_url_problem(url: str, parts: SplitResult) -> str | None:
    """What in a well-formed http(s) ``url`` would send every request astray, with its fix; or None."""
    if any(ord(char) <= 32 or ord(char) == 127 for char in url):
        # urlsplit drops tabs and line breaks silently; aiohttp would not.
        return "holds a space or control character; pass the URL alone, e.g. 'https://api.novita.ai'"
    if "?" in url or "#" in url:
        # The client appends the endpoint's path to base_url: after a query or
        # fragment, that path would not be a path.
        bare = url.split("#", 1)[0].split("?", 1)[0].rstrip("/")
        return f"has a query or fragment, which requests cannot carry; pass the URL without it: {bare!r}"
    path = parts.path.rstrip("/")
    if path.lower().endswith(MERGE_FACE_PATH):
        bare = url.rstrip("/")[: -len(MERGE_FACE_PATH)]
        return (f"ends with the endpoint's path {MERGE_FACE_PATH}, which the client adds itself; "
                f"pass the base URL only: {bare!r}")
    return None


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (plain HTTP to it stays on the machine)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_client_types(**arguments: object) -> None:
    """Refuse a constructor argument of the wrong type, or a key no header can carry, now, naming it."""
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
    if "api_key" in arguments:
        _check_key_characters(arguments["api_key"])


def _check_key_characters(api_key: object) -> None:
    """Refuse a key (given, else from the environment) with a control character inside.

    aiohttp refuses such a header on every request with a bare ValueError
    (a line break could smuggle in another header).  Around the key they are
    stripped, as the client strips spaces.  The message never shows the key.
    """
    if isinstance(api_key, str):
        key, where = api_key, "api_key"
    elif api_key is None:
        key, where = env_api_key() or "", f"the {API_KEY_ENV} environment variable"
    else:
        return  # a wrong type, refused by its own check
    for position, char in enumerate(key.strip(), start=1):
        if unicodedata.category(char) == "Cc":
            raise ConfigurationError(
                f"{where} holds a control character ({char!r} at character {position}), which no "
                "HTTP header may carry: give the key alone, on one line, without line breaks or "
                "other control characters"
            )


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


def check_job_stream(jobs: object) -> None:
    """Refuse a batch's ``jobs`` that is no stream of jobs: not iterable, or text (iterable by character).

    Found out in the batch, a non-iterable would end it with a bare
    TypeError, and a str would run one job per character.
    """
    if isinstance(jobs, (str, bytes, bytearray, memoryview)):
        reason = "a str or bytes, which would run one job per character"
    elif isinstance(jobs, (Iterable, AsyncIterable)) or hasattr(type(jobs), "__getitem__"):
        return
    else:
        reason = "not iterable"
    one = "; for a single job, pass [job]" if isinstance(jobs, MergeJob) else ""
    raise ConfigurationError(
        f"batch jobs must be an iterable or async iterable of MergeJob, got {type(jobs).__name__} "
        f"{jobs!r:.60} ({reason}): pass a list or generator of na.MergeJob(face, image), or "
        f"na.read_manifest(path) for a manifest file{one}"
    )
