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
when the client is built (:func:`check_session`).
"""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp

from novita_async._config import ERROR_BODY_CAP, Timeout
from novita_async._decode import SuccessBodyDecoder
from novita_async._encode import RequestBody
from novita_async._errors import (
    APIConnectionError,
    APITimeoutError,
    ConfigurationError,
    InvalidResponseError,
    NovitaError,
    error_from_response,
)
from novita_async._output import Sink

__all__ = ["check_session", "read_capped", "send_merge_request"]

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
    decoder = SuccessBodyDecoder()
    # One buffered network chunk at a time: readany() would join the chunks
    # waiting in the buffer into a new bytes object, a copy of the body.
    async for chunk, _ in response.content.iter_chunks():
        for decoded in decoder.feed_parts(chunk):
            await sink.write(decoded)
    tail = decoder.finish()
    if tail:
        await sink.write(tail)
    return decoder.image_type


def _major_minor(version: str) -> tuple[int, int]:
    """``"3.11.18"`` (or ``"3.12.0rc1"``) as ``(3, 11)``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


#: aiohttp before 3.12 fails an absolute URL on a session with a base_url (an
#: AssertionError in ``ClientSession._build_url``); 3.12 lets it override the base.
_ABSOLUTE_URL_OVERRIDES_BASE = _major_minor(aiohttp.__version__) >= (3, 12)


def check_session(session: aiohttp.ClientSession) -> None:
    """Refuse a caller's session whose settings no request of ours can override (pure).

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
        APIStatusError: an error status (typed by status and reason).
        InvalidResponseError: a 2xx whose body is not the success shape.
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
    logger.debug("POST %s (%d bytes)", url, body.content_length)
    try:
        # raise_for_status and auto_decompress override a caller's session: an
        # error status raised by aiohttp would lose its body and pass for a
        # dropped connection (and be retried), and an undecoded gzip body would
        # pass for a malformed one.  (Both are per-request options in aiohttp 3.9.1, our floor.)
        async with session.post(
            url, data=body.stream(), headers=headers, timeout=_aiohttp_timeout(timeout),
            raise_for_status=False, auto_decompress=True,
        ) as response:
            logger.debug("HTTP %d from %s", response.status, url)
            if 200 <= response.status < 300:
                return await _stream_success(response, sink)
            error_body = await read_capped(response.content, ERROR_BODY_CAP)
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
