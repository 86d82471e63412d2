"""The human summary of a ``fpolicyd replay-test`` report (pure: the report dict in, text out).

The JSON report (``--json``, ``--report FILE``) keeps every figure; this table keeps the ones that answer "did it
lose anything, did it flag what it should, how fast": counts with thousands separators, seconds and milliseconds
rounded, no clock readings. Where the nodes and the daemon measure the same thing from their two ends, the label
says which end and what the figure spans, so the two never read as a contradiction.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["summary_text"]

_OK: Final = "✓"
_MISMATCH: Final = "✗"
#: Label column width.
_LABEL: Final = 14


def _n(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, int | float) else "—"


def _s(seconds: Any) -> str:
    """Seconds, 2 decimals below 10 s, 1 below 100 s, else whole."""
    if not isinstance(seconds, int | float):
        return "—"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 100:
        return f"{seconds:.1f} s"
    return f"{seconds:,.0f} s"


def _ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"


def _rate(value: Any) -> str:
    return f"{value:,.0f} ev/s" if isinstance(value, int | float) else "—"


def _pct(part: int, whole: int) -> str:
    if whole <= 0:
        return "—"
    share = 100 * part / whole
    if part == whole:
        return "100%"
    return f"{min(share, 99.99):.2f}%"  # 9,999 of 10,000 is not "100.00%"


def _row(label: str, text: str) -> str:
    return f"  {label:<{_LABEL}} {text}"


def _flag(name: str, figures: dict[str, Any], *, lag: bool = False) -> str:
    sink, expected = figures.get("sink"), figures.get("expected")
    mark = _OK if sink == expected else _MISMATCH
    if lag:
        shown = f"{_ms((sink or 0) / 1000)} (expected {_ms((expected or 0) / 1000)})"
    else:
        shown = f"{_n(sink)} (expected {_n(expected)})"
    return f"{name} {shown} {mark}"


def _latency(label: str, figures: dict[str, Any], what: str) -> str:
    if not figures.get("count"):
        return _row(label, f"— ({what}: none measured)")
    values = "  ".join(f"{p} {_ms(figures.get(f'{p}_ms'))}" for p in ("p50", "p95", "p99", "max"))
    return _row(label, f"{values}  ({what}, n={_n(figures['count'])})")


def _run_line(config: dict[str, Any]) -> str:
    parts = [
        f"{_n(config.get('events'))} events",
        f"{_n(config.get('nodes'))} nodes",
        f"outage {_s(config.get('outage_s'))} ({100 * float(config.get('outage_fraction') or 0):.0f}% of events)",
    ]
    if config.get("duplicates"):
        parts.append(f"duplicates {100 * float(config['duplicates']):g}%")
    if config.get("shuffle"):
        parts.append("shuffled")
    if config.get("restart_daemon"):
        parts.append(f"restart {config.get('restart_mode')}")
    return ", ".join(parts)


def _instance_lines(report: dict[str, Any]) -> list[str]:
    """Several daemon instances: one line each (what it delivered, its replay as it saw it, reconnects)."""
    instances: list[dict[str, Any]] = report.get("instances") or []
    if len(instances) < 2:
        return []
    delivered = int(report.get("delivered", 0))
    lines: list[str] = []
    for instance in instances:
        own = int(instance.get("delivered", 0))
        text = f"#{instance.get('instance')} {instance.get('address')}: delivered {own:,} ({_pct(own, delivered)})"
        replay: dict[str, Any] | None = instance.get("replay")
        if replay:
            text += (
                f", {_n(replay.get('replayed_events'))} replayed read at {_rate(replay.get('replay_ingest_eps'))}, "
                f"{_n(replay.get('reconnects'))} reconnects"
            )
        else:
            text += f", {_n(instance.get('node_reconnects'))} node reconnects"
        lines.append(_row("instances" if not lines else "", text))
    several = report.get("delivered_by_several_instances")
    if several:
        lines.append(_row("", f"{_n(several)} ids delivered by more than one instance (counted as duplicates)"))
    return lines


def summary_text(report: dict[str, Any]) -> str:
    """The report as a short table for a terminal."""
    generated, delivered, lost = int(report["generated"]), int(report["delivered"]), int(report["lost"])
    config: dict[str, Any] = report.get("config", {})
    verdict = "PASS: nothing lost" if lost == 0 else f"FAIL: {lost:,} of {generated:,} notifications lost"
    lines = [f"fpolicyd replay-test: {verdict}", _row("run", _run_line(config))]
    lines.append(_row("daemon", f"{config.get('daemon')}, {config.get('engine_mode')} engine"))
    lines.append(_row("verified at", str(config.get("verified_at", "—"))))
    lines.append(_row("generated", f"{generated:,} ({_n(report.get('backlog_events'))} in the outage backlog)"))
    lines.append(_row("delivered", f"{delivered:,} ({_pct(delivered, generated)})"))
    lost_text = f"{lost:,}"
    spool = report.get("undelivered_in_spool")
    if lost and spool:
        lost_text += f" ({spool:,} still in the daemon's spool at the end)"
    lines.append(_row("lost", f"{lost_text} {_OK if lost == 0 else _MISMATCH}"))
    if report.get("unexpected"):
        lines.append(_row("unexpected", f"{_n(report['unexpected'])} ids at the sink this run did not generate"))
    injected, dup_delivered = report.get("duplicates_injected", 0), report.get("duplicates_delivered", 0)
    dup_text = f"{_n(injected)} injected, {_n(dup_delivered)} delivered"
    if injected and not dup_delivered:
        dup_text += " (suppressed by the daemon)"
    lines.append(_row("duplicates", dup_text))
    if report.get("redelivered_lines"):
        lines.append(_row("redelivered", f"{_n(report['redelivered_lines'])} lines sent again after a restart"))
    if report.get("resent"):
        lines.append(_row("resent", f"{_n(report['resent'])} requests a lost session left unanswered"))
    flags: dict[str, Any] = report.get("flags", {})
    if flags:
        shown = [
            _flag("replayed", flags["replayed"]),
            _flag("out of order", flags["out_of_order"]),
            _flag("duplicate", flags["duplicate"]),
            _flag("max lag", flags["max_ooo_lag_us"], lag=True),
        ]
        lines.append(_row("flags", "  ".join(shown[:2])))
        lines.append(_row("", "  ".join(shown[2:])))
        if not flags.get("exact_expectation", True):
            lines.append(_row("", "(expected flags are approximate here: a kill, a resend or a remote daemon)"))
    lines.append(_row("displacement", f"up to {_n(report.get('max_out_of_order_displacement'))} places (per node)"))
    latency: dict[str, Any] = report.get("latency", {})
    lines.append(_latency("latency", latency.get("ingest", {}), "GenerationTime → received, live"))
    lines.append(_latency("", latency.get("sink", {}), "GenerationTime → in the sink, live, ±0.25 s"))
    replay: dict[str, Any] = report.get("replay", {})
    totals: dict[str, Any] = report.get("daemon", {}).get("totals", {})
    if totals:
        lines.append(
            _row(
                "replay",
                f"{_rate(totals.get('replay_ingest_eps'))} (daemon: {_n(totals.get('replayed_events'))} replayed "
                f"notifications read in {_s(totals.get('replay_ingest_s'))})",
            )
        )
    lines.append(
        _row(
            "" if totals else "replay",
            f"nodes wrote the {_n(replay.get('backlog_sent'))} backlog notifications "
            f"(+{_n(int(replay.get('frames_sent', 0)) - int(replay.get('backlog_sent', 0)))} duplicates) "
            f"in {_s(replay.get('send_s'))} ({_rate(replay.get('send_eps'))} into the sockets)",
        )
    )
    reconnect: dict[str, Any] = report.get("node_reconnect_s", {})
    lines.append(
        _row(
            "reconnect",
            f"nodes: max {_s(reconnect.get('max'))}, mean {_s(reconnect.get('mean'))} over "
            f"{_n(reconnect.get('count'))} (outage over → new session)",
        )
    )
    if totals:
        lines.append(
            _row("", f"daemon: max {_s(totals.get('max_session_gap_s'))} (session lost → next handshake, outage in)")
        )
    lines.extend(_instance_lines(report))
    daemon: dict[str, Any] = report.get("daemon", {})
    if daemon.get("restarts"):
        kills = f", {daemon['kills']} by SIGKILL" if daemon.get("kills") else ""
        lines.append(_row("restarts", f"{daemon['restarts']}{kills}"))
    queue: dict[str, Any] | None = report.get("queue")
    if queue:
        lines.append(
            _row(
                "queue",
                f"{_n(queue.get('receives'))} receives, {_n(queue.get('errors'))} errors, "
                f"{_n(queue.get('delete_failures'))} failed deletes",
            )
        )
    lines.append(
        _row(
            "time",
            f"storm {_s(report.get('drive_s'))} ({_rate(report.get('events_per_s'))} sent), "
            f"whole run {_s(report.get('elapsed_s'))}",
        )
    )
    return "\n".join(lines) + "\n"
