"""An independent recomputation of the event id from an emitted event, as other tools would do it."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fpolicyd.events import EVENT_ID_NAMESPACE


def recompute_event_id(doc: dict[str, Any]) -> str:
    """The recipe in normalize()'s docstring, from the emitted JSON alone, with stdlib uuid/json."""
    meta = doc["metadata"]
    previous = doc.get("previous_path")
    target = doc["file_path"] if previous is not None and not meta.get("target_missing") else None
    identity = [
        meta["vs_uuid"],
        meta["volume_msid"],
        meta["req_type"],
        previous if previous is not None else doc["file_path"],
        target,
        meta["generation_time"],
        doc.get("client_ip"),
        meta["user"].get("uid"),
        meta["user"].get("sid"),
    ]
    if meta["timestamp_source"] == "received":
        identity += [meta["session_id"], meta["req_id"]]
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, json.dumps(identity, ensure_ascii=False, separators=(",", ":"))))
