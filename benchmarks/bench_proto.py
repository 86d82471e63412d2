"""Decode cost per event, XML vs protobuf (provisional schema), for the same real SMB rename notification.

    .venv/bin/python benchmarks/bench_proto.py [--number N]

Prints µs/event for: frame split (XML reader vs both protobuf readers, 64 frames per read), payload decode to
the same ScreenRequest (lxml codec vs protobuf codec, and the protobuf parse alone without the mapping), the
whole split + decode, and the schema-less field walk used by ``fpolicyd capture decode``. Ratios within one
run are what to compare; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fpolicyd.protocol import fpolicy_pb2, proto_codec
from fpolicyd.protocol.messages import ScreenRequest
from fpolicyd.protocol.readers import LengthPrefixedReader, VarintDelimitedReader, make_reader
from fpolicyd.protocol.xml_codec import decode_payload
from support.captures import SMB_REN

FRAMES_PER_READ = 64


def measure(fn: Callable[[], object], number: int) -> float:
    """Best of 5 runs, in µs per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--number", type=int, default=20_000)
    n = parser.parse_args().number

    xml_payload = SMB_REN.payload
    request = decode_payload(xml_payload).message
    assert isinstance(request, ScreenRequest)
    proto_payload = proto_codec.encode_message(request)
    assert proto_codec.decode_payload(proto_payload).message == request
    streams = {
        "xml": SMB_REN.frame * FRAMES_PER_READ,
        "protobuf-length-prefixed": LengthPrefixedReader.frame(proto_payload) * FRAMES_PER_READ,
        "protobuf-varint-delimited": VarintDelimitedReader.frame(proto_payload) * FRAMES_PER_READ,
    }

    def parse_only() -> None:
        fpolicy_pb2.FPolicyMessage.FromString(proto_payload)

    rows: list[tuple[str, float]] = []
    for name, stream in streams.items():

        def split(s: bytes = stream, r: str = name) -> None:
            make_reader(r).feed(s)

        per_read = measure(split, max(1, n // FRAMES_PER_READ))
        rows.append((f"split, {name} ({FRAMES_PER_READ} frames/read)", per_read / FRAMES_PER_READ))
    xml_decode = measure(lambda: decode_payload(xml_payload), n)
    proto_decode = measure(lambda: proto_codec.decode_payload(proto_payload), n)
    rows += [
        (f"decode XML payload ({len(xml_payload)} B, lxml)", xml_decode),
        (f"decode protobuf payload ({len(proto_payload)} B, upb + mapping)", proto_decode),
        ("  of which protobuf parse only", measure(parse_only, n)),
        ("schema-less walk of the protobuf payload", measure(lambda: proto_codec.walk_fields(proto_payload), n // 4)),
    ]
    for name, stream in streams.items():
        decode = decode_payload if name == "xml" else proto_codec.decode_payload

        def whole(s: bytes = stream, r: str = name, d: Callable[[bytes], object] = decode) -> None:
            for payload in make_reader(r).feed(s):
                d(payload)

        rows.append((f"split + decode, {name}", measure(whole, max(1, n // FRAMES_PER_READ)) / FRAMES_PER_READ))

    width = max(len(label) for label, _ in rows)
    print(f"{'stage':<{width}}  µs/event")
    for label, value in rows:
        print(f"{label:<{width}}  {value:8.2f}")
    print(f"\nprotobuf decode / XML decode = {proto_decode / xml_decode:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
