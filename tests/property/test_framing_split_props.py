"""XmlFrameReader with the accelerator's frame split is XmlFrameReader without it: for any byte stream cut into any
reads, the same payloads read by read, the same bytes buffered, and the same peer error (reason and detail) at
the same read. The accelerator takes only the leading complete frames with a valid prefix; this checks that it
never takes more, nor other bytes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol import framing
from fpolicyd.protocol.framing import MARKER, XmlFrameReader, encode_frame

_speedups = pytest.importorskip(
    "fpolicyd._speedups", reason="the C accelerator is not built here (tests/unit/test_speedups_build.py says why)"
)

PROPS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
Outcome = tuple[str, object, int]


def prefix(length: int, first: int = MARKER, last: int = MARKER) -> bytes:
    return bytes([first]) + length.to_bytes(4, "big") + bytes([last])


#: Pieces of a stream: valid frames (some at or over a small maximum), bad markers, zero and huge lengths, junk.
pieces = st.one_of(
    st.binary(min_size=1, max_size=80).map(lambda body: prefix(len(body)) + body),
    st.builds(encode_frame, st.binary(max_size=40), st.one_of(st.none(), st.binary(max_size=60))),
    st.integers(min_value=0, max_value=2**32 - 1).map(prefix),
    st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 255)).map(
        lambda t: prefix(t[1], t[0], t[2])
    ),
    st.binary(min_size=1, max_size=12),
)


def run(stream: bytes, cuts: list[int], max_frame_bytes: int, *, accelerated: bool) -> list[Outcome]:
    """Feed ``stream`` cut at ``cuts``; per read, the payloads and buffered bytes, or the error; then stop."""
    reader = XmlFrameReader(max_frame_bytes=max_frame_bytes, accelerate=accelerated)
    out: list[Outcome] = []
    for read in reads(stream, cuts):
        try:
            frames = reader.feed(read)
        except RemoteProtocolError as exc:
            out.append(("error", (exc.reason, exc.detail), reader.buffered))
            break
        out.append(("frames", frames, reader.buffered))
    return out


def reads(stream: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({min(cut, len(stream)) for cut in cuts})
    start = 0
    for point in [*points, len(stream)]:
        yield stream[start:point]
        start = point


def test_the_reader_uses_the_accelerator_here() -> None:
    assert framing._split_frames is _speedups.split_frames


@PROPS
@given(
    parts=st.lists(pieces, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=1500), max_size=6),
    max_frame_bytes=st.sampled_from([1, 5, 40, 64, 4096, 1 << 20]),
)
def test_any_stream_any_reads_the_same_with_and_without(
    parts: list[bytes], cuts: list[int], max_frame_bytes: int
) -> None:
    stream = b"".join(parts)
    accelerated = run(stream, cuts, max_frame_bytes, accelerated=True)
    assert accelerated == run(stream, cuts, max_frame_bytes, accelerated=False)


@PROPS
@given(bodies=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20))
def test_valid_frames_in_one_read_are_taken_whole(bodies: list[bytes]) -> None:
    stream = b"".join(prefix(len(body)) + body for body in bodies)
    frames: list[bytes] = []
    assert _speedups.split_frames(stream, frames, 1 << 20) == len(stream)
    assert frames == bodies


def test_it_stops_at_the_first_frame_it_cannot_take() -> None:
    good = prefix(3) + b"abc"
    # Invalid prefixes (zero, over the maximum, wrong markers), then incomplete frames at the end of the read.
    for rest in (prefix(0) + good, prefix(10) + good, prefix(3, first=0x21) + good, prefix(3, last=0) + good):
        frames: list[bytes] = []
        assert _speedups.split_frames(good + rest, frames, 9) == len(good)
        assert frames == [b"abc"]
    for cut in range(1, len(good)):
        frames = []
        assert _speedups.split_frames(good + good[:cut], frames, 9) == len(good)
        assert frames == [b"abc"]


def test_anything_but_bytes_is_left_to_the_loop() -> None:
    frames: list[bytes] = []
    assert _speedups.split_frames(bytearray(prefix(1) + b"x"), frames, 10) == 0
    assert frames == []
    with pytest.raises(TypeError):
        _speedups.split_frames(b"", (), 10)
