"""Use-case routing as data (sans-IO): a routes file in, the names of the routes an event belongs to out.

Each route is what one EventBridge rule of the reference pipeline says::

    {"detail": {"file_path": [{"prefix": P1}, ..., {"suffix": S1}, ...], "operation_type": [op, ...]}}

and :class:`Router` matches exactly as EventBridge does: ``file_path`` matches when ANY prefix or ANY suffix
is a plain, case-sensitive string prefix/suffix of it (not path-component based: ``/legal/`` does not match
``/legalese/`` but ``/leg`` would), AND ``operation_type`` is one of the listed operations; an event fans out to
every route that matches, in the order of the file. Strict ownership mode counts prefixes only (the reference
project's advice: the prefix is the ownership boundary, suffixes are hints that fan out).

Matching does not loop over the routes. Per operation, the prefixes are indexed by string
(``{prefix: routes bitmask}``, one dict per distinct length, looked up with ``path[:L]``), and those dicts are
grouped by the prefixes' first ``S`` characters (``S`` = the shortest prefix's length), so one lookup of
``path[:S]`` selects the few lengths worth trying; suffixes likewise on ``path[-L:]``. The cost is bounded by
the number of distinct lengths within a group, which is bounded by the longest prefix/suffix, not by the number
of routes (``benchmarks/bench_router.py``: 17, 1,000 and 10,000 routes).

The packaged ``fpolicyd/data/routes.toml`` (the 17 use cases of ``reference-pipeline.md``) is the source of
truth; ``config/routes.toml`` is the copy users edit, and ``fpolicyd routes export`` turns either into
EventBridge patterns or a CloudFormation template, so rules and in-process routing cannot drift apart.
"""

from __future__ import annotations

import importlib.resources
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from fpolicyd.errors import ConfigError
from fpolicyd.protocol.req_types import Operation

__all__ = [
    "EVENTBRIDGE_PATTERN_QUOTA_CHARS",
    "KNOWN_OPERATIONS",
    "ROUTE_KEYS",
    "Route",
    "RouteExplanation",
    "RouteTable",
    "Router",
    "UnroutedAction",
    "event_pattern",
]


class UnroutedAction(StrEnum):
    """What happens to an event that no route matches."""

    #: Delivered to the daemon's default sinks, like every event without routing.
    DEFAULT_SINKS = "default_sinks"
    #: Written to an audit JSON Lines file under ``data_dir`` instead of the sinks.
    AUDIT = "audit"


#: The ``operation_type`` values a route may list: every operation the normalizer emits.
KNOWN_OPERATIONS: Final[frozenset[str]] = frozenset(op.value for op in Operation)

#: Keys of one ``[[route]]`` table, in the order :meth:`RouteTable.to_toml` writes them.
ROUTE_KEYS: Final = ("name", "id", "description", "prefixes", "suffixes", "operations", "target", "sinks")
_REQUIRED_KEYS: Final = ("name", "id", "operations", "target")
_LIST_KEYS: Final = frozenset({"prefixes", "suffixes", "operations", "sinks"})

#: A route name becomes an EventBridge rule name and a target id: 1-64 of ``[.-_A-Za-z0-9]``.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

#: EventBridge's default quota on the size of one event pattern (adjustable to 4096 on request).
EVENTBRIDGE_PATTERN_QUOTA_CHARS: Final = 2048

#: Bound of the bitmask → names cache of a :class:`Router` (distinct fan-out sets; peer-independent, but a
#: table of thousands of routes could in principle produce many).
_NAMES_CACHE_MAX: Final = 4096

_PACKAGED: Final = "packaged fpolicyd/data/routes.toml"


