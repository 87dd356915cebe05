"""The one place that picks the base64 codec.

Base64 is the client's hot path (uploads are encoded, results are decoded, tens
of MB each), so use pybase64's SIMD codec when it can be imported and fall back
to the stdlib otherwise.  Both decoders are strict: any character outside the
standard alphabet, misplaced padding or a length that is not a multiple of 4
raises instead of being skipped.
"""

from __future__ import annotations

import base64
import binascii
import sys
from collections.abc import Callable

__all__ = ["CODEC", "b64decode_strict", "b64encode"]

_Buffer = bytes | bytearray | memoryview


def _stdlib_b64encode(data: _Buffer) -> bytes:
    """Standard base64 without a trailing newline (the stdlib's fastest path)."""
    return binascii.b2a_base64(data, newline=False)


if sys.version_info >= (3, 11):

    def _stdlib_b64decode_strict(data: _Buffer) -> bytes:
        """Strictly decode standard base64 (raises binascii.Error)."""
        return binascii.a2b_base64(data, strict_mode=True)

else:  # pragma: no cover - exercised only on 3.10

    def _stdlib_b64decode_strict(data: _Buffer) -> bytes:
        """Strictly decode standard base64 (raises binascii.Error)."""
        # validate=True rejects foreign characters but tolerates padding in
        # the middle ("QQ==QUJD"), so reject that here: '=' may only end it.
        raw = bytes(data)
        pad = raw.find(b"=")
        if (pad >= 0 and raw[pad:].strip(b"=")) or len(raw) % 4:
            raise binascii.Error("Incorrect padding")
        return base64.b64decode(raw, validate=True)


def _select() -> tuple[str, Callable[[_Buffer], bytes], Callable[[_Buffer], bytes]]:
    """Return (name, encoder, strict decoder) of the fastest codec available."""
    try:
        import pybase64
    except ImportError:  # pragma: no cover - pybase64 is a declared dependency
        return "stdlib", _stdlib_b64encode, _stdlib_b64decode_strict

    def encode(data: _Buffer) -> bytes:
        return pybase64.b64encode(data)

    def decode_strict(data: _Buffer) -> bytes:
        # validate=True rejects foreign characters, bad padding and lengths
        # that are not a multiple of 4 (binascii.Error, a ValueError).
        return pybase64.b64decode(data, validate=True)

    encode.__doc__ = _stdlib_b64encode.__doc__
    decode_strict.__doc__ = _stdlib_b64decode_strict.__doc__
    return "pybase64", encode, decode_strict


#: Which codec is in use: ``"pybase64"`` or ``"stdlib"``.
CODEC: str
#: Encode bytes to standard base64 (no newlines).
b64encode: Callable[[_Buffer], bytes]
#: Decode standard base64 strictly; raises ``binascii.Error`` (a ``ValueError``).
b64decode_strict: Callable[[_Buffer], bytes]

CODEC, b64encode, b64decode_strict = _select()
