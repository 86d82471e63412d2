"""The timeline of a ``fpolicyd replay-test`` run (``--plot``) and its plot: a self-contained HTML page of inline
SVG (no script, no network, no library), pure: points in, text out.

A :class:`TimelinePoint` covers one sampling interval: what the nodes sent and what first arrived at the sink in
it, and the sink-arrival latency percentiles of the notifications that arrived in it. At most
:data:`MAX_TIMELINE_POINTS` are kept: past that, :func:`downsample` merges adjacent pairs (counts add up exactly;
the merged latency percentiles are approximations: p50 the count-weighted mean of the two, p99 and max the larger).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "MAX_TIMELINE_POINTS",
    "Phase",
    "TimelinePoint",
    "downsample",
    "merge",
    "plot_html",
    "points_from_json",
    "render_html",
    "timeline_json",
]

#: Points a timeline keeps at most (adjacent points are merged pairwise past it): ~20 minutes at 1 s, a few
#: hundred kilobytes of HTML.
MAX_TIMELINE_POINTS: Final = 1000


class Phase(StrEnum):
    """What the run was doing at the end of an interval."""

    LIVE = "live"
    OUTAGE = "outage"
    REPLAY = "replay"
    #: The nodes are done; waiting for the sink to hold everything.
    SETTLE = "settle"


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """One sampling interval, seconds since the start of the run."""

    start_s: float
    end_s: float
    phase: Phase
    #: Frames the nodes wrote in the interval (duplicates and resends included).
    sent: int
    #: Notifications (distinct event ids) that first arrived at the sink in the interval.
    delivered: int
    #: Sink-arrival latencies measured in the interval (live notifications only) and their percentiles, ms.
    latency_count: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end_s - self.start_s)


def merge(a: TimelinePoint, b: TimelinePoint) -> TimelinePoint:
    """Two adjacent points as one: counts added; the phase of the longer; latency approximated (module doc)."""
    count = a.latency_count + b.latency_count
    p50 = (a.p50_ms * a.latency_count + b.p50_ms * b.latency_count) / count if count else 0.0
    return TimelinePoint(
        start_s=a.start_s,
        end_s=b.end_s,
        phase=a.phase if a.duration_s >= b.duration_s else b.phase,
        sent=a.sent + b.sent,
        delivered=a.delivered + b.delivered,
        latency_count=count,
        p50_ms=p50,
        p99_ms=max(a.p99_ms, b.p99_ms),
        max_ms=max(a.max_ms, b.max_ms),
    )


def downsample(points: Sequence[TimelinePoint], cap: int = MAX_TIMELINE_POINTS) -> list[TimelinePoint]:
    """At most ``cap`` points: adjacent pairs merged (as often as needed), order and totals kept."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1 (got {cap})")
    out = list(points)
    while len(out) > cap:
        out = [merge(out[i], out[i + 1]) if i + 1 < len(out) else out[i] for i in range(0, len(out), 2)]
    return out


def timeline_json(points: Sequence[TimelinePoint]) -> list[dict[str, Any]]:
    """The report's ``timeline``: readable rounded numbers, with running totals."""
    out: list[dict[str, Any]] = []
    sent_total = delivered_total = 0
    for p in points:
        sent_total += p.sent
        delivered_total += p.delivered
        out.append(
            {
                "start_s": round(p.start_s, 3),
                "end_s": round(p.end_s, 3),
                "phase": p.phase.value,
                "sent": p.sent,
                "delivered": p.delivered,
                "sent_total": sent_total,
                "delivered_total": delivered_total,
                "latency_ms": {
                    "count": p.latency_count,
                    "p50": round(p.p50_ms, 3),
                    "p99": round(p.p99_ms, 3),
                    "max": round(p.max_ms, 3),
                },
            }
        )
    return out


def points_from_json(timeline: Sequence[dict[str, Any]]) -> list[TimelinePoint]:
    """The inverse of :func:`timeline_json` (to the rounding)."""
    return [
        TimelinePoint(
            start_s=float(item["start_s"]),
            end_s=float(item["end_s"]),
            phase=Phase(item["phase"]),
            sent=int(item["sent"]),
            delivered=int(item["delivered"]),
            latency_count=int(item["latency_ms"]["count"]),
            p50_ms=float(item["latency_ms"]["p50"]),
            p99_ms=float(item["latency_ms"]["p99"]),
            max_ms=float(item["latency_ms"]["max"]),
        )
        for item in timeline
    ]


# ------------------------------------------------------------------------------------------------ rendering

