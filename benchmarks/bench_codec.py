"""Per-event CPU cost of each ingest stage, on the real SMB rename capture (1.35 KB frame).

    .venv/bin/python benchmarks/bench_codec.py [--number N]

Prints µs/event for: the bare frame split, lxml vs xml.etree parse of the body (why lxml), the full decode,
the regex fast path for ONTAP's canonical body (``xml_fast.scan_screen_request``) next to it, normalize, JSON
encode (orjson vs json: why orjson), and the whole reader path (split → decode → session → normalize → encode),
plus the resulting ceiling in events/s for one core; where the C accelerator is built, its one call (payload →
event JSON) next to the Python fast path's three steps (scan, build, JSON). ``bench_ingest_step.py`` compares the
whole ingest step with and without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import orjson
from lxml import etree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fpolicyd.events import EventBuilder, NameMaps, normalize
from fpolicyd.pipeline import speedups
from fpolicyd.protocol.framing import XmlFrameReader, split_payload
from fpolicyd.protocol.messages import ScreenRequest
from fpolicyd.protocol.session import FileNotification, Session
from fpolicyd.protocol.session_config import SessionConfig
from fpolicyd.protocol.xml_codec import decode_header, decode_payload, fast_screen
from fpolicyd.protocol.xml_fast import fields_of, scan_screen_request
from support.captures import NEGO_REQ, SMB_REN


def measure(fn: Callable[[], object], number: int) -> float:
    """Best of 5 runs, in µs per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--number", type=int, default=20_000)
    args = parser.parse_args()
    n = args.number

    body = SMB_REN.body
    assert body is not None
    frame = SMB_REN.frame
    batch = frame * 64
    payload = SMB_REN.payload
    lxml_parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)

    session = Session(SessionConfig(), peer="127.0.0.1:1", now=0.0)
    session.receive(NEGO_REQ.payload, 0.0)
    context = session.context
    assert context is not None
    names = NameMaps(volumes={2147830405: "vol1"}, svms={}, default_volume=None, default_svm="svm1")
    request = decode_payload(payload).message
    assert isinstance(request, ScreenRequest)
    event = normalize(request, context, names, 1_700_000_000_000_000)
    event_dict = event.to_dict()

    builder = EventBuilder(context, names)
    assert scan_screen_request(body) == fields_of(request)

    def fast_decode() -> object:
        """What a caller of the fast path does per payload: split, canonical header, scan the body."""
        header_xml, body_xml = split_payload(payload)
        decode_header(header_xml)
        return scan_screen_request(body_xml) if body_xml is not None else None

    def reader_path() -> None:
        reader = XmlFrameReader()
        for p in reader.feed(batch):
            for out in session.receive(p, 1.0):
                if type(out) is FileNotification:
                    orjson.dumps(builder.build(out.fields, 1_700_000_000_000_000)[0])

    rows = [
        ("frame split (XmlFrameReader, 64 frames/read)", measure(lambda: XmlFrameReader().feed(batch), n // 64) / 64),
        ("parse body: xml.etree", measure(lambda: ET.fromstring(body), n)),
        ("parse body: lxml (hardened parser)", measure(lambda: etree.fromstring(body, lxml_parser), n)),
        ("decode_payload (header+body -> ScreenRequest)", measure(lambda: decode_payload(payload), n)),
        ("fast path: scan_screen_request (body -> ScreenFields)", measure(lambda: scan_screen_request(body), n)),
        ("fast path: split+header+scan (payload -> ScreenFields)", measure(fast_decode, n)),
        ("normalize (-> FileEvent)", measure(lambda: normalize(request, context, names, 1), n)),
        ("event JSON: json.dumps", measure(lambda: json.dumps(event_dict, separators=(",", ":")), n)),
        ("event JSON: orjson (FileEvent.to_json)", measure(event.to_json, n)),
        ("reader path: split+decode+session+normalize+JSON", measure(reader_path, n // 64) / 64),
    ]
    fields = scan_screen_request(body)
    assert fields is not None

    def fast_event() -> bytes:
        """The Python fast path from payload to event JSON: fast_screen (split, header, scan), build, orjson."""
        scanned = fast_screen(payload)
        assert scanned is not None
        return orjson.dumps(builder.build(scanned, 1)[0])

    rows.append(("fast path: EventBuilder.build (ScreenFields -> event)", measure(lambda: builder.build(fields, 1), n)))
    rows.append(("fast path: payload -> event JSON (scan+build+orjson)", measure(fast_event, n)))
    encode = speedups.session_encoder(context, names)
    if encode is not None:
        rows.append(("C accelerator: payload -> event JSON (one call)", measure(lambda: encode(payload, 1), n)))
    cost = dict(rows)
    width = max(len(name) for name, _ in rows)
    print(f"{'stage':{width}}  µs/event")
    for name, us in rows:
        print(f"{name:{width}}  {us:8.2f}")
    total = cost["reader path: split+decode+session+normalize+JSON"]
    split = cost["frame split (XmlFrameReader, 64 frames/read)"]
    print(
        f"\nreader-path ceiling on one core: {1e6 / total:,.0f} events/s "
        f"(bare frame split alone: {1e6 / split:,.0f} frames/s)"
    )
    lxml_x = cost["parse body: xml.etree"] / cost["parse body: lxml (hardened parser)"]
    orjson_x = cost["event JSON: json.dumps"] / cost["event JSON: orjson (FileEvent.to_json)"]
    print(f"lxml vs xml.etree parse: {lxml_x:.1f}x faster; orjson vs json: {orjson_x:.1f}x faster")
    decode = cost["decode_payload (header+body -> ScreenRequest)"]
    scan_x = decode / cost["fast path: scan_screen_request (body -> ScreenFields)"]
    payload_x = decode / cost["fast path: split+header+scan (payload -> ScreenFields)"]
    print(f"fast path vs decode_payload: scan {scan_x:.1f}x faster, split+header+scan {payload_x:.1f}x faster")
    if encode is not None:
        python_us = cost["fast path: payload -> event JSON (scan+build+orjson)"]
        c_x = python_us / cost["C accelerator: payload -> event JSON (one call)"]
        print(f"C accelerator vs the Python fast path (scan + build + JSON): {c_x:.1f}x faster")
    print(orjson.dumps({name: round(us, 3) for name, us in rows}).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
