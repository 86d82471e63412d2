"""The ceiling for bench_ingest.py: a uvloop server that only splits XML-mode frames and answers NEGO_REQ.

It does what every FPolicy server must do at minimum (read, split frames, reply to the handshake) and nothing
else, so ``fpolicyd serve`` / this = the share of the box's capacity fpolicyd's real work leaves.

    python benchmarks/bare_splitter.py PORT_FILE [--expect N --done-file FILE]
writes the bound port to PORT_FILE, prints the number of frames seen when stopped with SIGTERM. With
``--expect N``: once N frames other than NEGO_REQs have been split, writes that moment (``time.monotonic()``,
CLOCK_MONOTONIC: comparable across processes) to ``--done-file``, so a benchmark can stop its clock exactly when
the splitter has read everything.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path

import uvloop

from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import Handshake, HandshakeResp
from fpolicyd.protocol.xml_codec import decode_payload, encode_handshake_resp


class Splitter(asyncio.Protocol):
    frames = 0
    negotiations = 0
    expect = 0
    done_file: Path | None = None

    def __init__(self) -> None:
        self.reader = XmlFrameReader()
        self.transport: asyncio.Transport | None = None
        self.negotiated = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        payloads = self.reader.feed(data)
        Splitter.frames += len(payloads)
        if not self.negotiated and payloads and self.transport is not None:
            hello = decode_payload(payloads[0]).message
            assert isinstance(hello, Handshake)
            self.transport.write(
                encode_handshake_resp(HandshakeResp(hello.vs_uuid, hello.policy_name, hello.session_id, "1.2"))
            )
            self.negotiated = True
            Splitter.negotiations += 1
        if Splitter.done_file is not None and Splitter.frames - Splitter.negotiations >= Splitter.expect:
            Splitter.done_file.write_text(repr(time.monotonic()))
            Splitter.done_file = None


async def main(port_file: Path) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Splitter, "127.0.0.1", 0)
    port_file.write_text(str(server.sockets[0].getsockname()[1]))  # noqa: ASYNC240 - once, before any client
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    print(Splitter.frames, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port_file", type=Path)
    parser.add_argument("--expect", type=int, default=0, help="frames (not counting NEGO_REQs) to wait for")
    parser.add_argument("--done-file", type=Path, help="where to write the moment --expect frames were split")
    args = parser.parse_args()
    if args.done_file is not None:
        Splitter.expect, Splitter.done_file = args.expect, args.done_file
    uvloop.run(main(args.port_file))