_WIDTH: Final = 960
_HEIGHT: Final = 240
_LEFT: Final = 80
_RIGHT: Final = 150
_TOP: Final = 28
_BOTTOM: Final = 44
_PHASE_FILL: Final = {
    Phase.LIVE: "#e6f4e6",
    Phase.OUTAGE: "#f8d7d7",
    Phase.REPLAY: "#dbe8f8",
    Phase.SETTLE: "#eeeeee",
}
_STYLE: Final = (
    "body{font-family:sans-serif;margin:16px;color:#222}h1{font-size:16px}svg{display:block;margin-bottom:12px}"
    "text{font-size:11px;fill:#333}.title{font-size:13px;font-weight:bold}.axis{stroke:#555;stroke-width:1}"
    ".grid{stroke:#ddd;stroke-width:1}.line{fill:none;stroke-width:1.6}"
)

Series = tuple[str, str, list[list[tuple[float, float]]]]
"""(label, colour, segments of (x, y) data points)."""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float) -> str:
    """A coordinate: two decimals, no exponent."""
    return f"{value:.2f}"


def _ticks(top: float, bottom: float = 0.0) -> list[float]:
    """Round steps (1, 2 or 5 × 10^k) from at most ``bottom`` up to at least ``top``."""
    span = top - bottom
    if not (math.isfinite(span) and span > 0):
        return [bottom, bottom + 1.0]
    raw = span / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(bottom / step + 1e-9)
    last = math.ceil(top / step - 1e-9)
    return [round(i * step, 9) for i in range(first, last + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}"


def _chart(
    *,
    title: str,
    y_label: str,
    points: Sequence[TimelinePoint],
    series: Sequence[Series],
    x_range: tuple[float, float],
) -> str:
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    y_top = max((y for _label_, _colour, segments in series for seg in segments for _x, y in seg), default=0.0)
    y_ticks = _ticks(y_top)
    x_ticks = _ticks(x_range[1], x_range[0])
    x_low, x_span = x_ticks[0], x_ticks[-1] - x_ticks[0]
    y_span = y_ticks[-1] or 1.0

    def sx(x: float) -> float:
        return _LEFT + plot_w * (x - x_low) / x_span

    def sy(y: float) -> float:
        return _TOP + plot_h * (1 - y / y_span)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="{_esc(title)}">',
        f'<text class="title" x="{_LEFT}" y="16">{_esc(title)}</text>',
    ]
    for phase, start, end in _phase_spans(points):
        x0, x1 = sx(start), sx(end)
        parts.append(
            f'<rect class="phase" x="{_num(x0)}" y="{_TOP}" width="{_num(max(0.0, x1 - x0))}" height="{plot_h}" '
            f'fill="{_PHASE_FILL[phase]}"><title>{_esc(phase.value)}</title></rect>'
        )
        if x1 - x0 > 40:
            parts.append(f'<text x="{_num(x0 + 3)}" y="{_TOP + 12}">{_esc(phase.value)}</text>')
    for y in y_ticks:
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{_num(sy(y))}" y2="{_num(sy(y))}"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{_num(sy(y) + 4)}" text-anchor="end">{_esc(_label(y))}</text>')
    for x in x_ticks:
        parts.append(
            f'<line class="axis" x1="{_num(sx(x))}" x2="{_num(sx(x))}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h + 4}"/>'
        )
        parts.append(f'<text x="{_num(sx(x))}" y="{_TOP + plot_h + 16}" text-anchor="middle">{_esc(_label(x))}</text>')
    parts.append(f'<line class="axis" x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}"/>')
    parts.append(f'<line class="axis" x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{_TOP + plot_h}"/>')
    parts.append(
        f'<text x="{_LEFT + plot_w / 2}" y="{_HEIGHT - 8}" text-anchor="middle">'
        "time since the start of the run (s)</text>"
    )
    parts.append(
        f'<text x="14" y="{_TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {_TOP + plot_h / 2})">{_esc(y_label)}</text>'
    )
    for index, (label, colour, segments) in enumerate(series):
        for segment in segments:
            coords = " ".join(f"{_num(sx(x))},{_num(sy(y))}" for x, y in segment)
            parts.append(f'<polyline class="line" stroke="{colour}" points="{coords}"/>')
        legend_y = _TOP + 14 + 16 * index
        legend_x = _LEFT + plot_w + 12
        parts.append(
            f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{legend_x + 24}" y="{legend_y}">{_esc(label)}</text>')
    if not points:
        parts.append(f'<text x="{_LEFT + plot_w / 2}" y="{_TOP + plot_h / 2}" text-anchor="middle">no samples</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _phase_spans(points: Sequence[TimelinePoint]) -> list[tuple[Phase, float, float]]:
    spans: list[tuple[Phase, float, float]] = []
    for p in points:
        if spans and spans[-1][0] is p.phase:
            spans[-1] = (p.phase, spans[-1][1], p.end_s)
        else:
            spans.append((p.phase, p.start_s, p.end_s))
    return spans


def _steps(points: Sequence[TimelinePoint], value: Callable[[TimelinePoint], float]) -> list[list[tuple[float, float]]]:
    """A step line: each point's value held over its interval."""
    line: list[tuple[float, float]] = []
    for p in points:
        line.extend(((p.start_s, value(p)), (p.end_s, value(p))))
    return [line] if line else []


def _rate(count: int, p: TimelinePoint) -> float:
    return count / p.duration_s if p.duration_s > 0 else 0.0


def _cumulative(
    points: Sequence[TimelinePoint], value: Callable[[TimelinePoint], int]
) -> list[list[tuple[float, float]]]:
    if not points:
        return []
    total = 0
    line = [(points[0].start_s, 0.0)]
    for p in points:
        total += value(p)
        line.append((p.end_s, float(total)))
    return [line]


def _latency(
    points: Sequence[TimelinePoint], value: Callable[[TimelinePoint], float]
) -> list[list[tuple[float, float]]]:
    """At each interval's middle; broken where an interval measured nothing."""
    segments: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []
    for p in points:
        if p.latency_count:
            current.append(((p.start_s + p.end_s) / 2, value(p)))
        elif current:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return [s if len(s) > 1 else [s[0], s[0]] for s in segments]


def render_html(points: Sequence[TimelinePoint], *, title: str, verdict: str) -> str:
    """The page: a title line (``title``, ``verdict``) and three charts over time: send and sink-arrival rates,
    cumulative sent and delivered, sink-arrival latency p50/p99; phases shaded. Well-formed XML throughout."""
    x_range = (points[0].start_s, points[-1].end_s) if points else (0.0, 1.0)
    charts = [
        _chart(
            title="send rate and sink arrival rate",
            y_label="events/s",
            points=points,
            series=[
                ("sent", "#1f77b4", _steps(points, lambda p: _rate(p.sent, p))),
                ("arrived at the sink", "#2ca02c", _steps(points, lambda p: _rate(p.delivered, p))),
            ],
            x_range=x_range,
        ),
        _chart(
            title="cumulative sent and delivered",
            y_label="notifications",
            points=points,
            series=[
                ("sent", "#1f77b4", _cumulative(points, lambda p: p.sent)),
                ("delivered", "#2ca02c", _cumulative(points, lambda p: p.delivered)),
            ],
            x_range=x_range,
        ),
        _chart(
            title="sink-arrival latency (live notifications)",
            y_label="latency (ms)",
            points=points,
            series=[
                ("p50", "#1f77b4", _latency(points, lambda p: p.p50_ms)),
                ("p99", "#d62728", _latency(points, lambda p: p.p99_ms)),
            ],
            x_range=x_range,
        ),
    ]
    legend = " ".join(
        f'<span style="background:{fill};border:1px solid #ccc;padding:0 6px">{_esc(phase.value)}</span>'
        for phase, fill in _PHASE_FILL.items()
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
        f"<title>{_esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)} — {_esc(verdict)}</h1>\n"
        f"<p>phases: {legend}; {len(points)} samples</p>\n" + "\n".join(charts) + "\n</body>\n</html>\n"
    )


def _verdict(report: dict[str, Any]) -> str:
    lost = int(report.get("lost", 0))
    return "lost = 0 ✓" if lost == 0 else f"{lost:,} lost ✗"


def _title(report: dict[str, Any]) -> str:
    config = report.get("config", {})
    parts = [
        f"{int(config.get('events', 0)):,} notifications over {config.get('nodes')} nodes",
        f"outage {config.get('outage_s')} s ({config.get('outage_fraction')} of them)",
        f"{config.get('engine_mode')} engine",
        f"{config.get('daemon')} daemon",
        f"sink {config.get('sink') or 'jsonl'}",
    ]
    if config.get("restart_daemon"):
        parts.append(f"restart: {config.get('restart_mode')}")
    if config.get("duplicates"):
        parts.append(f"duplicates {config.get('duplicates')}")
    if config.get("shuffle"):
        parts.append("shuffled")
    return "fpolicyd replay-test: " + ", ".join(parts)


def plot_html(report: dict[str, Any]) -> str:
    """The page for a replay-test report that has a ``timeline`` (run with ``--plot``)."""
    return render_html(points_from_json(report.get("timeline", [])), title=_title(report), verdict=_verdict(report))
