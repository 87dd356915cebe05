"""One DEBUG line per request the emulator answers (``novita-async -vv serve``).

The line has the method, the path, the status (or what became of the
connection), the fault injected if any, and the time taken: never a header
(the API key is one) nor a byte of the body.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["log_requests", "note_fault"]

logger = logging.getLogger("novita_async.emulator")


@dataclass
class _Note:
    """What the handler tells the log line about its request."""

    fault: str | None = None


# A context variable, not ``request[...]``: aiohttp before 3.13 has no typed
# request keys, and from 3.14 a str key warns (an error under the tests).
# The middleware and the handler run in the same task, so they share it.
_NOTE: contextvars.ContextVar[_Note | None] = contextvars.ContextVar("novita_emulator_note", default=None)


def note_fault(kind: str) -> None:
    """Record that this request is answered with fault ``kind``, for its log line."""
    note = _NOTE.get()
    if note is not None:
        note.fault = kind


def _outcome(request: web.Request, response: web.StreamResponse | None) -> str:
    """The status sent, or what happened instead."""
    if request.transport is None or request.transport.is_closing():
        # ``drop`` and ``truncate`` close the connection; a status was not (all) sent.
        return "connection closed" if response is None else f"{response.status}, connection closed"
    return "no answer" if response is None else str(response.status)


@web.middleware
async def log_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """Log one line per request at DEBUG; costs nothing when DEBUG is off."""
    if not logger.isEnabledFor(logging.DEBUG):
        answer: web.StreamResponse = await handler(request)
        return answer
    started = time.perf_counter()
    note = _Note()
    token = _NOTE.set(note)
    response: web.StreamResponse | None = None
    failure: str | None = None
    try:
        response = await handler(request)
        return response
    except asyncio.CancelledError:
        failure = "cancelled: the client went away"  # handler_cancellation
        raise
    except Exception as exc:
        failure = f"error {type(exc).__name__}"  # aiohttp answers 500 and logs the traceback
        raise
    finally:
        _NOTE.reset(token)
        fault = f" fault={note.fault}" if note.fault else ""
        logger.debug("%s %s -> %s%s in %.3f s", request.method, request.path,
                     failure or _outcome(request, response), fault, time.perf_counter() - started)
