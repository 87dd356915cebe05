"""One HTTP exchange with the API, and the one place aiohttp errors are translated.

Everything aiohttp can raise is turned into a NovitaError here, chained with
``from``; nothing above this module sees an aiohttp type.

A caller may hand the client an ``aiohttp.ClientSession`` of their own, made
with settings that would change what our requests mean.  Each request
therefore sets what it relies on itself: it reads error statuses (never the
session's ``raise_for_status``), gets decoded bodies (whatever the session's
``auto_decompress``), runs under the client's time limits (not the session's
``timeout``), and sends its own ``Authorization`` and ``Content-Type`` over the
session's default headers.  The settings a request cannot override are refused
when the client is built (:func:`check_session`); one of them, a session that
reads ``.netrc`` (``trust_env=True``) where the file has credentials for the
API's host, depends on the host, and is refused before each request sends
anything (:func:`refuse_netrc_credentials`).
"""

from __future__ import annotations

import asyncio
import logging
import netrc
import os
import re
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiohttp

from novita_async._config import ERROR_BODY_CAP, MERGE_FACE_PATH, Timeout
from novita_async._decode import SuccessBodyDecoder
from novita_async._encode import RequestBody
from novita_async._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigurationError,
    InvalidResponseError,
    NovitaError,
    error_from_response,
)
from novita_async._output import Sink

__all__ = ["check_session", "read_capped", "refuse_netrc_credentials", "send_merge_request"]

logger = logging.getLogger("novita_async")


