"""SuccessBodyDecoder: the incremental parser of ``{"image_file": <base64>, ...}``."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import tracemalloc
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novita_async import _b64
from novita_async._decode import SuccessBodyDecoder
from novita_async._errors import InvalidResponseError

from .conftest import split

# -- helpers -------------------------------------------------------------------


@pytest.fixture(params=["default", "stdlib"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the codec _b64 picked (pybase64) and with the stdlib fallback."""
    if request.param == "stdlib":
        monkeypatch.setattr(_b64, "b64decode_strict", _b64._stdlib_b64decode_strict)
    return str(request.param)


def decode(
    body: bytes, sizes: Iterable[int] = (65536,), **kwargs: int
) -> tuple[bytes, SuccessBodyDecoder]:
    """Feed body in chunks, finish, and return (all decoded bytes, decoder)."""
    decoder = SuccessBodyDecoder(**kwargs)
    parts = [decoder.feed(chunk) for chunk in split(body, sizes)]
    parts.append(decoder.finish())
    return b"".join(parts), decoder


def expected(body: bytes) -> tuple[bytes, str | None, dict[str, object]]:
    """The reference answer: json.loads + base64.b64decode of the whole body."""
    parsed = json.loads(body)
    image_type = parsed.get("image_type")
    members = {k: v for k, v in parsed.items() if k != "image_file"}
    return (
        base64.b64decode(parsed["image_file"]),
        image_type if isinstance(image_type, str) else None,
        members,
    )


def assert_matches_reference(body: bytes, sizes: Iterable[int]) -> None:
    """Decoding body in the given chunking gives exactly the reference answer."""
    image, image_type, members = expected(body)
    got, decoder = decode(body, sizes)
    assert got == image
    assert decoder.decoded_bytes == len(image)
    assert decoder.image_type == image_type
    assert decoder.members == members


def image_literal(
    data: bytes,
    *,
    wrap: str = "",
    line: int = 76,
    escape_slashes: bool = False,
    unicode_escapes: bool = False,
) -> str:
    """The JSON string literal of data's base64, written the ways real encoders do."""
    text = base64.b64encode(data).decode()
    if wrap:  # MIME-style lines; json.dumps turns the breaks into \n / \r\n escapes
        text = wrap.join(text[i : i + line] for i in range(0, len(text), line))
    literal = json.dumps(text)
    if unicode_escapes:  # escapes no encoder needs but JSON allows
        for char, escape in [("A", "\\u0041"), ("=", "\\u003d"), ("+", "\\u002B")]:
            literal = literal.replace(char, escape)
        literal = literal.replace("\\n", "\\u000a")  # a line break, as \u escape
    if escape_slashes:  # PHP, some Java encoders
        literal = literal.replace("/", "\\/")
    return literal


def build_body(members: list[tuple[str, str]], ws: list[str], *, compact: bool = False) -> bytes:
    """A JSON object from (key literal, value literal) pairs, with ws cycled between tokens."""
    spaces = itertools.cycle(ws or [""])
    colon = ":" if compact else ": "
    comma = "," if compact else ", "
    parts = ["{", next(spaces)]
    for n, (key, value) in enumerate(members):
        if n:
            parts += [next(spaces), comma, next(spaces)]
        parts += [key, next(spaces), colon, next(spaces), value]
    parts += [next(spaces), "}"]
    return "".join(parts).encode()


def _big_image(size: int, seed: int = 7) -> bytes:
    """size reproducible random bytes."""
    return random.Random(seed).randbytes(size)


# -- strategies ----------------------------------------------------------------

# Strings that look like the structure the decoder must not be fooled by.
_TRICKY_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(['"image_file"', "}", '\\"', "{", "]", "\\", '"image_file": "QUJD"}', "é€😀"]),
)
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TRICKY_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_TRICKY_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)
_EXTRA_KEYS = _TRICKY_TEXT.filter(lambda k: k not in ("image_file", "image_type"))
_WHITESPACE = st.lists(st.text(alphabet=" \t\r\n", max_size=3), max_size=6)


