"""The closed label sets of the daemon's metrics, from the enums of the packages that own them.

obs is a leaf (it imports none of these packages): :class:`~fpolicyd.obs.metrics.Metrics` is given them here,
where the daemon builds it, and exports each of their series before anything happens (zero until seen).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

from fpolicyd.obs.metrics import MetricLabels
from fpolicyd.pipeline.backpressure import Pressure
from fpolicyd.pipeline.disk import Writer, sink_writer
from fpolicyd.protocol.messages import NotfType
from fpolicyd.protocol.req_types import Operation
from fpolicyd.protocol.session import STATUS_ANSWERS, NoticeKind
from fpolicyd.server.budget import Refusal
from fpolicyd.server.tls_failures import TlsFailure

#: Session notices that are exactly one received frame of a type (``frames by type`` is derived from them).
_FRAME_NOTICES: Final[dict[str, str]] = {
    NoticeKind.HANDSHAKE: NotfType.NEGO_REQ,
    NoticeKind.KEEP_ALIVE: NotfType.KEEP_ALIVE,
    NoticeKind.ALERT: NotfType.ALERT_MSG,
    NoticeKind.CANCEL: NotfType.SCREEN_CANCEL,
    NoticeKind.STATUS_QUERY: NotfType.STATUS_QUERY_REQ,
    NoticeKind.VOLUME: NotfType.VOL_NOTFICATION,
    NoticeKind.OUTAGE: NotfType.OUTAGE_MSG,
    NoticeKind.UNKNOWN_TYPE: "unknown",
    NoticeKind.UNEXPECTED_DIRECTION: "unexpected",
}

METRIC_LABELS: Final = MetricLabels(
    refusals=tuple(refusal.value for refusal in Refusal),
    tls_failures=tuple(failure.value for failure in TlsFailure),
    operations=tuple(operation.value for operation in Operation),
    screen_request=NotfType.SCREEN_REQ.value,
    frame_notices=MappingProxyType({str(kind): str(frame) for kind, frame in _FRAME_NOTICES.items()}),
    status_answers=tuple(STATUS_ANSWERS.values()),
    pressures=tuple(pressure.value for pressure in Pressure),
    writers=tuple(writer.value for writer in Writer),
    sink_writer=sink_writer,
)
