"""The real ONTAP captures under tests/data, as frames."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fpolicyd.protocol.framing import encode_frame

DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Capture:
    notf_type: str
    direction: str
    header: bytes
    body: bytes | None
    frame_length: int

    @property
    def frame(self) -> bytes:
        return encode_frame(self.header, self.body)

    @property
    def payload(self) -> bytes:
        return self.frame[6:]


def load_captures() -> list[Capture]:
    out: list[Capture] = []
    for name in ("ontap-9.13-sim-session.json", "ontap-smb-rename.json"):
        for item in json.loads((DATA / name).read_text(encoding="utf-8")):
            out.append(
                Capture(
                    notf_type=item["notf_type"],
                    direction=item["direction"],
                    header=item["header"].encode(),
                    body=item["body"].encode() if item["body"] is not None else None,
                    frame_length=item["frame_length"],
                )
            )
    return out


CAPTURES = load_captures()
NEGO_REQ, NEGO_RESP, KEEP_ALIVE, SMB_OPEN, SMB_REN = CAPTURES