@dataclass(frozen=True, slots=True)
class Route:
    """One use case: where its files live (prefixes), what they look like (suffixes), which operations count."""

    name: str
    id: str
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    operations: tuple[str, ...]
    target: str
    #: Sink URIs (``sqs:https://...``, ``eventbridge:BUS``, ...) for this route's events; empty = default sinks.
    sinks: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class RouteTable:
    """A validated, ordered set of routes. Constructing one validates it (:class:`ConfigError` on a problem)."""

    routes: tuple[Route, ...]
    #: Where the routes came from, for error messages (a path, or the packaged file); not compared.
    source: str = field(default="routes", compare=False)

    def __post_init__(self) -> None:
        if not self.routes:
            raise ConfigError(
                f"{self.source}: defines no routes (add [[route]] tables, or set routing_enabled = false)"
            )
        names: dict[str, int] = {}
        ids: dict[str, int] = {}
        for number, route in enumerate(self.routes, 1):
            _check_route(route, f"{self.source}: route #{number}")
            for seen, key, value in ((names, "name", route.name), (ids, "id", route.id)):
                if value in seen:
                    raise ConfigError(
                        f"{self.source}: route #{number} {route.name!r}: {key}: {value!r} is already used by "
                        f"route #{seen[value]}"
                    )
                seen[value] = number

    @classmethod
    def load(cls, path: Path | None = None) -> RouteTable:
        """The routes of ``path``, or the packaged 17 reference routes when ``path`` is None."""
        if path is None:
            return cls.from_toml(packaged_routes_text(), source=_PACKAGED)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"routes file {path}: {exc}") from None
        return cls.from_toml(text, source=str(path))

    @classmethod
    def from_toml(cls, text: str, *, source: str = "routes") -> RouteTable:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        unknown = sorted(set(data) - {"route"})
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; routes are [[route]] tables")
        raw_routes = data.get("route", [])
        if not isinstance(raw_routes, list):
            raise ConfigError(f"{source}: 'route' must be an array of tables ([[route]])")
        return cls(
            tuple(_route_from_mapping(raw, f"{source}: route #{n}") for n, raw in enumerate(raw_routes, 1)),
            source=source,
        )

    def to_toml(self) -> str:
        """The table as a routes file; ``RouteTable.from_toml(t.to_toml())`` equals ``t`` (but for ``source``)."""
        lines = list(_TOML_HEADER)
        for route in self.routes:
            lines.append("")
            lines.append("[[route]]")
            for key in ROUTE_KEYS:
                value = getattr(route, key)
                if isinstance(value, tuple):
                    lines.append(f"{key} = [{', '.join(_toml_string(v) for v in value)}]")
                else:
                    lines.append(f"{key} = {_toml_string(value)}")
        return "\n".join(lines) + "\n"

    def by_name(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)


def packaged_routes_text() -> str:
    """The packaged routes file (read through importlib.resources, so it works from a wheel or a zip)."""
    return (importlib.resources.files("fpolicyd") / "data" / "routes.toml").read_text(encoding="utf-8")


_TOML_HEADER: Final = (
    "# fpolicyd use-case routes. Regenerate with `fpolicyd routes export --format toml`; point the",
    "# `routes_file` setting at an edited copy. `fpolicyd routes export --format eventbridge|cloudformation`",
    "# turns this file into EventBridge rules, `fpolicyd routes check PATH --op OP` shows what matches and why.",
    "#",
    "# A route matches an event when file_path starts with ANY prefix or ends with ANY suffix (plain,",
    "# case-sensitive string comparison, as EventBridge's prefix/suffix filters) AND operation_type is one of",
    "# `operations`. An event goes to every route that matches. With routes_strict = true only prefixes count.",
    "#",
    "# Keys: name (rule name: letters, digits, . _ -), id, description, prefixes (each starts with /), suffixes,",
    f"# operations ({' '.join(op.value for op in Operation)}),",
    '# target (what the EventBridge rule invokes), sinks (e.g. "sqs:https://..."; [] = the default sinks).',
)


# ------------------------------------------------------------------------------------------ validation


