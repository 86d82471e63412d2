"""Settings: one closed, frozen object built from flags > environment > TOML file > defaults.

Every limit the daemon enforces is a field here, documented where it is declared. The environment variables that
are not settings are read where they are used: ``NOTIFY_SOCKET`` (systemd's, :mod:`fpolicyd.obs.systemd`), the ECS
task-metadata URI (:mod:`fpolicyd.ontap.ops`, to find this task's address), the AWS SDK's own ``AWS_*``, and the
test-only fault seam of :mod:`fpolicyd.storage.faults`.

Environment variables are ``FPOLICYD_<FIELD>``; the reference server's variables (``FPOLICY_PORT``, ``MODE``,
``LOG_DIR``, ``SQS_QUEUE_URL``, ``SVM_NAME``, ``VOLUME_NAME``, ``WRITE_COMPLETE_DELAY_SEC``, ``FPOLICY_FORMAT``,
``PROTOBUF_FRAMING_MODE``, ``EVENT_BUS_NAME``, ``DEDUP_WINDOW_MINUTES``) are accepted as aliases so that an
existing task definition works unchanged.
Unknown keys and bad values fail at start-up with the key named (:func:`load_settings` raises ConfigError).
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Final

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from fpolicyd.errors import ConfigError, did_you_mean
from fpolicyd.events import PATH_MAX_CHARS_MIN, PATH_TAIL_CHARS
from fpolicyd.pipeline.dedup import DedupBackend, DedupFailureMode, DedupMode, DedupPolicy
from fpolicyd.pipeline.redaction import DataClassification, Redactor
from fpolicyd.pipeline.replay import ReplayConfig
from fpolicyd.pipeline.router import SINK_SCHEMES, UnroutedAction
from fpolicyd.pipeline.settle import (
    SettleConfig,
    SettleOverride,
    SettlePolicy,
    SettleStrategy,
    parse_override_key,
)
from fpolicyd.protocol.session_config import DEFAULT_MAX_OUTSTANDING, MIN_IDLE_FACTOR, EngineMode, SessionConfig
from fpolicyd.sinks.aws.targets import AwsDataPath
from fpolicyd.sinks.dead_letter import FILE_NAME as DEAD_LETTER_FILE_NAME
from fpolicyd.sinks.dead_letter import DeadLetterLimits
from fpolicyd.sinks.sqs_envelope import SQS_MAX_MESSAGE_BYTES, PackCompression
from fpolicyd.storage.faults import FSYNC_EIO_AFTER_ENV
from fpolicyd.storage.jsonl import FsyncPolicy, JsonlSettings
from fpolicyd.storage.ledger import LEDGER_PREFIX
from fpolicyd.storage.spool import SpoolFsync

if TYPE_CHECKING:
    from fpolicyd.sinks.factory import SinkOptions

ENV_PREFIX: Final = "FPOLICYD_"
#: A whole settings file in one environment variable (TOML text), merged over the file: any setting can be
#: passed where only environment variables can (an ECS task definition, from an SSM parameter). Individual
#: ``FPOLICYD_<KEY>`` variables and flags still win over it.
SETTINGS_TOML_ENV: Final = "FPOLICYD_SETTINGS_TOML"
#: Where the settings file is looked for when ``--config`` is not given, in order.
DEFAULT_CONFIG_PATHS: Final = (Path("fpolicyd.toml"), Path("/etc/fpolicyd/fpolicyd.toml"))

#: The smallest sqs_pack_bytes other than 0 (off): one ONTAP event is ~1-1.3 KB of JSON, so a smaller limit
#: could pack nothing and would only be a mistake.
SQS_PACK_MIN_BYTES: Final = 1024

_toml_data: ContextVar[Mapping[str, Any]] = ContextVar("fpolicyd_toml_data", default=MappingProxyType({}))
#: While :func:`load_settings` builds the settings: field -> (the environment variable that set it, its value), so
#: that an error names the variable the user set (``FPOLICY_PORT``), not the field it maps to.
_env_origins: ContextVar[dict[str, tuple[str, str]] | None] = ContextVar("fpolicyd_env_origins", default=None)


#: The reference server's environment variables, by the field they set. ``FPOLICYD_<FIELD>`` wins over them.
REFERENCE_ENV: Final[dict[str, tuple[str, ...]]] = {
    "listen_port": ("FPOLICY_PORT",),
    "fpolicy_format": ("FPOLICY_FORMAT",),
    "protobuf_framing_mode": ("PROTOBUF_FRAMING_MODE",),
    "svm_name": ("SVM_NAME",),
    "volume_name": ("VOLUME_NAME",),
    "mode": ("MODE",),
    "log_dir": ("LOG_DIR",),
    "sqs_queue_url": ("SQS_QUEUE_URL",),
    "event_bus_name": ("EVENT_BUS_NAME",),
    "write_complete_delay_s": ("WRITE_COMPLETE_DELAY_SEC",),
    "dedup_window_minutes": ("DEDUP_WINDOW_MINUTES",),
    "aws_region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
}


class LogFormat(StrEnum):
    """How log lines are written: ``auto`` is console on a terminal, JSON otherwise (a pipe, a file, journald)."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class EngineFormat(StrEnum):
    """ONTAP engine format: xml, protobuf (provisional, ONTAP 9.15.1+), or auto (detected per connection).

    The setting, not a connection's format: :class:`fpolicyd.protocol.readers.WireFormat` is what one
    connection's payloads turned out to be (never ``auto``).
    """

    XML = "xml"
    PROTOBUF = "protobuf"
    AUTO = "auto"


class ProtobufFraming(StrEnum):
    """How protobuf messages are delimited on the wire (unpublished by NetApp; see proto/README.md)."""

    AUTO = "auto"
    LENGTH_PREFIXED = "length-prefixed"
    VARINT_DELIMITED = "varint-delimited"


#: The reference server's PROTOBUF_FRAMING_MODE names and ours, lower-case with "-" read as "_".
_FRAMING_NAMES: Final = {
    "auto": ProtobufFraming.AUTO,
    "auto_detect": ProtobufFraming.AUTO,
    "length_prefixed": ProtobufFraming.LENGTH_PREFIXED,
    "varint_delimited": ProtobufFraming.VARINT_DELIMITED,
}


class TlsMode(StrEnum):
    OFF = "off"
    SERVER_AUTH = "server_auth"
    MUTUAL_AUTH = "mutual_auth"


class TlsVersion(StrEnum):
    TLS_1_2 = "1.2"
    TLS_1_3 = "1.3"


class DeliveryProcess(StrEnum):
    """Where the sinks run: ``auto`` (a process of their own when two or more CPUs are available), ``on``, ``off``."""

    auto = "auto"
    on = "on"
    off = "off"


