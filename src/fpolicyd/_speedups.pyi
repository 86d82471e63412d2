"""Types of the optional C accelerator (``_speedups.c``); :mod:`fpolicyd.pipeline.speedups` is how fpolicyd uses it."""

from collections.abc import Callable
from typing import Final, Protocol

class _Sha1(Protocol):
    def copy(self) -> _Sha1: ...
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...

#: ``(operation, operation JSON, is_directory, protocol JSON, needs_previous)`` of a ReqType.
ReqTypeEntry = tuple[str, bytes, bool, bytes, bool]
#: ``(head, tail, event_id, key, file_path, operation, generation_time, req_id, req_type)``.
EncodedEvent = tuple[bytes, bytes, str, int, str, str, int | None, int, str]

MAX_BODY_BYTES: Final[int]
MAX_FIELDS: Final[int]
MAX_EPOCH_US: Final[int]
MIN_PLAUSIBLE_GENERATION_US: Final[int]
#: SHA-256 of the ``_speedups.c`` this module was compiled from (``"unknown"`` when built without setup.py).
SOURCE_SHA256: Final[str]

class EventEncoder:
    def __init__(
        self,
        namespace_sha1: _Sha1,
        req_types: dict[str, ReqTypeEntry],
        req_type_miss: Callable[[str], ReqTypeEntry],
        volumes: dict[int | None, bytes],
        volume_miss: Callable[[int | None], bytes],
        vs_uuid_json: bytes,
        policy_name_json: bytes,
        session_id_json: bytes,
        fpolicy_version_json: bytes,
        node_json: bytes,
        svm_name_json: bytes,
        max_path_chars: int = 0,
    ) -> None: ...
    def encode(self, payload: bytes, received_at_us: int, /) -> EncodedEvent | None: ...

def format_rfc3339_us(epoch_us: int, /) -> str | None: ...
def json_string(s: str, /) -> bytes: ...
def element_text(raw: bytes, strip: bool, /) -> str | None: ...
def split_frames(data: bytes, frames: list[bytes], max_frame_bytes: int, /) -> int: ...