async def read_capped(content: aiohttp.StreamReader, cap: int) -> bytes:
    """Read at most ``cap`` bytes of a body; the rest is left unread."""
    parts: list[bytes] = []
    size = 0
    while size < cap:
        chunk = await content.read(cap - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


async def _stream_success(response: aiohttp.ClientResponse, sink: Sink) -> str | None:
    """Decode a success body into ``sink`` as it arrives; return its ``image_type``."""
    decoder = SuccessBodyDecoder()
    # One buffered network chunk at a time: readany() would join the chunks
    # waiting in the buffer into a new bytes object, a copy of the body.
    # readchunk() rather than iter_chunks(): the body of a 204 is aiohttp's
    # EMPTY_PAYLOAD, one object shared by the whole process, whose readchunk()
    # answers (b"", True) at once and forever after its first EOF (3.14.5), so
    # iter_chunks() never stops and never yields to the loop.
    content = response.content
    empty_before = False
    while True:
        chunk, _ = await content.readchunk()
        if chunk:
            empty_before = False
            for decoded in decoder.feed_parts(chunk):
                await sink.write(decoded)
        elif empty_before or content.at_eof():
            # An empty chunk is an HTTP chunk boundary; a second one in a row
            # made no progress, so it can only be the end.
            break
        else:
            empty_before = True
    tail = decoder.finish()
    if tail:
        await sink.write(tail)
    return decoder.image_type


#: 2xx statuses whose answer never has a body (RFC 9110, 15.3.5 and 15.3.6).
_BODILESS_2XX = frozenset({204, 205})


def _declares_no_body(response: aiohttp.ClientResponse) -> bool:
    """Whether a 2xx answer says, by status or ``Content-Length: 0``, that it has no body."""
    return response.status in _BODILESS_2XX or response.content_length == 0


async def _read_success(response: aiohttp.ClientResponse, sink: Sink, url: str) -> str | None:
    """Stream a 2xx answer into ``sink``; a 2xx other than 200 with no body is refused unread."""
    try:
        if response.status != 200 and _declares_no_body(response):
            # A complete answer that is not the success shape, like a 200 with
            # the wrong JSON: the server would answer the same again.
            raise InvalidResponseError(
                f"HTTP {response.status} with no body from {url}: not a merge result (the API "
                "answers a merge with 200 and the image as image_file)"
            )
        return await _stream_success(response, sink)
    except InvalidResponseError:
        # Close rather than release: the rest of a body the decoder gave up on
        # must never be read as the next answer.  (A complete answer went back
        # to aiohttp's pool at its end, before this; its framing was sound.)
        response.close()
        raise


def _redirect_error(
    status: int, headers: Mapping[str, str], url: str, body: bytes, api_key: str
) -> APIStatusError:
    """A 3xx answer as a non-retryable error naming where the base URL points now (pure).

    The redirect is not followed: a POST turned into a GET (301 to 303) loses
    its body, and following one to another host would send the API key there.
    """
    error = error_from_response(status, headers, body, redact=api_key)
    location = headers.get("Location")
    if not location:
        message = f"the base URL answered HTTP {status} (a redirect) with no Location: check base_url"
    else:
        target = urljoin(url, location)
        parts = urlsplit(target)
        if parts.path.endswith(MERGE_FACE_PATH) and not parts.query and not parts.fragment:
            # The endpoint moved as a whole (http to https, a new host): name its base URL.
            fix = f"use base_url={target[: -len(MERGE_FACE_PATH)]!r}"
        else:
            fix = "use that as base_url if it is the API's new address"
        message = f"the base URL redirects to {target} (not followed); {fix}"
    message = message.replace(api_key, "<redacted>")
    return APIStatusError(
        status=status, reason=error.reason, message=message, metadata=error.metadata,
        request_id=error.request_id, body=error.body,
    )


def _major_minor(version: str) -> tuple[int, int]:
    """``"3.11.18"`` (or ``"3.12.0rc1"``) as ``(3, 11)``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


#: aiohttp before 3.12 fails an absolute URL on a session with a base_url (an
#: AssertionError in ``ClientSession._build_url``); 3.12 lets it override the base.
_ABSOLUTE_URL_OVERRIDES_BASE = _major_minor(aiohttp.__version__) >= (3, 12)


def check_session(session: aiohttp.ClientSession) -> None:
    """Refuse a caller's session whose settings no request of ours can override.

    A session made with ``trust_env=True`` also has its ``.netrc`` read now
    (the only file access here), for :func:`refuse_netrc_credentials`.

    Raises:
        ConfigurationError: the session has an ``auth`` (aiohttp refuses it next
            to our ``Authorization`` header on every request), or a ``base_url``
            on an aiohttp too old to send to our absolute URL through it.
    """
    if session.auth is not None:
        raise ConfigurationError(
            "the aiohttp session given has auth= set, which aiohttp will not combine with the "
            "API key's Authorization header: pass a session without auth (the client sends "
            "the key itself)"
        )
    # No public accessor for it; getattr keeps this safe if aiohttp renames it.
    base_url = getattr(session, "_base_url", None)
    if base_url is not None and not _ABSOLUTE_URL_OVERRIDES_BASE:
        raise ConfigurationError(
            f"the aiohttp session given has base_url={str(base_url)!r}, which aiohttp "
            f"{aiohttp.__version__} cannot combine with the client's own URL (3.12 can): pass a "
            "session without base_url, and the endpoint as NovitaClient(base_url=...)"
        )
    if session.trust_env:
        _NETRC_SEEN[session] = _read_netrc()


# -- .netrc ------------------------------------------------------------------------
#
# A session made with trust_env=True (for the HTTP(S)_PROXY variables, say) also
# takes Basic credentials from the user's .netrc for any host the file has an
# entry for, or every host when it has a "default" entry.  Next to the API key's
# Authorization header, aiohttp 3.14 refuses the request with a bare ValueError;
# aiohttp 3.9 to 3.13 silently send the .netrc password in the key's place, to
# the API, and get an authentication error.  No request option turns the lookup
# off (auth= takes Basic credentials only), so such a session is refused,
# naming the entry.


@dataclass(frozen=True)
class _NetrcEntries:
    """The hosts a ``.netrc`` has credentials for, as aiohttp would find them."""

    path: str
    hosts: frozenset[str]
    default: bool

    def covers(self, host: str) -> bool:
        return host in self.hosts or self.default


#: What check_session read for each trust_env session it let through.
_NETRC_SEEN: weakref.WeakKeyDictionary[aiohttp.ClientSession, _NetrcEntries | None] = (
    weakref.WeakKeyDictionary()
)


def _netrc_path() -> Path | None:
    """The file aiohttp reads: ``$NETRC``, else ``~/.netrc`` (``~/_netrc`` on Windows)."""
    named = os.environ.get("NETRC")
    if named is not None:
        return Path(named)
    try:
        return Path.home() / ("_netrc" if sys.platform == "win32" else ".netrc")
    except RuntimeError:  # no home directory to be found: aiohttp reads nothing either
        return None


def _read_netrc() -> _NetrcEntries | None:
    """The entries of the ``.netrc`` aiohttp would read, or None (no file, or one it cannot parse)."""
    path = _netrc_path()
    if path is None:
        return None
    try:
        parsed = netrc.netrc(os.fspath(path))
    except (OSError, netrc.NetrcParseError):
        return None  # aiohttp logs a warning and sends no credentials
    hosts = frozenset(name for name in parsed.hosts if name != "default")
    return _NetrcEntries(os.fspath(path), hosts, "default" in parsed.hosts)


def _netrc_error(host: str, entries: _NetrcEntries | None) -> ConfigurationError:
    if entries is None:
        found = f"a .netrc file ($NETRC, else ~/.netrc) has credentials for {host!r}"
    elif host in entries.hosts:
        found = f"{entries.path} has an entry for {host!r}"
    else:
        found = f"{entries.path} has a default entry (for every host)"
    return ConfigurationError(
        f"the aiohttp session given has trust_env=True and {found}, whose login aiohttp would "
        "send in place of the API key (it will not send both); nothing was sent: pass a session "
        "made with trust_env=False, or remove that entry, or point the NETRC environment "
        "variable at a file without it"
    )


def refuse_netrc_credentials(session: aiohttp.ClientSession, url: str) -> None:
    """Refuse to send to ``url`` on a session whose ``.netrc`` has credentials for its host (pure).

    Looks up what :func:`check_session` read; a session it never saw is let through.

    Raises:
        ConfigurationError: naming the ``.netrc`` entry and the fixes; nothing was sent.
    """
    if not session.trust_env:
        return  # the common case, on every request: nothing to look up
    entries = _NETRC_SEEN.get(session)
    host = urlsplit(url).hostname or ""
    if entries is not None and entries.covers(host):
        raise _netrc_error(host, entries)


def _other_credentials_error(session: aiohttp.ClientSession, url: str, exc: ValueError) -> ConfigurationError:
    """aiohttp's own refusal of our Authorization header next to credentials it found, explained."""
    if urlsplit(url).username is not None:
        return ConfigurationError(
            "the base URL holds a user name (user:password@), which aiohttp will not send beside "
            "the API key's Authorization header; nothing was sent: give the base URL without it"
        )
    if session.trust_env:
        return _netrc_error(urlsplit(url).hostname or "", None)
    return ConfigurationError(f"aiohttp refused the request before sending it: {exc}")


def _aiohttp_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=timeout.total, sock_connect=timeout.connect, sock_read=timeout.read
    )