def _route_from_mapping(raw: object, where: str) -> Route:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table ([[route]])")
    name = raw.get("name")
    if isinstance(name, str):
        where = f"{where} {name!r}"
    unknown = sorted(set(raw) - set(ROUTE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a route has {', '.join(ROUTE_KEYS)}")
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    values: dict[str, Any] = {}
    for key in ROUTE_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if key in _LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: {key}: must be a list of strings, got {value!r}")
            values[key] = tuple(value)
        elif not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: must be a string, got {value!r}")
        else:
            values[key] = value
    values.setdefault("prefixes", ())
    values.setdefault("suffixes", ())
    return Route(**values)


def _check_route(route: Route, where: str) -> None:
    where = f"{where} {route.name!r}"
    if not _NAME_RE.fullmatch(route.name):
        raise ConfigError(
            f"{where}: name: must be 1-64 letters, digits, '.', '_' or '-' (it becomes an EventBridge rule name)"
        )
    for key in ("id", "target"):
        if not getattr(route, key).strip():
            raise ConfigError(f"{where}: {key}: must not be empty")
    for key in ROUTE_KEYS:
        value = getattr(route, key)
        for text in value if isinstance(value, tuple) else (value,):
            _check_text(text, f"{where}: {key}")
        if isinstance(value, tuple):
            duplicates = sorted({v for v in value if value.count(v) > 1})
            if duplicates:
                raise ConfigError(f"{where}: {key}: {duplicates} listed more than once")
    if not route.prefixes and not route.suffixes:
        raise ConfigError(f"{where}: prefixes and suffixes are both empty; a route needs at least one of them")
    for prefix in route.prefixes:
        if not prefix.startswith("/"):
            raise ConfigError(f"{where}: prefixes: {prefix!r} must start with '/' (file_path is absolute)")
    if "" in route.suffixes:
        raise ConfigError(f"{where}: suffixes: an empty suffix would match every path")
    if not route.operations:
        raise ConfigError(f"{where}: operations: must list at least one operation")
    for operation in route.operations:
        if operation not in KNOWN_OPERATIONS:
            raise ConfigError(
                f"{where}: operations: unknown operation {operation!r}; one of {', '.join(sorted(KNOWN_OPERATIONS))}"
            )
    for uri in route.sinks:
        _check_sink(uri, f"{where}: sinks")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: {text!r} is not valid Unicode text (lone surrogate)") from None


def _check_sink(uri: str, where: str) -> None:
    # config.py imports this module (UnroutedAction), so its scheme list is read at call time.
    from fpolicyd.config import SINK_SCHEMES  # noqa: PLC0415

    scheme, sep, target = uri.partition(":")
    if not sep or scheme not in SINK_SCHEMES:
        raise ConfigError(f"{where}: {uri!r}: a sink is one of {', '.join(s + ':' for s in SINK_SCHEMES)}")
    if not target and scheme != "stdout":
        raise ConfigError(f"{where}: {uri!r}: {scheme}: needs a target (a queue URL, bus name or directory)")


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters (TOML forbids them raw) escaped."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


# -------------------------------------------------------------------------------------------- matching


@dataclass(frozen=True, slots=True)
class RouteExplanation:
    """Why one route does or does not take an event (``fpolicyd routes check``)."""

    route: str
    route_id: str
    target: str
    matched: bool
    #: Every prefix of the route that ``file_path`` starts with (route order).
    matched_prefixes: tuple[str, ...]
    #: Every suffix of the route that ``file_path`` ends with (reported in strict mode too, but not counted).
    matched_suffixes: tuple[str, ...]
    operation: str
    operation_ok: bool
    strict: bool

    @property
    def path_matched(self) -> bool:
        return bool(self.matched_prefixes) or (not self.strict and bool(self.matched_suffixes))

    @property
    def path_reason(self) -> str:
        parts = [f"prefix {p!r}" for p in self.matched_prefixes]
        suffixes = [f"suffix {s!r}" for s in self.matched_suffixes]
        if self.strict and suffixes:
            ignored = f"{', '.join(suffixes)} ignored (strict)"
            return f"{', '.join(parts)}; {ignored}" if parts else f"no prefix matched; {ignored}"
        parts += suffixes
        if parts:
            return ", ".join(parts)
        return "no prefix matched" if self.strict else "no prefix/suffix matched"

    @property
    def operation_reason(self) -> str:
        if self.operation_ok:
            return f"operation {self.operation!r} listed"
        return f"operation {self.operation!r} not listed"

    @property
    def reason(self) -> str:
        return f"{self.path_reason}; {self.operation_reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "id": self.route_id,
            "target": self.target,
            "matched": self.matched,
            "path_matched": self.path_matched,
            "matched_prefixes": list(self.matched_prefixes),
            "matched_suffixes": list(self.matched_suffixes),
            "operation_ok": self.operation_ok,
            "reason": self.reason,
        }


#: One index level: (string length, {prefix or suffix of that length: routes bitmask}).
_Level = tuple[int, dict[str, int]]
#: A group: (bitmask of the entries exactly ``stem`` long, the longer entries' levels by ascending length).
_Group = tuple[int, tuple[_Level, ...]]
#: ``stem`` of a side without entries: no path is that long.
_NO_ENTRIES: Final = sys.maxsize


@dataclass(frozen=True, slots=True)
class _Side:
    """The prefixes (or suffixes) of the routes that list one operation, grouped by their first (last) ``stem``
    characters, ``stem`` being the length of the shortest one; within a group, by length. One dict lookup picks
    the group, then one lookup per distinct length inside it."""

    stem: int
    groups: dict[str, _Group]


def _side(entries: list[tuple[str, int]], *, suffixes: bool) -> _Side:
    if not entries:
        return _Side(_NO_ENTRIES, {})
    stem = min(len(text) for text, _ in entries)
    grouped: dict[str, dict[int, dict[str, int]]] = {}
    for text, bit in entries:
        by_length = grouped.setdefault(text[-stem:] if suffixes else text[:stem], {})
        level = by_length.setdefault(len(text), {})
        level[text] = level.get(text, 0) | bit
    groups: dict[str, _Group] = {}
    for key, by_length in grouped.items():
        exact = by_length.pop(stem, {}).get(key, 0)
        groups[key] = (exact, tuple(sorted(by_length.items())))
    return _Side(stem, groups)


@dataclass(frozen=True, slots=True)
class _OperationIndex:
    prefixes: _Side
    suffixes: _Side


class Router:
    """Matches (file_path, operation) against a :class:`RouteTable` as EventBridge would (module docstring).

    Route ``i`` of the table is bit ``i`` of a mask; a match ORs the masks found for the path's prefixes and
    suffixes (:class:`_Side`), and the names of the set bits, in file order, are the result (cached per mask).
    """

    __slots__ = ("_by_operation", "_names", "_names_cache", "strict", "table")

    def __init__(self, table: RouteTable, *, strict: bool = False) -> None:
        self.table = table
        self.strict = strict
        self._names = tuple(route.name for route in table.routes)
        self._names_cache: dict[int, tuple[str, ...]] = {}
        by_operation: dict[str, _OperationIndex] = {}
        for operation in sorted(KNOWN_OPERATIONS):
            members = [(1 << i, route) for i, route in enumerate(table.routes) if operation in route.operations]
            if not members:
                continue
            prefixes = [(prefix, bit) for bit, route in members for prefix in route.prefixes]
            suffixes = [] if strict else [(suffix, bit) for bit, route in members for suffix in route.suffixes]
            by_operation[operation] = _OperationIndex(_side(prefixes, suffixes=False), _side(suffixes, suffixes=True))
        self._by_operation: Mapping[str, _OperationIndex] = by_operation

    def match(self, file_path: str, operation: str) -> tuple[str, ...]:
        """Names of the routes that take this event, in the table's order; () when none does."""
        index = self._by_operation.get(operation)
        if index is None:
            return ()
        size = len(file_path)
        found = 0
        side = index.prefixes
        if size >= side.stem:
            group = side.groups.get(file_path[: side.stem])
            if group is not None:
                found = group[0]
                for length, prefixes in group[1]:
                    if length > size:
                        break
                    found |= prefixes.get(file_path[:length], 0)
        side = index.suffixes
        if size >= side.stem:
            group = side.groups.get(file_path[-side.stem :])
            if group is not None:
                found |= group[0]
                for length, suffixes in group[1]:
                    if length > size:
                        break
                    found |= suffixes.get(file_path[-length:], 0)
        if not found:
            return ()
        return self._names_of(found)

    def _names_of(self, mask: int) -> tuple[str, ...]:
        names = self._names_cache.get(mask)
        if names is None:
            collected = []
            rest = mask
            while rest:
                lowest = rest & -rest
                collected.append(self._names[lowest.bit_length() - 1])
                rest ^= lowest
            names = tuple(collected)
            if len(self._names_cache) < _NAMES_CACHE_MAX:
                self._names_cache[mask] = names
        return names

    def explain(self, file_path: str, operation: str) -> list[RouteExplanation]:
        """Per route, in table order: matched or not, and why. Not the hot path: a plain loop."""
        out = []
        for route in self.table.routes:
            prefixes = tuple(p for p in route.prefixes if file_path.startswith(p))
            suffixes = tuple(s for s in route.suffixes if file_path.endswith(s))
            operation_ok = operation in route.operations
            path_ok = bool(prefixes) or (not self.strict and bool(suffixes))
            out.append(
                RouteExplanation(
                    route=route.name,
                    route_id=route.id,
                    target=route.target,
                    matched=path_ok and operation_ok,
                    matched_prefixes=prefixes,
                    matched_suffixes=suffixes,
                    operation=operation,
                    operation_ok=operation_ok,
                    strict=self.strict,
                )
            )
        return out


# ------------------------------------------------------------------------------------------ EventBridge


def event_pattern(route: Route, *, source: str, detail_type: str, strict: bool = False) -> dict[str, Any] | None:
    """The EventBridge event pattern equivalent to ``route`` (None in strict mode for a route without
    prefixes: it can never match, and EventBridge rejects an empty list)."""
    file_path: list[dict[str, str]] = [{"prefix": prefix} for prefix in route.prefixes]
    if not strict:
        file_path += [{"suffix": suffix} for suffix in route.suffixes]
    if not file_path:
        return None
    return {
        "source": [source],
        "detail-type": [detail_type],
        "detail": {"file_path": file_path, "operation_type": list(route.operations)},
    }