@st.composite
def valid_bodies(draw: st.DrawFn, max_image: int = 3000) -> bytes:
    """A valid success body, written in one of the many ways JSON allows."""
    # Mostly a few bytes (where the edge cases are), sometimes enough for
    # many wrapped lines and chunk boundaries.
    image = draw(
        st.binary(min_size=1, max_size=64)
        | st.builds(_big_image, st.integers(65, max_image), st.integers(0, 2**32))
    )
    ascii_only = draw(st.booleans())
    literal = image_literal(
        image,
        wrap=draw(st.sampled_from(["", "\n", "\r\n"])),
        line=draw(st.sampled_from([5, 64, 76])),
        escape_slashes=draw(st.booleans()),
        unicode_escapes=draw(st.booleans()),
    )
    image_key = draw(st.sampled_from(['"image_file"', '"image\\u005ffile"', '"\\u0069mage_file"']))
    members = [(image_key, literal)]
    image_type = draw(st.none() | st.sampled_from(["png", "jpeg", "webp"]) | _JSON_VALUES)
    if image_type is not None:
        members.append(('"image_type"', json.dumps(image_type)))
    for key, value in draw(st.lists(st.tuples(_EXTRA_KEYS, _JSON_VALUES), max_size=3)):
        members.append(
            (json.dumps(key, ensure_ascii=ascii_only), json.dumps(value, ensure_ascii=ascii_only))
        )
    members = draw(st.permutations(members))
    return build_body(members, draw(_WHITESPACE), compact=draw(st.booleans()))


_CHUNK_SIZES = st.lists(st.integers(min_value=1, max_value=4096), min_size=1, max_size=8) | st.just(
    [1]
)


# -- equivalence with json.loads + base64.b64decode ------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=valid_bodies(), sizes=_CHUNK_SIZES)
def test_any_valid_body_any_split_matches_reference(body: bytes, sizes: list[int]) -> None:
    """Every valid body, cut anywhere, decodes to json.loads + b64decode."""
    assert_matches_reference(body, sizes)


@settings(max_examples=60, deadline=None)
@given(image=st.binary(min_size=1, max_size=3), sizes=_CHUNK_SIZES)
def test_tiny_images_match_reference(image: bytes, sizes: list[int]) -> None:
    """Images of 1 to 3 bytes (one padded quantum) decode exactly."""
    body = json.dumps({"image_file": base64.b64encode(image).decode(), "image_type": "png"})
    assert_matches_reference(body.encode(), sizes)


_BIG = _big_image(300_000)
_BIG_LITERAL = json.dumps(base64.b64encode(_BIG).decode())


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            json.dumps({"image_file": base64.b64encode(_BIG).decode(), "image_type": "png"}),
            id="dumps",
        ),
        pytest.param(
            json.dumps(
                {"image_type": "png", "image_file": base64.b64encode(_BIG).decode()},
                separators=(",", ":"),
            ),
            id="compact-type-first",
        ),
        pytest.param(
            '{"image_file":' + _BIG_LITERAL.replace("/", "\\/") + "}", id="escaped-slashes"
        ),
        pytest.param(
            '{\n  "image_file" : '
            + image_literal(_BIG, wrap="\r\n", escape_slashes=True)
            + ' ,\n "image_type":"png"\n}\n',
            id="wrapped-pretty",
        ),
        pytest.param(
            '{"meta": {"note": "}\\"image_file\\": \\"x\\"", "list": [1, {"a": "]"}]},'
            ' "image_file": ' + _BIG_LITERAL + ', "seed": -12.5e3, "nsfw": false, "task": null}',
            id="extra-members",
        ),
    ],
)
@pytest.mark.parametrize(
    "size", [pytest.param(s, id=f"chunk{s}") for s in (61, 4093, 65536, 1 << 20)]
)
def test_large_bodies_match_reference(codec: str, body: str, size: int) -> None:
    """A few-hundred-KB image decodes exactly in any chunking, with either codec."""
    assert_matches_reference(body.encode(), [size])


@pytest.mark.parametrize("sizes", [(1,), (5,), (7, 3), (65537,), (4096, 1, 2, 3)])
def test_feed_parts_are_the_pieces_of_feed(codec: str, sizes: tuple[int, ...]) -> None:
    """feed_parts() gives the same bytes as feed(), in pieces, with no empty ones."""
    image = bytes(range(256)) * 300
    body = json.dumps({"image_file": base64.b64encode(image).decode(), "image_type": "png"}).encode()
    decoder = SuccessBodyDecoder()
    pieces = [piece for chunk in split(body, sizes) for piece in decoder.feed_parts(chunk)]
    decoder.finish()
    assert all(pieces) and b"".join(pieces) == image == decode(body, sizes)[0]
    assert decoder.decoded_bytes == len(image)


