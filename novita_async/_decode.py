"""Incremental decoder of the Merge Face success body.

The success answer is ``{"image_file": "<base64>", "image_type": "png"}`` where
the base64 string can be tens of MB.  :class:`SuccessBodyDecoder` takes the body
in pieces of any size and hands back the decoded image bytes as they arrive, so
the client can stream them to a file while holding O(chunk) memory.

Two speeds:

* Inside the ``image_file`` string (almost all of the body) the work is bulk
  operations on the whole chunk: ``bytes.find`` for the closing quote and for
  escapes, a regex check and a one-byte delete for the escapes real encoders
  emit (``\\/`` and line-wrapping ``\\n``), and one SIMD base64 decode of all
  the whole quanta.
* Everything else (braces, keys, ``image_type``, any other member) goes through
  a small per-byte state machine, bounded by ``max_other_bytes``.
"""

from __future__ import annotations

import json
import re
from typing import NoReturn

from novita_async import _b64
from novita_async._errors import InvalidResponseError

__all__ = ["SuccessBodyDecoder"]

_IMAGE_KEY = "image_file"
_TYPE_KEY = "image_type"

# Parser states.  The object is complete only in _DONE.
_BEGIN = 0  # before "{"
_FIRST_KEY = 1  # after "{": a key or "}"
_NEXT_KEY = 2  # after ",": a key
_KEY = 3  # inside a key string
_COLON = 4  # after a key
_VALUE = 5  # after ":"
_IMAGE = 6  # inside the image_file string
_OTHER = 7  # inside another member's value
_AFTER_VALUE = 8  # after a value: "," or "}"
_DONE = 9  # after the closing "}": only whitespace may follow

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
# Runs the per-byte scanner may skip wholesale: string contents without quote
# or backslash, and container contents without quote or bracket.
_PLAIN_IN_STRING = re.compile(rb'[^"\\]+')
_PLAIN_IN_CONTAINER = re.compile(rb'[^"{}\[\]]+')
# Escapes inside the image string: any escape but \/; any escape that is
# neither \/ nor line wrapping; line wrapping; and one exact JSON escape.
_NOT_SLASH_ESCAPE = re.compile(rb"\\[^/]")
_ODD_ESCAPE = re.compile(rb"\\[^/nrt]")
_WRAP_ESCAPE = re.compile(rb"\\[nrt]")
_ESCAPE = re.compile(rb"\\(?:u([0-9A-Fa-f]{4})|(.))", re.DOTALL)

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPENERS, _CLOSERS = frozenset(b"{["), frozenset(b"}]")
_SCALAR_START = frozenset(b"-0123456789tfn")
_SCALAR_END = frozenset(b" \t\r\n,}]")
# The standard alphabet and padding: what a \uXXXX escape may stand for.
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
# Characters of base64 wrapped into lines; they carry no data.
_WRAP_CHARS = frozenset(b"\n\r\t")