class _EnvSource(PydanticBaseSettingsSource):
    """``FPOLICYD_<FIELD>``, then the reference names of :data:`REFERENCE_ENV`; keyed by field name so that
    merging with the file and the flags is by field, whatever name the value came from."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return self().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        env = {name.upper(): value for name, value in os.environ.items()}
        out: dict[str, Any] = {}
        for name, info in Settings.model_fields.items():
            for var in (f"{ENV_PREFIX}{name.upper()}", *REFERENCE_ENV.get(name, ())):
                if var not in env:
                    continue
                value: Any = env[var]
                origins = _env_origins.get()
                if origins is not None:
                    origins[name] = (var, env[var])
                if str(info.annotation).startswith("dict"):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{var}: expected a JSON object: {exc}") from None
                out[name] = value
                break
        return out


class _TomlSource(PydanticBaseSettingsSource):
    """The parsed settings file (already read by :func:`load_settings`), lowest precedence after defaults."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return _toml_data.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_data.get())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
        validate_default=True,
    )

    # --- listener -------------------------------------------------------------------------------------
    listen_host: str = Field("0.0.0.0", description="Address the FPolicy listener binds.")
    listen_port: int = Field(
        9898,
        ge=0,
        le=65535,
        description="FPolicy port.",
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="Concurrent negotiated ONTAP sessions (one per node x policy x IP family); a connection beyond "
        "it is closed at accept, or when its NEGO_REQ arrives, and counted. Connections that have not negotiated "
        "yet never hold one of these (see max_pending_handshakes).",
    )
    max_pending_handshakes: int = Field(
        64,
        ge=1,
        description="Connections accepted that have not had their NEGO_REQ answered yet (TLS handshake included). "
        "When full, the oldest is closed to make room for the new one, so connections that never negotiate "
        "cannot keep a real node out; open sockets stay under max_connections + this.",
    )
    max_connections_per_peer: int = Field(
        0,
        ge=0,
        description="Connections (pending and negotiated) one peer address may hold; more are closed at once and "
        "counted. 0 = no limit.",
    )
    log_rate_limit_interval_s: float = Field(
        10.0,
        ge=0,
        description="Refused and evicted connections, failed TLS handshakes and event-loop stalls write at most one "
        "log line per reason per interval, carrying the number left out since the previous line (metrics count every "
        "one); 0 = a line for each.",
    )
    max_frame_bytes: int = Field(
        1 << 20,
        ge=1024,
        le=64 << 20,
        description="Largest frame accepted; checked on the length prefix before anything is buffered.",
    )
    fpolicy_format: EngineFormat = Field(
        EngineFormat.XML,
        description="Engine format configured on ONTAP: xml | protobuf (ONTAP 9.15.1+, PROVISIONAL schema and "
        "framing, see proto/README.md) | auto (each connection's first bytes decide between xml and protobuf).",
    )
    protobuf_framing_mode: ProtobufFraming = Field(
        ProtobufFraming.AUTO,
        description="Framing of protobuf messages: auto (detected per connection) | length-prefixed (u32 big-endian "
        "length) | varint-delimited (protobuf varint length); the reference's AUTO_DETECT and LENGTH_PREFIXED "
        "are accepted.",
    )
    pure_python: bool = Field(
        False,
        description="Split frames and build every event on the pure-Python path, even where the C accelerator "
        "(fpolicyd._speedups) is built; the ingest_path log line at start says which path runs.",
    )
    path_max_chars: int = Field(
        0,
        ge=0,
        description="Longest file_path/previous_path an event carries, in characters; 0 = keep every path whole "
        "(only max_frame_bytes bounds it). The reference pipeline's schema allows 4096: set 4096 for its "
        "consumers. A longer path is cut to its head + '…[sha256:<16 hex>]…' + its last 255 characters, and "
        "metadata gets path_truncated = true and truncated_paths (full length and SHA-256); event_id and dedup "
        f"keys stay those of the full path. 0 or at least {PATH_MAX_CHARS_MIN}.",
    )

    # --- TLS and peers ----------------------------------------------------------------------------------
    tls_mode: TlsMode = Field(
        TlsMode.OFF,
        description="ONTAP engine ssl-option: off (no-auth), server_auth (server certificate) or mutual_auth "
        "(server certificate + client certificates verified against tls_client_ca_file).",
    )
    tls_cert_file: Path | None = Field(None, description="PEM server certificate chain (reloaded on SIGHUP).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file (reloaded on SIGHUP).")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle that ONTAP's client certificates must chain to (mutual_auth)."
    )
    tls_min_version: TlsVersion = Field(TlsVersion.TLS_1_2, description="Oldest TLS version accepted: 1.2 or 1.3.")
    allowed_networks: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Peer networks allowed to connect (CIDRs or addresses, e.g. the SVM data LIFs); "
        "empty = any. Others are closed at once, logged and counted.",
    )

    # --- session --------------------------------------------------------------------------------------
    engine_mode: EngineMode = Field(
        EngineMode.ASYNC,
        description="ONTAP external-engine type: async (no reply to SCREEN_REQ) or sync (SCREEN_RESP allow).",
    )
    sync_max_outstanding_requests: int = Field(
        DEFAULT_MAX_OUTSTANDING,
        ge=1,
        le=1_000_000,
        description="Sync engines: requests a session tracks as outstanding (received, not yet answered or "
        "cancelled) to answer STATUS_QUERY; at least ONTAP's max-server-reqs (500 by default, at most 10000). "
        "Beyond it the oldest is no longer tracked: a query for it answers 'lost' and ONTAP sends it again.",
    )
    preferred_versions: Annotated[tuple[str, ...], NoDecode] = Field(
        ("1.2", "1.1", "1.0"),
        description="Protocol versions in order of preference; only a version ONTAP offered is answered.",
    )
    handshake_timeout_s: float = Field(5.0, gt=0, description="Time a new connection has to send NEGO_REQ.")
    peer_write_buffer_bytes: int = Field(
        256 << 10,
        ge=4096,
        le=64 << 20,
        description="Replies (SCREEN_RESP, STATUS_QUERY_RESP, back pressure) a session may have queued unread by "
        "ONTAP; above it the session is not read until ONTAP has read them down to a quarter.",
    )
    peer_write_stall_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Close a session whose replies stayed above peer_write_buffer_bytes this long (ONTAP not "
        "reading them); everything read from it is kept.",
    )
    keep_alive_interval_s: float = Field(
        120.0, ge=0, description="The engine's keep-alive-interval (ONTAP default 120 s; 0 = disabled)."
    )
    idle_timeout_s: float | None = Field(
        None,
        ge=0,
        description=f"Close a session after this long without any message; default "
        f"{MIN_IDLE_FACTOR:g} x keep_alive_interval_s; must be at least that; 0 = never.",
    )

    # --- names ----------------------------------------------------------------------------------------
    volume_names: dict[int, str] = Field(
        default_factory=dict, description="Volume MSID -> volume name (`volume show -fields msid`)."
    )
    svm_names: dict[str, str] = Field(default_factory=dict, description="SVM (vserver) UUID -> SVM name.")
    svm_name: str | None = Field(
        None,
        description="SVM name used when the VsUUID is not in svm_names.",
    )
    volume_name: str | None = Field(
        None,
        description="Volume name used when the MSID is not in volume_names.",
    )

    # --- delivery -------------------------------------------------------------------------------------
    data_dir: Path = Field(Path("fpolicyd-data"), description="Root of everything fpolicyd writes locally.")
    sinks: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Sink URIs (jsonl:DIR, stdout:, sqs:QUEUE_URL, eventbridge:BUS); default jsonl:<data_dir>/events, "
        "or what MODE/LOG_DIR/SQS_QUEUE_URL/EVENT_BUS_NAME select.",
    )
    mode: str | None = Field(
        None,
        description="Reference-server mode: realtime = SQS (needs SQS_QUEUE_URL), anything else = JSON Lines.",
    )
    log_dir: Path | None = Field(
        None,
        description="Reference-server JSON Lines directory (used when MODE is not realtime).",
    )
    sqs_queue_url: str | None = Field(None, description="Reference SQS queue URL.")
    event_bus_name: str | None = Field(None, description="EventBridge bus.")
    jsonl_max_file_bytes: int = Field(128 << 20, ge=4096, description="Rotate a JSON Lines file at this size.")
    jsonl_max_file_age_s: float = Field(3600.0, gt=0, description="Rotate a JSON Lines file at this age.")
    jsonl_fsync: FsyncPolicy = Field(
        FsyncPolicy.interval,
        description="always or interval (the same since the spool: each batch is fsynced before the spool lets its "
        "events go) | never: left to the OS (an OS crash may lose the file's tail).",
    )
    jsonl_fsync_interval_s: float = Field(1.0, gt=0, description="fsync period of the interval policy.")
    batch_max_bytes: int = Field(
        1 << 20,
        ge=4096,
        le=64 << 20,
        description="Largest write to a local sink (whole lines; one line may exceed it).",
    )
    # --- spool and back-pressure ------------------------------------------------------------------------
    spool_dir: Path | None = Field(None, description="Spool (write-ahead log) directory; default <data_dir>/spool.")
    spool_fsync: SpoolFsync = Field(
        SpoolFsync.group,
        description="group (fsync every spool_group_commit_s, on a thread) | always | never (kernel only).",
    )
    spool_group_commit_s: float = Field(0.005, ge=0, le=1, description="Group-commit window of the spool.")
    spool_segment_bytes: int = Field(64 << 20, ge=1 << 16, description="Spool segment file size.")
    spool_max_bytes: int = Field(
        4 << 30, ge=1 << 20, description="Hard size limit of the spool (reading pauses before it is reached)."
    )
    backpressure_high_bytes: int = Field(
        2 << 30, ge=1, description="Spool size at which every ONTAP session gets BACK_PRESSURE_APPLY."
    )
    backpressure_low_bytes: int = Field(
        1 << 30,
        ge=0,
        description="Spool size under which BACK_PRESSURE_REM is sent (must exceed a segment plus one read).",
    )
    backpressure_pause_bytes: int = Field(
        3 << 30,
        ge=1,
        description="Spool size at which fpolicyd stops reading its sockets (TCP back-pressure); reading resumes "
        "under backpressure_high_bytes. The processing stage keeps an eighth of the gap to spool_max_bytes free.",
    )
    checkpoint_interval_s: float = Field(0.2, gt=0, le=60, description="How often sink cursors are persisted.")
    disk_full_retry_initial_s: float = Field(
        0.1,
        gt=0,
        le=60,
        description="A write refused for want of space (ENOSPC/EDQUOT: spool, dedup journal or store, ledger, "
        "state and cursor files) is tried again after this long, doubling up to disk_full_retry_max_s; reading "
        "is paused meanwhile and resumes by itself once the write goes through.",
    )
    disk_full_retry_max_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="Longest wait between two attempts of a write refused for want of space (the delay once "
        "space frees, at worst).",
    )

    @model_validator(mode="after")
    def _check_disk_full_retry(self) -> Settings:
        if self.disk_full_retry_max_s < self.disk_full_retry_initial_s:
            raise ValueError(
                f"disk_full_retry_max_s ({self.disk_full_retry_max_s}) must be >= disk_full_retry_initial_s "
                f"({self.disk_full_retry_initial_s})"
            )
        return self

    # --- cloud sinks --------------------------------------------------------------------------------------
    aws_region: str | None = Field(
        None, description="AWS region of the SQS/EventBridge sinks; default from the AWS environment/config."
    )
    sink_max_in_flight: int = Field(
        64,
        ge=1,
        le=256,
        description="SQS/EventBridge requests (batches of up to 10 events) in flight per sink. A region answers in "
        "~10-30 ms, so N in flight carry at most ~N x 10 / round trip events/s (64 at 15 ms: ~40,000/s; 4 would "
        "cap a sink near 2,500/s). FIFO queues: always 1.",
    )
    aws_data_path: AwsDataPath = Field(
        AwsDataPath.LEAN,
        description="How SQS/EventBridge batches are sent: lean (botocore's endpoint resolution, credentials and "
        "SigV4 signer over fpolicyd's own keep-alive HTTP pool; 6-8x less CPU per request) | sdk (aiobotocore, "
        "the fallback). Health checks use aiobotocore either way.",
    )
    sink_linger_s: float = Field(
        0.05,
        ge=0,
        le=5,
        description="SQS/EventBridge: wait at most this long from the first pending event for a batch to fill (10 "
        "events; with sqs_pack_bytes, a read of thousands: raise it at low event rates to pack more per request); "
        "the wait ends as soon as the batch is full, and reads take whole batches while lingering is on.",
    )
    sqs_group_id_field: str = Field(
        "svm_name", description="Event field (dotted path) used as MessageGroupId on FIFO queues."
    )
    sqs_max_batch_bytes: int = Field(1 << 20, ge=1024, le=1 << 20, description="SendMessageBatch size limit.")
    sqs_pack_bytes: int = Field(
        0,
        ge=0,
        le=SQS_MAX_MESSAGE_BYTES,
        description="SQS: 0 = one event per message (the default, what existing consumers expect); otherwise many "
        "events per message, each packed message at most this many bytes (body plus attributes; 1024 to 1048576, "
        "the SQS API limit; at most sqs_max_batch_bytes; lowered at start to the queue's MaximumMessageSize). "
        "Consumers must unpack: see the README, 'Packed SQS messages'.",
    )
    sqs_pack_compression: PackCompression = Field(
        PackCompression.GZIP,
        description="Packed SQS messages: gzip (body = base64 of the gzip-compressed JSON array of events, about "
        "5.5x smaller; needed for 0.01 billed requests per event) | none (body = the JSON array itself).",
    )
    eventbridge_source: str = Field("fsxn.fpolicy", description="PutEvents Source.")
    eventbridge_detail_type: str = Field("FPolicy File Operation", description="PutEvents DetailType.")
    eventbridge_max_batch_bytes: int = Field(1 << 20, ge=1024, le=1 << 20, description="PutEvents size limit.")
    eventbridge_max_entry_bytes: int = Field(
        256 << 10, ge=1024, le=1 << 20, description="Largest PutEvents entry (larger events are dead-lettered)."
    )
    dead_letter_dir: Path | None = Field(
        None, description="Where permanently rejected events go (JSON Lines); default <data_dir>/dead-letter."
    )
    dead_letter_max_bytes: int = Field(
        64 << 20,
        ge=16 << 10,
        le=1 << 40,
        description="Cap on the dead-letter files together (dead-letter.jsonl and its rotated .1, .2, ...). The "
        "active file rotates at dead_letter_max_bytes / dead_letter_max_files; the oldest file is removed to stay "
        'within the cap, its records counted in fpolicyd_dead_letter_dropped_total{reason="evicted"}. A record '
        "larger than one file's share is not written (counted too_large): keep the share above the largest "
        "undecodable frame you want whole (about 1.4 x max_frame_bytes, base64).",
    )
    dead_letter_max_files: int = Field(
        4,
        ge=1,
        le=1000,
        description="Dead-letter files kept (the active one and dead_letter_max_files - 1 rotated ones); each "
        "rotation removes the oldest, so about 1/dead_letter_max_files of the records goes at a time.",
    )
    dead_letter_pre_handshake_sample_bytes: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description="A payload that could not be decoded on a connection that never completed the handshake "
        "(anyone who can reach the port) is kept as its first this-many bytes only, with its length and "
        '"sample": true (0 = the reason and length only). A negotiated session\'s payloads are kept whole.',
    )
    dead_letter_log_interval_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="At most one error log line per this many seconds per source and reason for dead-letter "
        "records dropped at the cap or refused by the disk (each line says how many it stands for).",
    )
    shutdown_read_grace_s: float = Field(
        2.0,
        ge=0,
        le=30,
        description="On SIGTERM, time to keep reading what ONTAP already sent (after BACK_PRESSURE_APPLY) "
        "before closing the sessions; async ONTAP counts buffered notifications as delivered. 0 = close at once.",
    )
    drain_timeout_s: float = Field(
        20.0,
        ge=0,
        le=120,
        description="On SIGTERM, after the sessions are closed, time allowed for the sinks to deliver the spool; the "
        "drain ends as soon as it is empty, and what is left stays in the spool for the next start (on storage that "
        "goes with the task, such as Fargate's, it is lost: deploy/ecs sets 105 s with stopTimeout 120 s).",
    )

    # --- accepted now, used by later pipeline stages ----------------------------------------------------
    write_complete_delay_s: float = Field(
        0.0,
        ge=0,
        description="Settle quiet window in seconds (file readiness; the reference's blocking per-event sleep): "
        "create + writes to one path within it become one event, emitted once the path has been quiet this "
        "long, without blocking anything. 0 = settle off. See settle_*.",
    )
    dedup_window_minutes: float = Field(
        5.0,
        ge=0,
        description="Dedup window of window mode (dedup_mode = window), minutes; a sliding claim per use case, "
        "path and operation (not the reference's tumbling buckets).",
    )

    # --- logs -----------------------------------------------------------------------------------------
    # --- observability (HTTP: /metrics, /healthz, /readyz; SLO targets) --------------------------------
    http_enabled: bool = Field(True, description="Serve /metrics, /healthz and /readyz over HTTP.")
    http_host: str = Field(
        "127.0.0.1",
        description="Address of the metrics/health HTTP server (0.0.0.0 to let a load balancer or another host "
        "reach it; a sidecar in the same ECS task reaches 127.0.0.1).",
    )
    http_port: int = Field(9100, ge=0, le=65535, description="Port of the metrics/health HTTP server (0: any free).")
    health_heartbeat_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often the event loop proves it is alive to /healthz."
    )
    health_loop_stall_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="/healthz fails once the event loop has not run its heartbeat for this long (a wedged loop); "
        "must exceed health_heartbeat_interval_s.",
    )
    event_loop_probe_interval_s: float = Field(
        0.1,
        ge=0.01,
        le=10,
        description="How often a probe timer measures how late the event loop runs what it scheduled "
        "(fpolicyd_event_loop_lag_seconds: one observation per probe; always on, 0 is refused).",
    )
    event_loop_stall_warn_s: float = Field(
        0.5,
        gt=0,
        le=3600,
        description="A probe later than this writes an event_loop_stalled warning (lag_s, threshold_s), at most one "
        "line per log_rate_limit_interval_s.",
    )
    slo_ingestion_latency_s: float = Field(
        5.0,
        gt=0,
        description="Ingestion latency SLO target (GenerationTime to sink acknowledgement; reference: p99 < 5 s): "
        "events slower than this are counted in fpolicyd_ingestion_latency_slo_breaches_total.",
    )
    slo_reconnect_s: float = Field(
        30.0, gt=0, description="Reconnect SLO target (session lost to next NEGO_REQ of the same node and policy)."
    )
    slo_replay_completion_s: float = Field(
        300.0, gt=0, description="Replay completion SLO target (a reconnected node's backlog fully replayed)."
    )

    # --- ONTAP side (fpolicyd ontap plan/apply/repoint/status) -------------------------------------------
    ontap_url: str | None = Field(
        None, description="ONTAP cluster or SVM management address for the REST API, https://HOST (HTTPS only)."
    )
    ontap_username: str | None = Field(
        None, description="ONTAP REST user (vsadmin or a role with FPolicy rights); the secret's username wins."
    )
    ontap_password: SecretStr | None = Field(
        None,
        description="ONTAP REST password; set it as FPOLICYD_ONTAP_PASSWORD in the environment (never in a file) "
        "or use ontap_secret_id.",
    )
    ontap_secret_id: str | None = Field(
        None,
        description='AWS Secrets Manager secret (name or ARN) holding {"username": ..., "password": ...} for ONTAP; '
        "wins over ontap_password.",
    )
    ontap_ca_file: Path | None = Field(
        None, description="PEM CA bundle that signed the ONTAP management certificate (default: system CAs)."
    )
    ontap_verify_tls: bool = Field(
        True, description="Verify ONTAP's certificate; false is for labs only and is logged as a warning every time."
    )
    ontap_svm: str | None = Field(None, description="SVM (vserver) whose FPolicy objects fpolicyd manages.")
    ontap_policy_name: str = Field("fpolicyd", description="FPolicy policy name.")
    ontap_engine_name: str = Field("fpolicyd", description="FPolicy external engine name.")
    ontap_event_name: str = Field(
        "fpolicyd", description="FPolicy event name prefix; one event per protocol, named <prefix>_<protocol>."
    )
    ontap_protocols: Annotated[tuple[str, ...], NoDecode] = Field(
        ("cifs",), description="Protocols monitored: cifs, nfsv3, nfsv4 (NFSv4.2 is never monitored by ONTAP)."
    )
    ontap_file_operations: Annotated[tuple[str, ...], NoDecode] = Field(
        ("create", "create_dir", "write", "rename", "rename_dir", "delete", "delete_dir"),
        description="File operations of the events (ONTAP names; each must be valid for every protocol).",
    )
    ontap_volumes: Annotated[tuple[str, ...], NoDecode] = Field(
        ("*",), description="Policy scope: volumes included (* = all volumes of the SVM)."
    )
    ontap_mandatory: bool = Field(
        False, description="Policy is-mandatory: true denies client access when no FPolicy server answers."
    )
    ontap_policy_priority: int = Field(
        1, ge=1, le=10, description="Priority (sequence number) the policy is enabled with."
    )
    ontap_persistent_store: str | None = Field(
        None, description="FPolicy persistent store name (ONTAP 9.14.1+; async engine, non-mandatory policy only)."
    )
    ontap_persistent_store_volume: str | None = Field(
        None, description="Volume of the persistent store (an RW FlexVol with a junction path)."
    )
    ontap_server_address: str | None = Field(
        None,
        description="IP address ONTAP must connect to (the engine's primary server); default: this task's address "
        "from the ECS metadata endpoint, else the local address that routes to ontap_url.",
    )
    ontap_request_timeout_s: float = Field(30.0, gt=0, le=600, description="Timeout of one ONTAP REST request.")
    ontap_job_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="How long an asynchronous ONTAP job (HTTP 202) is polled before giving up."
    )
    ontap_job_poll_interval_s: float = Field(1.0, gt=0, le=60, description="Poll period of an ONTAP job.")
    ontap_enable_attempts: int = Field(
        3, ge=1, le=20, description="Attempts to (re-)enable the policy before reporting it left disabled."
    )
    ontap_retry_delay_s: float = Field(2.0, ge=0, le=60, description="Pause between attempts to enable the policy.")
    ontap_repoint_on_start: bool = Field(
        False,
        description="serve: once listening, point the ONTAP engine's primary_servers at this server "
        "(`fpolicyd ontap repoint`); a failure is logged as an error and the daemon keeps running.",
    )
    ontap_join_on_start: bool = Field(
        False,
        description="serve: once listening, `fpolicyd ontap join` (the other servers stay). Not with "
        "ontap_repoint_on_start.",
    )
    ontap_leave_on_stop: bool = Field(
        False, description="serve: `fpolicyd ontap leave` on a graceful stop, within ontap_leave_timeout_s."
    )
    ontap_leave_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Longest leave on stop; added to the stop, not taken from drain_timeout_s."
    )
    ontap_membership_attempts: int = Field(
        8, ge=1, le=50, description="join/leave/prune: attempts while other instances' changes win."
    )
    ontap_membership_backoff_s: float = Field(
        0.5, ge=0, le=60, description="join/leave/prune: retry n waits random [0, this x 2^(n-2)] s, 10 s at most."
    )
    ontap_membership_settle_s: float = Field(
        1.0, ge=0, le=60, description="join/leave/prune: read the change back at once and after this (0: once)."
    )
    ontap_prune_grace_s: float = Field(
        300.0, gt=0, le=30 * 86400, description="ontap prune: drop servers disconnected for longer than this."
    )

    # --- replay awareness (persistent-store replay, out-of-order, duplicates) ------------------------------
    replay_duplicate_window: int = Field(
        65_536,
        ge=1,
        le=10_000_000,
        description="Recent event ids remembered to count and flag duplicates (the last N to 2N; ~100 B each).",
    )
    replay_episode_idle_s: float = Field(
        2.0, gt=0, le=3600, description="A replay episode ends once no replayed notification arrived for this long."
    )
    replay_clock_tolerance_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="A notification is flagged replayed only if its GenerationTime (the node's clock) is more than "
        "this before its session's handshake (this host's clock); set it to the worst clock skew expected.",
    )
    replay_max_nodes: int = Field(
        4096, ge=1, le=1_000_000, description="Node/policy keys the replay tracker remembers (oldest idle forgotten)."
    )

    # --- routing ----------------------------------------------------------------------------------------
    routing_enabled: bool = Field(
        True, description="Match every event against the use-case routes (the matched names go to metadata.routes)."
    )
    routes_file: Path | None = Field(
        None,
        description="Use-case routes file (TOML; config/routes.toml is an editable copy); default: the 17 "
        "packaged reference routes. `fpolicyd routes check|export` read the same file.",
    )
    routes_strict: bool = Field(
        False, description="Strict ownership: only path prefixes route an event; suffixes are ignored."
    )
    unrouted_action: UnroutedAction = Field(
        UnroutedAction.DEFAULT_SINKS,
        description="An event no route matches: default_sinks (delivered to the default sinks) or audit "
        "(written to the JSON Lines directory <data_dir>/unrouted instead of the sinks).",
    )

    # --- data classification ----------------------------------------------------------------------------
    data_classification: DataClassification = Field(
        DataClassification.PROD,
        description="dev (nothing redacted), prod (logs: user identities masked, paths hashed) or regulated "
        "(logs: user identities removed, paths hashed); see classify_events for events and the audit ledger.",
    )
    classify_events: bool = Field(
        False,
        description="Also redact emitted events and the audit ledger per data_classification (prod: user "
        "identities removed; regulated: and paths hashed). Routing and settle still see the clear path.",
    )
    classification_salt: SecretStr | None = Field(
        None,
        description="Key for path hashing (HMAC-SHA256) so that a guessed path cannot be confirmed without it; "
        "pass it through the environment (FPOLICYD_CLASSIFICATION_SALT), not the file.",
    )

    # --- dedup (idempotency) ----------------------------------------------------------------------------
    dedup_mode: DedupMode = Field(
        DedupMode.exact,
        description="off | exact (same event_id = same ONTAP notification; a genuine rewrite is never "
        "suppressed) | window (per use case: same path and operation within the window; HYBRID deployments).",
    )
    dedup_exact_ttl_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="How long a claim is remembered (exact mode; window claims are kept at least this long too, "
        "for late replays). The embedded store's size limit may forget sooner.",
    )
    dedup_window_overrides: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Window mode: use case -> window in minutes (default dedup_window_minutes; 0 = exact mode "
        "for that use case).",
    )
    dedup_backend: DedupBackend = Field(
        DedupBackend.embedded,
        description="embedded (one instance: exact mode is checked by the reader against an in-memory window "
        "kept on disk in a journal; window mode uses a local SQLite file) | dynamodb (shared by several instances).",
    )
    dedup_dir: Path | None = Field(
        None, description="Embedded dedup directory (journal of the exact window, SQLite store); <data_dir>/dedup."
    )
    dedup_embedded_max_entries: int = Field(
        1_000_000,
        ge=1,
        description="Claims the embedded backend keeps. Exact mode: keys held in memory by the reader (~110 B "
        "each; 1,000,000 ≈ 110 MiB) and 24 B each in the journal; the oldest go first. Window mode: rows of the "
        "SQLite store (~210 B on disk each); expired ones are evicted first, then the least recently written.",
    )
    dedup_journal_segment_claims: int = Field(
        262_144,
        ge=1024,
        description="Claims per file of the exact window's journal (24 B each); a file is removed once none of "
        "its claims can still be in the window.",
    )
    dedup_dynamodb_table: str | None = Field(
        None, description="DynamoDB table (keys pk, sk: strings; TTL attribute ttl) of the dynamodb backend."
    )
    dedup_dynamodb_max_in_flight: int = Field(
        16, ge=1, le=256, description="Conditional PutItem requests in flight per dedup batch."
    )
    dedup_dynamodb_retries: int = Field(
        3, ge=0, le=20, description="Retries of a failed DynamoDB request (capped backoff) before the failure mode."
    )
    dedup_failure_mode: DedupFailureMode = Field(
        DedupFailureMode.open,
        description="When the dedup store fails (after dedup_dynamodb_retries): open (deliver unchecked; duplicates "
        "possible; each one in the audit ledger as error_open) | closed (hold the events in the spool and retry; "
        "delivery waits for the store, /readyz fails meanwhile; nothing is lost, spool back-pressure applies). "
        "A request DynamoDB refuses as malformed (ValidationException) can never be judged: delivered in both.",
    )
    dedup_closed_retry_max_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Fail-closed: longest wait between two attempts at a batch the dedup store could not judge "
        "(capped full-jitter backoff from 0.1 s); the longest a recovered store can wait to be asked again.",
    )
    dedup_ledger_dir: Path | None = Field(
        None,
        description="Audit ledger of suppressed duplicates and fail-open decisions (JSON Lines); "
        "default <data_dir>/ledger.",
    )

    @model_validator(mode="after")
    def _check_dedup(self) -> Settings:
        if (
            self.dedup_mode is not DedupMode.off
            and self.dedup_backend is DedupBackend.dynamodb
            and not self.dedup_dynamodb_table
        ):
            raise ValueError("dedup_backend is dynamodb but dedup_dynamodb_table is empty")
        return self

    @property
    def effective_dedup_dir(self) -> Path:
        return self.dedup_dir if self.dedup_dir is not None else self.data_dir / "dedup"

    @property
    def reader_dedup(self) -> bool:
        """Exact dedup with the embedded backend is checked by the reader (pipeline/ingest.py), not the stage."""
        return self.dedup_mode is DedupMode.exact and self.dedup_backend is DedupBackend.embedded

    @property
    def effective_dedup_ledger_dir(self) -> Path:
        return self.dedup_ledger_dir if self.dedup_ledger_dir is not None else self.data_dir / "ledger"

    def dedup_policy(self) -> DedupPolicy:
        """The dedup policy (window lengths in seconds)."""
        return DedupPolicy(
            mode=self.dedup_mode,
            exact_ttl_s=self.dedup_exact_ttl_s,
            window_s=self.dedup_window_minutes * 60.0,
            window_overrides_s={k: v * 60.0 for k, v in self.dedup_window_overrides.items()},
        )

    def dedup_ledger_files(self) -> JsonlSettings:
        """The audit ledger's files (``storage.ledger.AuditLedger``): directory ``dedup_ledger_dir``; rotation as
        ``jsonl_max_file_*``; every batch fsynced unless ``jsonl_fsync`` is ``never``."""
        never = self.jsonl_fsync is FsyncPolicy.never
        return JsonlSettings(
            directory=self.effective_dedup_ledger_dir,
            prefix=LEDGER_PREFIX,
            max_file_bytes=self.jsonl_max_file_bytes,
            max_file_age_s=self.jsonl_max_file_age_s,
            fsync=FsyncPolicy.never if never else FsyncPolicy.always,
        )

    # --- protobuf mode and wire capture -------------------------------------------------------------------
    capture_enabled: bool = Field(
        False,
        description="Record the first bytes/frames of every connection as JSON Lines (hex + timestamps) under "
        "capture_dir; `fpolicyd capture decode FILE` reads them. For handing over a real protobuf capture.",
    )
    capture_dir: Path | None = Field(None, description="Where captures are written; default <data_dir>/capture.")
    capture_max_bytes_per_connection: int = Field(
        64 << 10, ge=1, le=64 << 20, description="Received bytes recorded per connection, at most."
    )
    capture_max_frames_per_connection: int = Field(
        200, ge=1, le=1_000_000, description="Frames (or raw chunks) recorded per connection, at most."
    )
    capture_max_total_bytes: int = Field(
        64 << 20, ge=1024, description="Bytes of capture files this process writes in total; then capture stops."
    )

    @field_validator("protobuf_framing_mode", mode="before")
    @classmethod
    def _reference_framing(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        key = value.strip().lower().replace("-", "_")
        if key == "frameless":
            raise ValueError(
                "FRAMELESS (unframed protobuf) cannot be split into messages; use auto, length-prefixed or "
                "varint-delimited"
            )
        if key in _FRAMING_NAMES:
            return _FRAMING_NAMES[key]
        names = ", ".join(f.value for f in ProtobufFraming)
        raise ValueError(f"{value!r} is not a protobuf framing; one of {names} (or AUTO_DETECT, LENGTH_PREFIXED)")

    @property
    def frame_reader(self) -> str:
        """The frame reader of the listener (a :class:`fpolicyd.protocol.readers.ReaderName` value)."""
        if self.fpolicy_format is EngineFormat.XML:
            return "xml"
        if self.fpolicy_format is EngineFormat.AUTO or self.protobuf_framing_mode is ProtobufFraming.AUTO:
            return "auto"
        return f"protobuf-{self.protobuf_framing_mode.value}"

    @property
    def effective_capture_dir(self) -> Path:
        return self.capture_dir if self.capture_dir is not None else self.data_dir / "capture"

    # --- processing stage (route, settle, dedup; server/processing.py) --------------------------------------
    processor_batch_records: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Spool records the processing stage routes, settles and dedups per round (one dedup batch, "
        "one durable append).",
    )

    # --- settle (file readiness) ---
    settle_strategy: SettleStrategy = Field(
        SettleStrategy.QUIET,
        description="When a held path is ready: quiet (no event for write_complete_delay_s) | rename_commit (a "
        "rename moves it to its final name; one event for the new path) | marker (a marker file such as X.done "
        "or _SUCCESS appears). Settle is on when write_complete_delay_s > 0.",
    )
    settle_max_hold_s: float = Field(
        300.0,
        gt=0,
        description="Longest a path is held, from its first event, whatever the strategy: a path that never goes "
        "quiet (or never gets its rename or marker) is emitted anyway, so the spool cursor is never held longer.",
    )
    settle_marker_names: Annotated[tuple[str, ...], NoDecode] = Field(
        (".done", "_SUCCESS"),
        description="Marker files of the marker strategy (comma-separated in the environment): a name starting "
        "with '.' is a suffix (X.done releases X), any other a directory marker (_SUCCESS releases what is held "
        "under its directory, at any depth).",
    )
    settle_cancel_on_delete: bool = Field(
        True,
        description="A delete of a held path cancels what was held: only the delete is emitted, its "
        "metadata.settle counting and listing the cancelled events. false: the held event goes out first.",
    )
    settle_operations: Annotated[tuple[str, ...], NoDecode] = Field(
        ("create", "write"),
        description="Operation types held by settle (comma-separated in the environment); never delete or "
        "rename, which cancel, commit or release a held path.",
    )
    settle_overrides: dict[str, float | SettleOverride] = Field(
        default_factory=dict,
        description='Settle per route and operation: keys "ROUTE", "ROUTE:OP" or "*:OP"; value a window in '
        "seconds (0 = off) or a table of window_s, max_hold_s, strategy, marker_names, cancel_on_delete, "
        "operations. Precedence ROUTE:OP > ROUTE > *:OP > the settle_* settings; an event of several routes "
        "takes the most patient policy. Environment: a JSON object.",
    )
    settle_max_pending: int = Field(
        200_000,
        ge=1,
        description="Most paths held at once (memory: the last event of each plus ~0.6 KB, so ~2-3 KB a path); "
        "beyond it the oldest held path is emitted early and counted, never dropped.",
    )

    @model_validator(mode="after")
    def _check_settle(self) -> Settings:
        try:
            self.settle_config()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    # --- runtime ------------------------------------------------------------------------------------------
    delivery_process: DeliveryProcess = Field(
        DeliveryProcess.auto,
        description="auto | on | off: run the sinks in a second process (the daemon then reads, decodes and stores "
        "on one core while the sinks deliver on another; acks come back to the daemon, which owns the spool). "
        "auto: on when this process may use two or more CPUs.",
    )
    delivery_processes: int = Field(
        1,
        ge=1,
        le=16,
        description="Delivery processes when the sinks run in a process of their own (delivery_process). Above 1, "
        "each SQS standard-queue and EventBridge sink is shared among them by blocks of records (one read's "
        "worth), so one sink can use several cores; JSON Lines, stdout and FIFO sinks keep their order in the "
        "first process. Acks, metrics and the drain are the daemon's, over all of them.",
    )
    gc_young_threshold: int = Field(
        10_000,
        ge=0,
        description="Allocations between two young-generation garbage collections (CPython's default is 700; "
        "0 keeps it). Fewer collections cost less CPU per event; memory is unchanged (benchmarks/bench_ingest.py).",
    )

    log_level: str = Field("info", description="debug | info | warning | error")
    log_format: LogFormat = Field(
        LogFormat.AUTO,
        description="auto (console lines when stderr is a terminal, JSON lines otherwise), json or console.",
    )

    @field_validator(
        "preferred_versions",
        "sinks",
        "allowed_networks",
        "ontap_protocols",
        "ontap_file_operations",
        "ontap_volumes",
        "settle_marker_names",
        "settle_operations",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: object) -> object:
        """A list setting given as one string (environment, flag) is comma-separated."""
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("path_max_chars")
    @classmethod
    def _check_path_max_chars(cls, value: int) -> int:
        if 0 < value < PATH_MAX_CHARS_MIN:
            raise ValueError(
                f"path_max_chars must be 0 (keep paths whole) or at least {PATH_MAX_CHARS_MIN} (room for the "
                f"head, the '…[sha256:…]…' marker and the last {PATH_TAIL_CHARS} characters)"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.lower()
        if level not in ("debug", "info", "warning", "error"):
            raise ValueError("must be one of debug, info, warning, error")
        return level

    @field_validator("sinks")
    @classmethod
    def _check_sinks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for uri in value:
            scheme, sep, _ = uri.partition(":")
            if not sep or scheme not in SINK_SCHEMES:
                raise ValueError(f"{uri!r}: a sink is one of {', '.join(s + ':' for s in SINK_SCHEMES)}")
        return value

    @field_validator("allowed_networks", mode="after")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"{network!r} is not an IP network or address ({exc})") from None
        return value

    @model_validator(mode="after")
    def _check_dead_letter(self) -> Settings:
        try:
            self.dead_letter_limits()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _check_delivery_processes(self) -> Settings:
        if self.delivery_processes > 1 and self.delivery_process is DeliveryProcess.off:
            raise ValueError(
                f"delivery_processes = {self.delivery_processes} needs delivery_process on or auto (it is off: the "
                "sinks run in the daemon's own process)"
            )
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if self.tls_mode is TlsMode.OFF:
            return self
        if self.tls_cert_file is None or self.tls_key_file is None:
            raise ValueError(f"tls_mode {self.tls_mode.value} needs tls_cert_file and tls_key_file")
        if self.tls_mode is TlsMode.MUTUAL_AUTH and self.tls_client_ca_file is None:
            raise ValueError("tls_mode mutual_auth needs tls_client_ca_file (the CA of ONTAP's client certificates)")
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        SessionConfig(
            engine_mode=self.engine_mode,
            max_outstanding=self.sync_max_outstanding_requests,
            preferred_versions=self.preferred_versions,
            handshake_timeout_s=self.handshake_timeout_s,
            keep_alive_interval_s=self.keep_alive_interval_s,
            idle_timeout_s=self.effective_idle_timeout_s,
        )
        if self.ontap_repoint_on_start and self.ontap_join_on_start:
            raise ValueError(
                "ontap_repoint_on_start and ontap_join_on_start exclude each other: repoint makes this server the "
                "engine's only one (single instance), join adds it to the others (several instances); choose one"
            )
        if self.realtime and not self.sqs_queue_url:
            raise ValueError("mode (MODE) is realtime but sqs_queue_url (SQS_QUEUE_URL) is empty")
        if self.sqs_pack_bytes and not SQS_PACK_MIN_BYTES <= self.sqs_pack_bytes <= self.sqs_max_batch_bytes:
            raise ValueError(
                f"sqs_pack_bytes must be 0 (off) or {SQS_PACK_MIN_BYTES}..sqs_max_batch_bytes "
                f"({self.sqs_max_batch_bytes}): a packed message must hold an event and fit a SendMessageBatch, "
                f"got {self.sqs_pack_bytes}"
            )
        if not (
            self.spool_segment_bytes
            <= self.backpressure_low_bytes
            < self.backpressure_high_bytes
            < self.backpressure_pause_bytes
            < self.spool_max_bytes
        ):
            raise ValueError(
                "spool sizes must satisfy spool_segment_bytes <= backpressure_low_bytes < backpressure_high_bytes"
                " < backpressure_pause_bytes < spool_max_bytes (the active segment is never removed, so a low"
                " watermark below one segment could never be reached; reading paused at backpressure_pause_bytes"
                " resumes under backpressure_high_bytes, so they must differ)"
            )
        if self.spool_max_bytes - self.backpressure_pause_bytes < 2 * self.spool_segment_bytes:
            raise ValueError(
                "spool_max_bytes - backpressure_pause_bytes must be at least two spool segments "
                f"(2 x spool_segment_bytes = {2 * self.spool_segment_bytes}), got "
                f"{self.spool_max_bytes - self.backpressure_pause_bytes}: past the pause watermark the processing "
                "stage still turns raw records into processed ones, and space frees only once it has finished a "
                "segment and the sinks have passed it, so a smaller gap can leave it no room to finish one"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _EnvSource(settings_cls), _TomlSource(settings_cls))

    # --- derived ----------------------------------------------------------------------------------------

    @property
    def realtime(self) -> bool:
        return (self.mode or "").strip().lower() == "realtime"

    @property
    def effective_idle_timeout_s(self) -> float:
        if self.idle_timeout_s is not None:
            return self.idle_timeout_s
        return MIN_IDLE_FACTOR * self.keep_alive_interval_s

    @property
    def effective_sinks(self) -> tuple[str, ...]:
        if self.sinks:
            return self.sinks
        bus = (f"eventbridge:{self.event_bus_name}",) if self.event_bus_name else ()
        if self.realtime:
            return (f"sqs:{self.sqs_queue_url}", *bus)
        if self.log_dir is not None:
            return (f"jsonl:{self.log_dir}", *bus)
        return (f"jsonl:{self.data_dir / 'events'}", *bus)

    @property
    def effective_spool_dir(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    @property
    def effective_dead_letter_dir(self) -> Path:
        return self.dead_letter_dir if self.dead_letter_dir is not None else self.data_dir / "dead-letter"

    @property
    def dead_letter_file(self) -> Path:
        """The active dead-letter file (rotated ones beside it)."""
        return self.effective_dead_letter_dir / DEAD_LETTER_FILE_NAME

    def dead_letter_limits(self) -> DeadLetterLimits:
        """The ``dead_letter_*`` cap and sample; raises ConfigError when they do not fit together."""
        return DeadLetterLimits(
            max_bytes=self.dead_letter_max_bytes,
            max_files=self.dead_letter_max_files,
            pre_handshake_sample_bytes=self.dead_letter_pre_handshake_sample_bytes,
            log_interval_s=self.dead_letter_log_interval_s,
        )

    def redactor(self) -> Redactor:
        salt = self.classification_salt.get_secret_value().encode() if self.classification_salt else None
        return Redactor(level=self.data_classification, salt=salt, classify_events=self.classify_events)

    def sink_options(self) -> SinkOptions:
        """What :func:`fpolicyd.sinks.factory.build_senders` takes of these settings."""
        from fpolicyd.sinks.factory import SinkOptions  # noqa: PLC0415 - the factory loads botocore; this module must not

        return SinkOptions(
            sinks=self.effective_sinks,
            batch_max_bytes=self.batch_max_bytes,
            jsonl_max_file_bytes=self.jsonl_max_file_bytes,
            jsonl_max_file_age_s=self.jsonl_max_file_age_s,
            jsonl_fsync=self.jsonl_fsync,
            jsonl_fsync_interval_s=self.jsonl_fsync_interval_s,
            sqs_group_id_field=self.sqs_group_id_field,
            sqs_max_batch_bytes=self.sqs_max_batch_bytes,
            sqs_pack_bytes=self.sqs_pack_bytes,
            sqs_pack_compression=self.sqs_pack_compression,
            eventbridge_source=self.eventbridge_source,
            eventbridge_detail_type=self.eventbridge_detail_type,
            eventbridge_max_batch_bytes=self.eventbridge_max_batch_bytes,
            eventbridge_max_entry_bytes=self.eventbridge_max_entry_bytes,
            sink_max_in_flight=self.sink_max_in_flight,
            sink_linger_s=self.sink_linger_s,
        )

    def settle_config(self) -> SettleConfig:
        """The settle stage's configuration (``write_complete_delay_s``, ``settle_*``); raises ConfigError."""
        default = SettlePolicy(
            window_s=self.write_complete_delay_s,
            max_hold_s=self.settle_max_hold_s,
            strategy=self.settle_strategy,
            marker_names=tuple(self.settle_marker_names),
            cancel_on_delete=self.settle_cancel_on_delete,
            operations=frozenset(self.settle_operations),
        )
        overrides = {
            parse_override_key(key): value
            if isinstance(value, SettleOverride)
            else SettleOverride.model_validate({"window_s": value})
            for key, value in self.settle_overrides.items()
        }
        return SettleConfig(default, overrides)

    def replay_config(self) -> ReplayConfig:
        """The replay tracker's configuration (``replay_*``)."""
        return ReplayConfig(
            duplicate_window=self.replay_duplicate_window,
            episode_idle_s=self.replay_episode_idle_s,
            clock_tolerance_us=round(self.replay_clock_tolerance_s * 1_000_000),
            max_nodes=self.replay_max_nodes,
        )

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            engine_mode=self.engine_mode,
            max_outstanding=self.sync_max_outstanding_requests,
            preferred_versions=self.preferred_versions,
            handshake_timeout_s=self.handshake_timeout_s,
            keep_alive_interval_s=self.keep_alive_interval_s,
            idle_timeout_s=self.effective_idle_timeout_s,
        )


def find_config_file(explicit: Path | None) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"--config {explicit}: no such file")
        return explicit
    return next((path for path in DEFAULT_CONFIG_PATHS if path.is_file()), None)


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    search_default_paths: bool = True,
) -> Settings:
    """Build the settings; any problem becomes a :class:`ConfigError` that names the key."""
    path = find_config_file(config_file) if search_default_paths or config_file else None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    inline_keys: frozenset[str] = frozenset()
    inline = os.environ.get(SETTINGS_TOML_ENV)
    if inline:
        try:
            inline_data = tomllib.loads(inline)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{SETTINGS_TOML_ENV}: {exc}") from None
        data.update(inline_data)
        inline_keys = frozenset(inline_data)
    unknown_env = sorted(
        name
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in (SETTINGS_TOML_ENV, FSYNC_EIO_AFTER_ENV)  # the latter: test-only, storage/faults.py
        and name.upper()[len(ENV_PREFIX) :].lower() not in Settings.model_fields
    )
    if unknown_env:
        raise ConfigError("; ".join(_unknown_env(name) for name in unknown_env))
    flags = dict(overrides or {})
    origins: dict[str, tuple[str, str]] = {}
    token, origins_token = _toml_data.set(data), _env_origins.set(origins)
    try:
        return Settings(**flags)
    except ValidationError as exc:
        sources = _Sources(file=path, flags=frozenset(flags), environment=origins, inline=inline_keys)
        raise ConfigError(_describe(exc, sources)) from None
    finally:
        _toml_data.reset(token)
        _env_origins.reset(origins_token)