async def send_merge_request(
    session: aiohttp.ClientSession,
    url: str,
    api_key: str,
    body: RequestBody,
    sink: Sink,
    timeout: Timeout,
) -> str | None:
    """POST one merge request and stream a success into ``sink``.

    Returns:
        The ``image_type`` the server reported (None if it sent none).

    Raises:
        APIStatusError: an error status (typed by status and reason), or a
            redirect (3xx: not followed; the message names its Location).
        InvalidResponseError: a 2xx whose body is not the success shape (or
            that has none).
        APIConnectionError / APITimeoutError: no complete answer.
        Whatever local error stopped the body stream (never disguised as a
        connection error).
    """
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        # An exact length: aiohttp then sends the generator without chunking.
        "Content-Length": str(body.content_length),
    }
    refuse_netrc_credentials(session, url)
    logger.debug("POST %s (%d bytes)", url, body.content_length)
    try:
        # raise_for_status and auto_decompress override a caller's session: an
        # error status raised by aiohttp would lose its body and pass for a
        # dropped connection (and be retried), and an undecoded gzip body would
        # pass for a malformed one.  (Both are per-request options in aiohttp 3.9.1, our floor.)
        # allow_redirects=False: a redirect is reported (see _redirect_error), never followed.
        async with session.post(
            url, data=body.stream(), headers=headers, timeout=_aiohttp_timeout(timeout),
            raise_for_status=False, auto_decompress=True, allow_redirects=False,
        ) as response:
            logger.debug("HTTP %d from %s", response.status, url)
            if 200 <= response.status < 300:
                return await _read_success(response, sink, url)
            error_body = await read_capped(response.content, ERROR_BODY_CAP)
            if 300 <= response.status < 400:
                raise _redirect_error(response.status, response.headers, url, error_body, api_key)
            raise error_from_response(response.status, response.headers, error_body, redact=api_key)
    except NovitaError:
        raise
    except (asyncio.TimeoutError, TimeoutError) as exc:
        if body.error is not None:
            raise body.error from exc
        raise APITimeoutError(f"no complete answer from {url} within the time limit "
                              f"(total {timeout.total:g} s, read {timeout.read:g} s)") from exc
    except aiohttp.ClientPayloadError as exc:
        if body.error is not None:
            raise body.error from exc
        raise InvalidResponseError(f"the response from {url} was cut short: {exc}",
                                   retryable=True) from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        # A certificate that fails verification fails the same way next time.
        error = APIConnectionError(
            f"TLS certificate verification failed for {url}: {exc.certificate_error}. "
            "Check the base URL, or the system's CA certificates."
        )
        error.retryable = False
        raise error from exc
    except (aiohttp.ClientError, OSError) as exc:
        if body.error is not None:
            # A failure inside our body generator reaches us as a connection
            # error; it is local and must not be retried.
            raise body.error from exc
        raise APIConnectionError(f"connection to {url} failed: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        # Last: TLS certificate errors are ValueErrors too (ssl.CertificateError).
        # aiohttp (3.14) refuses, before sending anything, a request whose
        # Authorization header meets credentials of its own finding: a .netrc
        # entry that appeared after check_session, or a user:password in the URL.
        if "AUTHORIZATION" not in str(exc).upper():
            raise
        raise _other_credentials_error(session, url, exc) from exc
