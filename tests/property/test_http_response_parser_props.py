"""Property tests for the lean AWS client's HTTP/1.1 response parser (``fpolicyd.sinks.aws.transport``).

Any response, cut into any pieces, parses to the same status, headers and body as when fed whole: by
Content-Length, chunked (any chunk sizes, extensions, trailers) or delimited by the close; interim 1xx answers
are skipped. Garbage never parses to a response silently: it raises HttpProtocolError or waits for more bytes.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.sinks.aws.transport import HttpProtocolError, HttpResponse, ResponseParser

header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9\-]{0,20}", fullmatch=True).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "connection")
)
header_values = st.from_regex(r"[!-~]([ !-~]{0,30}[!-~])?", fullmatch=True)
bodies = st.binary(max_size=3000)
statuses = st.sampled_from([200, 201, 400, 403, 404, 413, 429, 500, 503])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    pieces, start = [], 0
    for mark in [*marks, len(data)]:
        pieces.append(data[start:mark])
        start = mark
    return pieces


def feed_all(parser: ResponseParser, pieces: list[bytes]) -> list[HttpResponse]:
    out = []
    for piece in pieces:
        got = parser.feed(piece)
        if got is not None:
            out.append(got)
    return out


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    out = bytearray()
    rest = body
    while rest:
        size = draw(st.integers(min_value=1, max_value=max(1, len(rest))))
        chunk, rest = rest[:size], rest[size:]
        extension = draw(st.sampled_from([b"", b";name=value", b" ;x"]))
        out += b"%x%s\r\n%s\r\n" % (len(chunk), extension, chunk)
    out += b"0\r\n"
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=2)):
        out += f"{name}: {value}\r\n".encode()
    out += b"\r\n"
    return bytes(out)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, int, dict[str, str], bytes, str, bool]:
    status = draw(statuses)
    headers = draw(st.dictionaries(header_names.map(str.lower), header_values, max_size=5))
    body = draw(bodies)
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    close = framing == "close" or draw(st.booleans())
    head = [f"HTTP/1.1 {status} {draw(st.sampled_from(['OK', 'Whatever', '']))}"]
    head.extend(f"{k}: {v}" for k, v in headers.items())
    if close:
        head.append("Connection: close")
    if framing == "length":
        head.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        head.append("Transfer-Encoding: chunked")
        payload = draw(chunked(body))
    else:
        payload = body
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" if draw(st.booleans()) else b""
    raw = interim + ("\r\n".join(head) + "\r\n\r\n").encode() + payload
    return raw, status, headers, body, framing, not close


@given(responses(), st.lists(st.integers(min_value=0), max_size=8))
def test_any_split_parses_like_the_whole(
    case: tuple[bytes, int, dict[str, str], bytes, str, bool], points: list[int]
) -> None:
    raw, status, headers, body, framing, keep_alive = case
    parser = ResponseParser()
    got = feed_all(parser, cut(raw, points))
    if framing == "close":
        assert got == []
        final = parser.feed_eof()
        assert final is not None
        got = [final]
    assert len(got) == 1
    (response,) = got
    assert response.status == status
    assert response.body == body
    assert response.keep_alive is keep_alive
    for name, value in headers.items():
        assert response.headers[name] == value
    assert parser.leftover == 0


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=4))
def test_garbage_never_passes_silently(data: bytes, points: list[int]) -> None:
    """Random bytes: either an error, or nothing yet (waiting for more), or (rarely) a valid response whose
    status line really is in the bytes."""
    parser = ResponseParser()
    try:
        got = feed_all(parser, cut(data, points))
    except HttpProtocolError:
        return
    for response in got:
        assert f"HTTP/1.1 {response.status}".encode() in data or f"HTTP/1.0 {response.status}".encode() in data


@given(st.integers(min_value=1, max_value=64), bodies)
def test_a_response_cut_short_is_an_error_not_a_short_body(missing: int, body: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body) + missing, body)
    parser = ResponseParser()
    assert parser.feed(raw) is None
    try:
        parser.feed_eof()
    except HttpProtocolError:
        return
    raise AssertionError("a truncated body was accepted")


def test_examples() -> None:
    parser = ResponseParser()
    response = parser.feed(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-A: 2\r\n\r\n")
    assert response == HttpResponse(204, {"x-a": "1, 2"}, b"", True)
    assert parser.idle
    assert parser.feed_eof() is None  # an idle close is no error: nothing had started
    http10 = ResponseParser().feed(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert http10 is not None
    assert not http10.keep_alive
    for bad in (
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
    ):
        try:
            ResponseParser().feed(bad)
        except HttpProtocolError:
            continue
        raise AssertionError(f"accepted {bad!r}")
    small = ResponseParser(max_head_bytes=64)
    try:
        small.feed(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 100)
    except HttpProtocolError:
        pass
    else:
        raise AssertionError("an over-long head was accepted")