def test_one_byte_chunks_of_a_large_image() -> None:
    """Feeding 1 byte at a time (every boundary at once) still decodes exactly."""
    image = _big_image(30_000, seed=3)
    assert_matches_reference(
        ('{"image_file": ' + image_literal(image, wrap="\n", escape_slashes=True) + "}").encode(),
        [1],
    )


def test_output_streams_before_the_body_ends() -> None:
    """Decoded bytes come out with each chunk, not all at finish()."""
    body = json.dumps({"image_file": base64.b64encode(_BIG).decode()}).encode()
    decoder = SuccessBodyDecoder()
    first_half = decoder.feed(body[: len(body) // 2])
    assert len(first_half) > len(_BIG) // 2 - 16
    assert _BIG.startswith(first_half)
    assert first_half + decoder.feed(body[len(body) // 2 :]) + decoder.finish() == _BIG


def test_members_and_image_type() -> None:
    """members holds every member but image_file, parsed; image_type is the string."""
    body = b'{"image_type": "jpeg", "image_file": "QUJD", "seed": 7, "tags": ["a", {"b": null}]}'
    got, decoder = decode(body)
    assert got == b"ABC"
    assert decoder.image_type == "jpeg"
    assert decoder.members == {"image_type": "jpeg", "seed": 7, "tags": ["a", {"b": None}]}
    assert decoder.decoded_bytes == 3


@pytest.mark.parametrize(
    ("member", "expected_type"),
    [
        pytest.param("", None, id="absent"),
        pytest.param(', "image_type": 5', None, id="number"),
        pytest.param(', "image_type": null', None, id="null"),
        pytest.param(', "image_type": "png", "image_type": "gif"', "gif", id="duplicate-last-wins"),
        pytest.param(', "image_\\u0074ype": "webp"', "webp", id="escaped-key"),
    ],
)
def test_image_type_only_when_a_string(member: str, expected_type: str | None) -> None:
    """image_type is None unless the member is a string (the last one, as json.loads)."""
    _, decoder = decode(b'{"image_file": "QUJD"' + member.encode() + b"}", [1])
    assert decoder.image_type == expected_type


def test_escaped_key_names_the_image() -> None:
    """Keys are decoded: "image\\u005ffile" is image_file."""
    got, _ = decode(b'{"image\\u005ffile": "QUJD"}', [2])
    assert got == b"ABC"


def test_empty_chunks_are_harmless() -> None:
    """feed(b"") anywhere changes nothing."""
    decoder = SuccessBodyDecoder()
    parts = []
    for chunk in split(b'{"image_file": "QUJDRA=="}', [3]):
        parts += [decoder.feed(b""), decoder.feed(chunk)]
    assert b"".join(parts) + decoder.finish() == b"ABCD"


# -- malformed bodies --------------------------------------------------------------

_MALFORMED = [
    pytest.param(
        b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "HTML", id="html-page"
    ),
    pytest.param(b"", "ended", id="empty"),  # nothing arrived: treated as cut short
    pytest.param(b'[{"image_file": "QUJD"}]', "not a JSON object", id="array"),
    pytest.param(b'"QUJD"', "not a JSON object", id="top-level-string"),
    pytest.param(b"{}", "no image_file", id="empty-object"),
    pytest.param(b'{"image_type": "png"}', "no image_file", id="missing-image-file"),
    pytest.param(b'{"image_file": 12}', "not a string", id="image-file-number"),
    pytest.param(b'{"image_file": null}', "not a string", id="image-file-null"),
    pytest.param(b'{"image_file": ["QUJD"]}', "not a string", id="image-file-array"),
    pytest.param(b'{"image_file": ""}', "empty", id="image-file-empty"),
    pytest.param(b'{"image_file": "QU*D"}', "base64", id="bad-char"),
    pytest.param(b'{"image_file": "QU JD"}', "base64", id="raw-space"),
    pytest.param(b'{"image_file": "QUJD\nQUJD"}', "base64", id="raw-newline"),
    pytest.param(b'{"image_file": "QU-_"}', "base64", id="urlsafe-alphabet"),
    pytest.param('{"image_file": "QUJé"}'.encode(), "base64", id="non-ascii"),
    pytest.param(b'{"image_file": "QU\\bD"}', "base64", id="escape-b"),
    pytest.param(b'{"image_file": "QU\\\\D"}', "base64", id="escaped-backslash"),
    pytest.param(b'{"image_file": "QU\\"JD"}', 'escape \\\\"', id="escaped-quote"),
    pytest.param(b'{"image_file": "QUJD\\"}', 'escape \\\\"', id="escaped-closing-quote"),
    pytest.param(b'{"image_file": "QU\\u0000D"}', "base64", id="escape-u0000"),
    pytest.param(b'{"image_file": "QU\\u00e9D"}', "base64", id="escape-non-ascii"),
    pytest.param(b'{"image_file": "QU\\u12"}', "base64", id="short-u-escape"),
    pytest.param(b'{"image_file": "QQ"}', "multiple of 4", id="no-padding"),
    pytest.param(b'{"image_file": "QUJ"}', "multiple of 4", id="length-3"),
    pytest.param(b'{"image_file": "QQ="}', "multiple of 4", id="short-padding"),
    pytest.param(b'{"image_file": "Q==="}', "base64", id="three-pad"),
    pytest.param(b'{"image_file": "===="}', "base64", id="only-padding"),
    pytest.param(b'{"image_file": "QQ==QUJD"}', "padding", id="padding-in-middle"),
    pytest.param(b'{"image_file": "=QUJ"}', "padding", id="leading-padding"),
    pytest.param(b'{"image_file": "QUJD="}', "multiple of 4", id="extra-padding"),
    pytest.param(
        b'{"image_file": "QUJD", "image_file": "QUJD"}', "duplicate", id="duplicate-image-file"
    ),
    pytest.param(b'{"image_file": "QUJD"} x', "after the end", id="trailing-garbage"),
    pytest.param(b'{"image_file": "QUJD"}{}', "after the end", id="second-object"),
    pytest.param(b'{"image_file": "QUJD"},', "after the end", id="trailing-comma-after-object"),
    pytest.param(b'{"image_file": "QUJD",}', "member name", id="trailing-comma"),
    pytest.param(b'{"image_file" "QUJD"}', "':'", id="missing-colon"),
    pytest.param(b'{"image_file": "QUJD" "a": 1}', "','", id="missing-comma"),
    pytest.param(b'{image_file: "QUJD"}', "member name", id="unquoted-key"),
    pytest.param(b'{"a": tru, "image_file": "QUJD"}', "invalid JSON", id="bad-literal"),
    pytest.param(b'{"a": NaN, "image_file": "QUJD"}', "cannot start", id="nan"),
    pytest.param(b'{"a": -Infinity, "image_file": "QUJD"}', "invalid JSON", id="infinity"),
    pytest.param(b'{"a": 01, "image_file": "QUJD"}', "invalid JSON", id="leading-zero"),
    pytest.param(b'{"a": [1, 2}, "image_file": "QUJD"}', "invalid JSON", id="mismatched-brackets"),
    pytest.param(b'{"a": \'x\', "image_file": "QUJD"}', "cannot start", id="single-quotes"),
    pytest.param(b'{"a\tb": 1, "image_file": "QUJD"}', "invalid JSON", id="control-char-in-key"),
    pytest.param(b'{"a": "\xff", "image_file": "QUJD"}', "invalid JSON", id="invalid-utf8"),
]


@pytest.mark.parametrize(("body", "message"), _MALFORMED)
@pytest.mark.parametrize("size", [pytest.param(1, id="bytewise"), pytest.param(65536, id="whole")])
def test_malformed_body_is_rejected(codec: str, body: bytes, message: str, size: int) -> None:
    """Each malformation raises InvalidResponseError naming the problem."""
    with pytest.raises(InvalidResponseError, match=message) as caught:
        decode(body, [size])
    assert caught.value.retryable is (message == "ended")


def test_malformed_body_is_reported_by_feed_at_once() -> None:
    """An HTML page fails on its first byte, not at finish()."""
    decoder = SuccessBodyDecoder()
    with pytest.raises(InvalidResponseError, match="not a JSON object") as caught:
        decoder.feed(b"<html>")
    assert caught.value.retryable is False


def test_errors_are_sticky() -> None:
    """After an error, feed() and finish() raise it again."""
    decoder = SuccessBodyDecoder()
    with pytest.raises(InvalidResponseError):
        decoder.feed(b'{"image_file": "QU*D"}')
    with pytest.raises(InvalidResponseError, match="base64"):
        decoder.feed(b"")
    with pytest.raises(InvalidResponseError, match="base64"):
        decoder.finish()


def test_feed_after_finish_is_a_bug() -> None:
    """feed() after finish() is a programming error, not a response error."""
    decoder = SuccessBodyDecoder()
    decoder.feed(b'{"image_file": "QUJD"}')
    decoder.finish()
    with pytest.raises(RuntimeError):
        decoder.feed(b" ")


_SMALL_BODY = (
    b'{"meta": {"s": "a}\\"b", "n": [1, -2.5e1, true, null]}, '
    b'"image_file": "QUJD\\/\\/\\u0041\\u0041QQ==", "image_type": "png"}'
)


@pytest.mark.parametrize(
    "size", [pytest.param(1, id="bytewise"), pytest.param(1 << 20, id="whole")]
)
def test_truncated_at_every_position_is_retryable(size: int) -> None:
    """A body cut anywhere before its closing brace is retryable (cut in transit)."""
    assert expected(_SMALL_BODY)[0] == base64.b64decode("QUJD//AAQQ==")
    for cut in range(len(_SMALL_BODY)):
        with pytest.raises(InvalidResponseError, match="ended") as caught:
            decode(_SMALL_BODY[:cut], [size])
        assert caught.value.retryable is True, cut


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"big": "' + b"x" * 200 + b'", "image_file": "QUJD"}', id="long-string"),
        pytest.param(b'{"big": [' + b"1," * 100 + b'1], "image_file": "QUJD"}', id="long-array"),
        pytest.param(b'{"big": ' + b"9" * 200 + b', "image_file": "QUJD"}', id="long-number"),
        pytest.param(b'{"' + b"k" * 200 + b'": 1, "image_file": "QUJD"}', id="long-key"),
        pytest.param(
            b"{" + b"".join(b'"k%d": %d, ' % (i, i) for i in range(40)) + b'"image_file": "QUJD"}',
            id="many-members",
        ),
        pytest.param(
            b'{"image_file": "QUJD", "big": {"a": "' + b"x" * 200 + b'"}}', id="after-image"
        ),
    ],
)
@pytest.mark.parametrize("size", [pytest.param(1, id="bytewise"), pytest.param(65536, id="whole")])
def test_other_members_over_the_cap_are_rejected(body: bytes, size: int) -> None:
    """Members besides image_file beyond max_other_bytes raise (bounded memory)."""
    with pytest.raises(InvalidResponseError, match="exceed 100 bytes") as caught:
        decode(body, [size], max_other_bytes=100)
    assert caught.value.retryable is False


def test_other_members_under_the_cap_are_accepted() -> None:
    """The cap counts member bytes, not the image, so a big image passes a small cap."""
    body = json.dumps({"image_file": base64.b64encode(_BIG).decode(), "image_type": "png"}).encode()
    got, decoder = decode(body, [4096], max_other_bytes=64)
    assert got == _BIG
    assert decoder.image_type == "png"


# -- bounded memory -----------------------------------------------------------------


def test_memory_stays_bounded_for_a_50_mb_body() -> None:
    """A 50 MB body fed in 64 KiB chunks made on the fly keeps peak memory in KB, not MB."""
    block = _big_image(49_152, seed=11)  # 64 KiB of base64
    repeats = 50 * 1024 * 1024 // 65_536
    want, got = hashlib.sha256(), hashlib.sha256()
    decoder = SuccessBodyDecoder()
    tracemalloc.start()
    try:
        got.update(decoder.feed(b'{"image_type": "png", "image_file": "'))
        for _ in range(repeats):
            want.update(block)
            got.update(decoder.feed(_b64.b64encode(block)))
        got.update(decoder.feed(b'"}'))
        got.update(decoder.finish())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.digest() == want.digest()
    assert decoder.decoded_bytes == repeats * len(block)
    assert peak < 1024 * 1024, f"peak {peak} bytes"