def _unknown_env(name: str) -> str:
    known = [f"{ENV_PREFIX}{field.upper()}" for field in Settings.model_fields]
    return f"unknown environment variable {name}{did_you_mean(name.upper(), known)}"


#: Fields whose value is never shown in an error (pydantic's SecretStr: passwords, salts).
SECRET_FIELDS: Final = frozenset(
    name for name, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation)
)


@dataclass(frozen=True, slots=True)
class _Sources:
    """Where each field's value came from, by precedence: flags > environment > inline TOML > file."""

    file: Path | None
    flags: frozenset[str]
    environment: Mapping[str, tuple[str, str]]
    inline: frozenset[str]


def _strip_pydantic(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _describe(exc: ValidationError, sources: _Sources) -> str:
    """One line per error, naming what the user wrote: the unknown key (with the closest setting), or the flag,
    environment variable (its name as set: ``FPOLICY_PORT``) or file key and the value given (hidden for
    secrets). Errors of a combination of settings (no single key) are the validator's own sentence."""
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        message = _strip_pydantic(error["msg"])
        if not loc:
            lines.append(message)
            continue
        field = str(loc[0])
        key = ".".join(str(part) for part in loc)
        if error["type"] == "extra_forbidden":
            where = SETTINGS_TOML_ENV if field in sources.inline else sources.file
            suffix = f" in {where}" if where is not None else ""
            lines.append(f"unknown setting {field!r}{suffix}{did_you_mean(field, list(Settings.model_fields))}")
            continue
        secret = field in SECRET_FIELDS
        if field in sources.flags:
            shown = "<hidden>" if secret else repr(error.get("input"))
            lines.append(f"--{field.replace('_', '-')} {shown} ({key}): {message}")
        elif field in sources.environment:
            var, raw = sources.environment[field]
            shown = "<hidden>" if secret else repr(raw)
            lines.append(f"{var}={shown} (setting {key}): {message}")
        elif field in sources.inline or sources.file is not None:
            where = SETTINGS_TOML_ENV if field in sources.inline else str(sources.file)
            shown = "<hidden>" if secret else repr(error.get("input"))
            lines.append(f"{key} = {shown} in {where}: {message}")
        else:
            lines.append(f"{key}: {message}")
    if len(lines) == 1:
        return lines[0]
    return "invalid settings:\n  " + "\n  ".join(lines)


def environment_aliases() -> dict[str, str]:
    """Reference-server variable -> field, for documentation and ``--help``."""
    return {var: field for field, names in REFERENCE_ENV.items() for var in names}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + " }"
    if isinstance(value, StrEnum):
        return f'"{value.value}"'
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def example_toml() -> str:
    """The documented settings file, generated from :class:`Settings` (config/fpolicyd.example.toml)."""
    lines = [
        "# fpolicyd settings: every key, its meaning and its default. Generated by `fpolicyd config example`;",
        "# edit a copy. Precedence: command-line flags > environment (FPOLICYD_<KEY>) > this file > defaults.",
        "",
    ]
    aliases = {field: env for env, field in environment_aliases().items()}
    for name, info in Settings.model_fields.items():
        lines.append(f"# {info.description}")
        if name in aliases:
            lines.append(f"# Environment: {ENV_PREFIX}{name.upper()} or {aliases[name]}.")
        default = info.get_default(call_default_factory=True)
        if default is None:
            lines.append(f"# {name} =")
        else:
            lines.append(f"{name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)