def _reject_constant(name: str) -> NoReturn:
    """json.loads hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _unescape_char(match: re.Match[bytes]) -> bytes:
    """re.sub hook: one escape in the image string to the base64 char it means."""
    hex_digits, char = match.groups()
    code = int(hex_digits, 16) if hex_digits is not None else None
    if char is not None:
        if char == b"/":
            return b"/"
        if char in b"nrt":
            return b""
        raise ValueError(f"escape \\{char.decode('latin-1')} is not base64")
    assert code is not None
    if code in _WRAP_CHARS:
        return b""
    if code in _B64_ALPHABET:
        return bytes((code,))
    raise ValueError(f"escape \\u{code:04x} is not base64")


def _unescape(span: bytes) -> bytes:
    """Resolve the JSON escapes of a piece of the image string (bulk when possible).

    Raises ValueError for an escape that cannot be part of base64.
    """
    if span.endswith(b"\\"):  # it escaped the quote after it, or a backslash
        raise ValueError('escape \\" or \\\\ is not base64')
    # Regex searches and deleting one byte value run at GB/s; replace() of a
    # two-byte sequence and a Python call per escape do not.  So check first
    # that every escape is one the bulk passes handle: then each backslash
    # starts a two-byte escape (an escaped backslash fails the check), and
    # deleting the backslashes is exact.
    first = _NOT_SLASH_ESCAPE.search(span)
    if first is None:  # the common case: only \/ (encoders that escape slashes)
        return span.replace(b"\\", b"")
    if _ODD_ESCAPE.search(span, first.start()) is None:  # \/ plus line wrapping
        span = _WRAP_ESCAPE.sub(b"", span)
        return span.replace(b"\\", b"") if b"\\" in span else span
    # Rare: \uXXXX or an invalid escape; tokenize exactly.
    return _ESCAPE.sub(_unescape_char, span)


def _skip_whitespace(data: bytes, i: int) -> int:
    """Index of the first non-whitespace byte of data at or after i."""
    run = _WHITESPACE.match(data, i)
    return run.end() if run is not None else i


def _escape_length(pending: bytes) -> int:
    """Full length of the escape that starts ``pending`` (6 for \\uXXXX, else 2)."""
    return 6 if pending[1:2] == b"u" else 2


class SuccessBodyDecoder:
    """Parse the success body incrementally, base64-decoding `image_file` as it streams.

    Feed the body with :meth:`feed` in pieces of any size, then call
    :meth:`finish`.  The bytes returned by all the calls, concatenated, are the
    decoded image.  Memory is bounded by the chunk size plus
    ``max_other_bytes``, never by the size of the body.

    Errors are :class:`~novita_async.InvalidResponseError`: ``retryable=True``
    only for a body that ended before its JSON object did (cut short in
    transit); every other malformation is permanent.  Once an error is raised,
    every later call raises it again.
    """

    def __init__(self, *, max_other_bytes: int = 64 * 1024) -> None:
        """Create a decoder; members besides image_file may total max_other_bytes."""
        self._max_other = max_other_bytes
        self._decode = _b64.b64decode_strict  # looked up once; tests may swap the codec
        self._state = _BEGIN
        self._offset = 0  # body bytes consumed before the current chunk
        self._error: InvalidResponseError | None = None
        self._finished = False
        # Object level.
        self._key = ""
        self._members: dict[str, object] = {}
        self._image_type: str | None = None
        self._seen_image = False
        self._other_size = 0  # bytes of keys and values captured so far
        # The value (or key) being captured, and the scanner's state in it.
        self._parts: list[bytes] = []
        self._in_string = False
        self._escaped = False
        self._depth = 0
        self._scalar = False
        # Image string: an escape split across chunks, fewer than 4 base64
        # chars waiting for the rest of their quantum, how many chars went
        # through, and whether padding ("=") was seen.
        self._pending_escape = b""
        self._quantum = b""
        self._chars = 0
        self._padded = False
        self._decoded = 0

    # -- public interface -------------------------------------------------

    @property
    def image_type(self) -> str | None:
        """The `image_type` member if present (a string), else None."""
        return self._image_type

    @property
    def members(self) -> dict[str, object]:
        """Other top-level members, parsed (everything but image_file, incl. image_type)."""
        return dict(self._members)

    @property
    def decoded_bytes(self) -> int:
        """How many image bytes have been returned so far."""
        return self._decoded

    def feed(self, chunk: bytes) -> bytes:
        """Consume the next piece of the body; return the image bytes decoded from it.

        Returns b"" when the piece completed no base64 quantum.  Raises
        InvalidResponseError(retryable=False) as soon as the body is malformed.
        """
        out = self.feed_parts(chunk)
        return out[0] if len(out) == 1 else b"".join(out)

    def feed_parts(self, chunk: bytes) -> list[bytes]:
        """Like :meth:`feed`, but the image bytes as a list of consecutive pieces.

        Saves the copy that joining them costs: a chunk that does not start on
        a base64 quantum boundary decodes as a 3-byte piece (the quantum split
        across chunks) and the rest.  The list is empty when the chunk
        completed no quantum.
        """
        if self._error is not None:
            raise self._error
        if self._finished:
            raise RuntimeError("feed() called after finish()")
        data = bytes(chunk)
        out: list[bytes] = []
        try:
            self._consume(data, out)
        except InvalidResponseError as error:
            self._error = error
            raise
        self._offset += len(data)
        for piece in out:
            self._decoded += len(piece)
        return out

    def finish(self) -> bytes:
        """Call at end of body; return the last decoded bytes.

        Raises InvalidResponseError(retryable=True) if the body ended before the
        JSON object was complete, retryable=False if the object is complete but
        has no image_file.  (An empty image_file or one with a bad length or
        padding is already reported by feed() when its closing quote arrives.)
        """
        if self._error is not None:
            raise self._error
        self._finished = True
        if self._state != _DONE:
            self._error = InvalidResponseError(
                f"success body ended after {self._offset} bytes, before its JSON object was"
                " complete (cut short in transit?)",
                retryable=True,
            )
            raise self._error
        if not self._seen_image:
            keys = ", ".join(sorted(self._members)) or "none"
            self._error = InvalidResponseError(
                f"success body has no image_file member (members: {keys})"
            )
            raise self._error
        # Every quantum was decoded when the closing quote of image_file arrived.
        return b""

    # -- structure ----------------------------------------------------------

    def _fail(self, data: bytes, pos: int, what: str) -> NoReturn:
        """Raise the permanent error for a malformation at data[pos]."""
        snippet = data[pos : pos + 40]
        raise InvalidResponseError(
            f"malformed success body at byte {self._offset + pos}: {what} (near {snippet!r})"
        )

    def _consume(self, data: bytes, out: list[bytes]) -> None:
        """Run the state machine over one chunk, appending decoded image bytes to out."""
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == _IMAGE:
                i = self._image(data, i, out)
            elif state in (_KEY, _OTHER):
                i = self._capture(data, i)
            else:
                i = _skip_whitespace(data, i)
                if i < n:
                    i += self._token(data, i)

    def _token(self, data: bytes, i: int) -> int:
        """Handle the structural byte data[i] (not whitespace); return bytes consumed."""
        c, state = data[i], self._state
        if state == _BEGIN:
            if c != ord("{"):
                hint = " (an HTML page?)" if c == ord("<") else ""
                self._fail(data, i, f"not a JSON object{hint}")
            self._state = _FIRST_KEY
        elif state in (_FIRST_KEY, _NEXT_KEY):
            if c == ord("}") and state == _FIRST_KEY:
                self._state = _DONE
            elif c == _QUOTE:
                self._begin_capture(data, i, _KEY, in_string=True)
            else:
                self._fail(data, i, "expected a member name")
        elif state == _COLON:
            if c != ord(":"):
                self._fail(data, i, "expected ':'")
            self._state = _VALUE
        elif state == _VALUE:
            return self._value_start(data, i)
        elif state == _AFTER_VALUE:
            if c == ord(","):
                self._state = _NEXT_KEY
            elif c == ord("}"):
                self._state = _DONE
            else:
                self._fail(data, i, "expected ',' or '}'")
        else:  # _DONE
            self._fail(data, i, "data after the end of the JSON object")
        return 1

    def _value_start(self, data: bytes, i: int) -> int:
        """Start the value at data[i]; return bytes consumed (0 or 1)."""
        c = data[i]
        if self._key == _IMAGE_KEY:
            if c != _QUOTE:
                self._fail(data, i, "image_file is not a string")
            self._state = _IMAGE
        elif c == _QUOTE:
            self._begin_capture(data, i, _OTHER, in_string=True)
        elif c in _OPENERS:
            self._begin_capture(data, i, _OTHER, depth=1)
        elif c in _SCALAR_START:
            # A scalar has no closing delimiter: the scanner itself takes its
            # first byte and stops before ",", "}" or whitespace.
            self._begin_capture(data, i, _OTHER, scalar=True)
            return 0
        else:
            self._fail(data, i, f"a value cannot start with {bytes((c,))!r}")
        return 1

    # -- keys and other values: the per-byte scanner --------------------------

    def _begin_capture(
        self,
        data: bytes,
        i: int,
        state: int,
        *,
        in_string: bool = False,
        depth: int = 0,
        scalar: bool = False,
    ) -> None:
        """Begin capturing the key or value that starts at data[i]."""
        first = b"" if scalar else data[i : i + 1]
        self._count_other(len(first), data, i)
        self._parts = [first]
        self._in_string, self._escaped = in_string, False
        self._depth, self._scalar = depth, scalar
        self._state = state

    def _count_other(self, size: int, data: bytes, i: int) -> None:
        """Charge size captured bytes against max_other_bytes."""
        self._other_size += size
        if self._other_size > self._max_other:
            self._fail(data, i, f"members other than image_file exceed {self._max_other} bytes")

    def _capture(self, data: bytes, start: int) -> int:
        """Scan the key or value being captured from data[start]; return where it stopped."""
        end, complete = self._scan(data, start)
        self._count_other(end - start, data, start)
        self._parts.append(data[start:end])
        if complete:
            self._complete_capture(data, end)
        return end

    def _scan(self, data: bytes, i: int) -> tuple[int, bool]:
        """Advance the string/escape/depth scanner; return (stop index, value complete)."""
        n = len(data)
        in_string, escaped, depth = self._in_string, self._escaped, self._depth
        try:
            while i < n:
                if in_string and not escaped:
                    # Skip the plain run of a string at C speed.
                    run = _PLAIN_IN_STRING.match(data, i)
                    if run is not None:
                        i = run.end()
                        continue
                c = data[i]
                if in_string:
                    if escaped:
                        escaped = False
                    elif c == _BACKSLASH:
                        escaped = True
                    elif c == _QUOTE:
                        in_string = False
                        if depth == 0:
                            return i + 1, True
                elif self._scalar:
                    if c in _SCALAR_END:
                        return i, True
                elif c == _QUOTE:
                    in_string = True
                elif c in _OPENERS:
                    depth += 1
                elif c in _CLOSERS:
                    depth -= 1
                    if depth == 0:
                        return i + 1, True
                else:
                    run = _PLAIN_IN_CONTAINER.match(data, i)
                    if run is not None:
                        i = run.end()
                        continue
                i += 1
            return n, False
        finally:
            self._in_string, self._escaped, self._depth = in_string, escaped, depth

    def _complete_capture(self, data: bytes, end: int) -> None:
        """Parse the captured key or value and move to the next state."""
        raw = b"".join(self._parts)
        self._parts = []
        try:
            value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
            what = "member name" if self._state == _KEY else f"value of {self._key!r}"
            self._fail(data, max(0, end - 1), f"invalid JSON {what}")
        if self._state == _KEY:
            assert isinstance(value, str)  # a quoted JSON text is a string
            if value == _IMAGE_KEY and self._seen_image:
                self._fail(data, max(0, end - 1), "duplicate image_file member")
            self._seen_image = self._seen_image or value == _IMAGE_KEY
            self._key = value
            self._state = _COLON
            return
        self._members[self._key] = value
        if self._key == _TYPE_KEY:
            # Duplicates: the last one wins, as with json.loads.
            self._image_type = value if isinstance(value, str) else None
        self._state = _AFTER_VALUE

    # -- the image string: bulk path -----------------------------------------

    def _image(self, data: bytes, i: int, out: list[bytes]) -> int:
        """Consume image_file characters from data[i]; return where the string stopped."""
        try:
            if self._pending_escape:
                i = self._finish_escape(data, i, out)
                if self._pending_escape:
                    return i
            # A '"' can only be the closing quote: an escaped one (\") is not
            # base64 either, and is rejected by _unescape() with the span.
            quote = data.find(b'"', i)
            end = len(data) if quote < 0 else quote
            if quote < 0:
                end = self._hold_split_escape(data, i, end)
            if data.find(b"\\", i, end) >= 0:
                self._push(_unescape(data[i:end]), out)
            elif end > i:
                self._push(data[i:end] if i or end < len(data) else data, out)
            if quote < 0:
                return len(data)
            self._close_image(data, quote)
            return quote + 1
        except ValueError as error:  # binascii.Error is a ValueError
            self._fail(data, i, f"invalid base64 in image_file: {error}")

    def _hold_split_escape(self, data: bytes, i: int, end: int) -> int:
        """Set aside an escape cut by the chunk's end; return the new end of the span."""
        cut = data.rfind(b"\\", max(i, end - 5), end)
        if cut >= 0 and end - cut < _escape_length(data[cut:end]):
            self._pending_escape = data[cut:end]
            return cut
        return end

    def _finish_escape(self, data: bytes, i: int, out: list[bytes]) -> int:
        """Complete an escape split across chunks with bytes from data[i]."""
        pending = self._pending_escape
        if len(pending) == 1:  # just "\": its next byte says how long it is
            pending += data[i : i + 1]
            i += 1
        take = _escape_length(pending) - len(pending)
        pending += data[i : i + take]
        i += min(take, len(data) - i)
        self._pending_escape = pending
        if len(pending) == _escape_length(pending):
            self._pending_escape = b""
            self._push(_unescape(pending), out)
        return i

    def _push(self, chars: bytes, out: list[bytes]) -> None:
        """Add unescaped base64 characters; decode every complete quantum.

        Without copying ``chars`` (a whole network chunk): the quantum left
        unfinished by the previous piece is completed from its first
        characters and decoded on its own, and the whole quanta after that are
        decoded through a memoryview.
        """
        if not chars:
            return
        if self._padded or b"=" in chars:
            self._check_padding(chars)
        self._chars += len(chars)
        start = 0
        if self._quantum:
            start = 4 - len(self._quantum)
            if len(chars) < start:
                self._quantum += chars
                return
            out.append(self._decode(self._quantum + chars[:start]))
        whole = start + ((len(chars) - start) & ~3)
        self._quantum = chars[whole:]
        if whole > start:
            out.append(self._decode(
                chars if start == 0 and whole == len(chars) else memoryview(chars)[start:whole]
            ))

    def _check_padding(self, chars: bytes) -> None:
        """Allow '=' only at the end of the string (the codec checks how many)."""
        first = 0 if self._padded else chars.index(b"=")
        if chars.count(b"=", first) != len(chars) - first:
            raise ValueError("data after '=' padding")
        self._padded = True

    def _close_image(self, data: bytes, quote: int) -> None:
        """Check the whole image string at its closing quote."""
        if self._chars == 0:
            self._fail(data, quote, "image_file is empty")
        if self._quantum:
            self._fail(
                data, quote, f"image_file has {self._chars} base64 characters, not a multiple of 4"
            )
        self._state = _AFTER_VALUE
