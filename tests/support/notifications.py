"""Hand-made ONTAP notifications on chosen paths, built on the captured SMB rename (real field values)."""

from __future__ import annotations

import dataclasses

from fpolicyd.protocol.messages import PathName, ScreenRequest
from fpolicyd.protocol.req_types import REQ_TYPES
from fpolicyd.protocol.xml_codec import decode_payload, encode_message
from support.captures import SMB_REN

_DECODED = decode_payload(SMB_REN.payload).message
assert isinstance(_DECODED, ScreenRequest)
_BASE: ScreenRequest = _DECODED
BASE_GENERATION_US = _BASE.common.generation_time or 0


def _paths(path: str) -> tuple[PathName, ...]:
    return (PathName("WIN_NAME", path.replace("/", "\\")), PathName("UNIX_NAME", path))


def notification(
    req_id: int, req_type: str, path: str, *, generation_us: int | None = None, target: str | None = None
) -> ScreenRequest:
    """A SCREEN_REQ of ``req_type`` on ``path`` (``target``: the new path of a rename). Distinct ``req_id``s get
    distinct GenerationTimes unless ``generation_us`` is given (identical notifications are one event)."""
    info = REQ_TYPES[req_type]
    common = dataclasses.replace(
        _BASE.common,
        access_paths=_paths(path),
        generation_time=BASE_GENERATION_US + req_id if generation_us is None else generation_us,
    )
    return ScreenRequest(
        req_id=req_id,
        req_type=req_type,
        op_element=info.element,
        common=common,
        display_path=None,
        prot_ver=_BASE.prot_ver,
        target_paths=_paths(target) if target is not None else (),
        op_fields=(),
    )


def frame(
    req_id: int, req_type: str, path: str, *, generation_us: int | None = None, target: str | None = None
) -> bytes:
    return encode_message(notification(req_id, req_type, path, generation_us=generation_us, target=target))
