"""Use-case routing as data (sans-IO): a routes file in, the names of the routes an event belongs to out.

Each route is what one EventBridge rule of the reference pipeline says::

    {"detail": {"file_path": [{"prefix": P1}, ..., {"suffix": S1}, ...], "operation_type": [op, ...]}}

and :class:`Router` matches exactly as EventBridge does: ``file_path`` matches when ANY prefix or ANY suffix
is a plain, case-sensitive string prefix/suffix of it (not path-component based: ``/legal/`` does not match
``/legalese/`` but ``/leg`` would), AND ``operation_type`` is one of the listed operations; an event fans out to
every route that matches, in the order of the file. Strict ownership mode counts prefixes only (the reference
project's advice: the prefix is the ownership boundary, suffixes are hints that fan out).

Matching does not loop over the routes. Per operation, the prefixes form a tree keyed by string slices: the
root maps ``path[:S]`` (``S`` = the shortest prefix's length) to the routes of the prefix exactly that long, if
any, and to a node of the longer prefixes that start with it, keyed the same way on their own shortest length;
suffixes likewise on ``path[-S:]``. A match walks down while the path keeps matching, one dict lookup per step,
so its cost is the number of nested prefixes/suffixes the path actually has (plus one) and the size of the
fan-out, not the number of routes (``benchmarks/bench_router.py``: 17, 1,000 and 10,000 routes).

Reading a routes file (a path, or the packaged one) is :mod:`fpolicyd.storage.routes_file`; this module parses
and validates the text (:meth:`RouteTable.from_toml`). The packaged ``fpolicyd/data/routes.toml`` (the 17 use
cases of ``docs/reference-pipeline.md`` §5) is the source of truth; ``config/routes.toml`` is the copy users edit,
and ``fpolicyd routes export`` turns either into EventBridge patterns or a CloudFormation template, so rules and
in-process routing cannot drift apart.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from fpolicyd.errors import ConfigError
from fpolicyd.protocol.req_types import Operation

__all__ = [
    "EVENTBRIDGE_PATTERN_QUOTA_CHARS",
    "KNOWN_OPERATIONS",
    "ROUTE_KEYS",
    "SINK_SCHEMES",
    "Route",
    "RouteExplanation",
    "RouteTable",
    "Router",
    "UnroutedAction",
    "event_pattern",
]


#: Sink schemes this build can deliver to (a route's ``sinks`` and the ``sinks`` setting are checked against it).
SINK_SCHEMES: Final = ("jsonl", "stdout", "sqs", "eventbridge")


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

#: Bound of a :class:`Router`'s cache of merged fan-outs (one per distinct set of prefix/suffix hits).
_MERGED_CACHE_MAX: Final = 4096


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


@dataclass(frozen=True, slots=True)
class _Entry:
    """The routes that one prefix (or suffix) string selects, for one operation."""

    #: Unique within a :class:`Router`; several hits are cached under the tuple of their ids.
    key: int
    #: Positions of the routes in the table, ascending.
    positions: tuple[int, ...]
    #: Their names, in the same order (the answer when this entry is the only hit).
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Node:
    """One step of the prefix (or suffix) index: the strings below it, keyed by their first (last) ``stem``
    characters, ``stem`` being the length of the shortest one. A branch holds the entry of the string exactly
    that long, if any, and the node of the longer strings that start (end) with it, if any."""

    stem: int
    branches: dict[str, tuple[_Entry | None, _Node | None]]


@dataclass(frozen=True, slots=True)
class _OperationIndex:
    prefixes: _Node | None
    suffixes: _Node | None


class Router:
    """Matches (file_path, operation) against a :class:`RouteTable` as EventBridge would (module docstring).

    Each prefix/suffix string of an operation's routes maps to an :class:`_Entry` (the routes it selects),
    reached through a :class:`_Node` tree. A match collects the entries that hit; one hit is its own answer,
    several are merged in table order and the result is cached under the hits' keys.
    """

    __slots__ = ("_by_operation", "_entry_keys", "_merged", "_names", "routes_by_name", "strict", "table")

    def __init__(self, table: RouteTable, *, strict: bool = False) -> None:
        self.table = table
        self.strict = strict
        self._names = tuple(route.name for route in table.routes)
        #: Name → route, to find what :meth:`match` names (e.g. a route's own ``sinks``).
        self.routes_by_name: Mapping[str, Route] = MappingProxyType({route.name: route for route in table.routes})
        self._merged: dict[tuple[int, ...], tuple[str, ...]] = {}
        self._entry_keys = itertools.count()
        by_operation: dict[str, _OperationIndex] = {}
        for operation in sorted(KNOWN_OPERATIONS):
            members = [(i, route) for i, route in enumerate(table.routes) if operation in route.operations]
            if not members:
                continue
            prefixes = [(prefix, i) for i, route in members for prefix in route.prefixes]
            suffixes = [] if strict else [(suffix, i) for i, route in members for suffix in route.suffixes]
            by_operation[operation] = _OperationIndex(
                self._tree(prefixes, suffixes=False), self._tree(suffixes, suffixes=True)
            )
        self._by_operation: Mapping[str, _OperationIndex] = by_operation

    def _tree(self, entries: list[tuple[str, int]], *, suffixes: bool) -> _Node | None:
        """Index (text, route position) pairs, given in ascending position order (built without recursion:
        a chain of nested prefixes can be as deep as the longest prefix is long)."""
        positions: dict[str, list[int]] = {}
        for text, position in entries:
            positions.setdefault(text, []).append(position)
        if not positions:
            return None
        root = _Node(min(map(len, positions)), {})
        pending = [(root, list(positions))]
        while pending:
            node, texts = pending.pop()
            grouped: dict[str, list[str]] = {}
            for text in texts:
                grouped.setdefault(text[-node.stem :] if suffixes else text[: node.stem], []).append(text)
            for key, members in grouped.items():
                longer = [text for text in members if len(text) > node.stem]
                exact = self._entry(positions[key]) if len(longer) < len(members) else None
                child = None
                if longer:
                    child = _Node(min(map(len, longer)), {})
                    pending.append((child, longer))
                node.branches[key] = (exact, child)
        return root

    def _entry(self, positions: list[int]) -> _Entry:
        return _Entry(next(self._entry_keys), tuple(positions), tuple(self._names[i] for i in positions))

    def match(self, file_path: str, operation: str) -> tuple[str, ...]:
        """Names of the routes that take this event, in the table's order; () when none does."""
        index = self._by_operation.get(operation)
        if index is None:
            return ()
        size = len(file_path)
        hits: list[_Entry] = []
        node = index.prefixes
        while node is not None and size >= node.stem:
            branch = node.branches.get(file_path[: node.stem])
            if branch is None:
                break
            entry, node = branch
            if entry is not None:
                hits.append(entry)
        node = index.suffixes
        while node is not None and size >= node.stem:
            branch = node.branches.get(file_path[-node.stem :])
            if branch is None:
                break
            entry, node = branch
            if entry is not None:
                hits.append(entry)
        if not hits:
            return ()
        if len(hits) == 1:
            return hits[0].names
        return self._merge(hits)

    def _merge(self, hits: list[_Entry]) -> tuple[str, ...]:
        """Several entries hit: their routes, each once, in table order (cached per set of entries)."""
        key = tuple([entry.key for entry in hits])
        names = self._merged.get(key)
        if names is None:
            positions = sorted({position for entry in hits for position in entry.positions})
            names = tuple(self._names[i] for i in positions)
            if len(self._merged) < _MERGED_CACHE_MAX:
                self._merged[key] = names
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
