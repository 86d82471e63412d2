"""Data classification: what file paths and user identities may appear in logs, events and the audit ledger.

The reference pipeline's guidance (never implemented there): ``file_path`` is internal to confidential,
user identities confidential to restricted, ``client_ip`` internal. Regulated deployments hash paths
(SHA-256, 16 hex, optional salt) and exclude user identities; production masks user identities; paths must not
be logged in clear in confidential environments.

===========  =====================================  =====================================================
level        logs (always)                          events and ledger (only with ``classify_events``)
===========  =====================================  =====================================================
dev          unchanged                              unchanged
prod         users masked, paths hashed             user identities removed (their kind kept)
regulated    users removed, paths hashed            user identities removed, paths hashed
===========  =====================================  =====================================================

A hashed path is ``/`` + the first 16 hex digits of SHA-256 of the UTF-8 path (HMAC-SHA256 keyed with the
salt when one is set, so that a reader without the salt cannot confirm a guessed path). Equal paths hash
equally, so per-path grouping still works downstream; prefixes and suffixes do not survive, which is why the
router and the settle stage see the clear path and the event is redacted as it is emitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from fpolicyd.events import FileEvent

#: What a masked user identity reads as.
MASK: Final = "***"
HASH_HEX_DIGITS: Final = 16

#: Log fields (top level, or inside a logged mapping) that hold a path or a user identity.
PATH_FIELDS: Final = frozenset({"path", "file_path", "previous_path", "display_path", "source_path", "target_path"})
USER_FIELDS: Final = frozenset({"user", "uid", "sid", "user_name", "file_owner", "user_gids", "owner"})
#: Event metadata keys that identify a user.
EVENT_USER_KEYS: Final = ("user", "file_owner", "user_gids")


class DataClassification(StrEnum):
    DEV = "dev"
    PROD = "prod"
    REGULATED = "regulated"


@dataclass(frozen=True, slots=True)
class Redactor:
    level: DataClassification = DataClassification.PROD
    salt: bytes | None = None
    #: Whether emitted events and the audit ledger are redacted too (logs always are, per level).
    classify_events: bool = False

    # ------------------------------------------------------------------------------------------ values

    def hash_path(self, path: str) -> str:
        data = path.encode("utf-8", "surrogatepass")
        if self.salt:
            digest = hmac.new(self.salt, data, hashlib.sha256).hexdigest()
        else:
            digest = hashlib.sha256(data).hexdigest()
        return "/" + digest[:HASH_HEX_DIGITS]

    def log_path(self, path: str) -> str:
        """A path as it may appear in a log line (also the capture mask)."""
        return path if self.level is DataClassification.DEV else self.hash_path(path)

    # ------------------------------------------------------------------------------------------ logs

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """structlog processor: redacts path and user fields of every log line per level."""
        if self.level is DataClassification.DEV:
            return event_dict
        for key in list(event_dict):
            event_dict[key] = self._log_value(key, event_dict[key], depth=0)
            if event_dict[key] is _REMOVED:
                del event_dict[key]
        return event_dict

    def _log_value(self, key: str, value: Any, depth: int) -> Any:
        if key in USER_FIELDS:
            return _REMOVED if self.level is DataClassification.REGULATED else MASK
        if key in PATH_FIELDS and isinstance(value, str):
            return self.hash_path(value)
        if isinstance(value, Mapping) and depth < 2:
            out = {k: self._log_value(str(k), v, depth + 1) for k, v in value.items()}
            return {k: v for k, v in out.items() if v is not _REMOVED}
        return value

    # ------------------------------------------------------------------------------------------ events

    @property
    def redacts_events(self) -> bool:
        return self.classify_events and self.level is not DataClassification.DEV

    def redact_event(self, event: FileEvent) -> FileEvent:
        """The event as it may leave the daemon (identity when events are not classified)."""
        if not self.redacts_events:
            return event
        metadata = self._redact_users(event.metadata)
        if self.level is not DataClassification.REGULATED:
            return dataclasses.replace(event, metadata=metadata)
        if "display_path" in metadata:
            metadata["display_path"] = self.hash_path(metadata["display_path"])
        metadata["path_hashed"] = True
        return dataclasses.replace(
            event,
            file_path=self.hash_path(event.file_path),
            previous_path=None if event.previous_path is None else self.hash_path(event.previous_path),
            metadata=metadata,
        )

    def redact_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """An audit-ledger (or any JSON) record: same rules as events, by field name."""
        out = dict(record)
        if not self.redacts_events:
            return out
        for key, value in record.items():
            if key in USER_FIELDS:
                if self.level is DataClassification.REGULATED:
                    del out[key]
                else:
                    out[key] = MASK
            elif key in PATH_FIELDS and isinstance(value, str) and self.level is DataClassification.REGULATED:
                out[key] = self.hash_path(value)
        return out

    def _redact_users(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """Keep only the kind of each identity (unix/windows): the event schema requires ``user`` and its
        ``uid`` is a number, so an identity is dropped rather than replaced by a mask."""
        out = dict(metadata)
        for key in EVENT_USER_KEYS:
            value = out.get(key)
            if isinstance(value, Mapping):
                out[key] = {k: v for k, v in value.items() if k == "id_type"}
            elif value is not None:
                del out[key]
        return out


class _Removed:
    """Marker for a log field that must not appear at all."""


_REMOVED: Final = _Removed()
