"""The indexed router against a brute-force oracle (a loop over the routes with str.startswith/endswith, which is
EventBridge's prefix/suffix semantics), over generated route tables and generated paths and operations."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.pipeline.router import KNOWN_OPERATIONS, Route, Router, RouteTable

OPERATIONS = sorted(KNOWN_OPERATIONS)
# A small alphabet so that prefixes and suffixes overlap and share lengths; some non-ASCII for good measure.
ALPHABET = "ab/.é"
fragment = st.text(alphabet=ALPHABET, max_size=5)
prefix = fragment.map(lambda text: "/" + text)
suffix = st.text(alphabet=ALPHABET, min_size=1, max_size=5)


@st.composite
def route_tables(draw: st.DrawFn, max_routes: int = 200) -> RouteTable:
    """1..max_routes routes whose prefixes and suffixes come from small shared pools, so that they overlap.
    The pools and the count are drawn (and shrunk) by Hypothesis; each route's picks come from a Random seeded
    by a drawn integer, which keeps generating 200 routes cheap (Hypothesis's own randoms cost a draw per call)."""
    prefix_pool = draw(st.lists(prefix, min_size=1, max_size=40, unique=True))
    suffix_pool = draw(st.lists(suffix, min_size=1, max_size=40, unique=True))
    count = draw(st.integers(min_value=1, max_value=max_routes))
    rng = random.Random(draw(st.integers(min_value=0, max_value=2**32 - 1)))
    routes = []
    for number in range(count):
        prefixes = rng.sample(prefix_pool, rng.randint(0, min(4, len(prefix_pool))))
        suffixes = rng.sample(suffix_pool, rng.randint(0 if prefixes else 1, min(4, len(suffix_pool))))
        routes.append(
            Route(
                name=f"r{number}",
                id=f"R{number}",
                prefixes=tuple(prefixes),
                suffixes=tuple(suffixes),
                operations=tuple(rng.sample(OPERATIONS, rng.randint(1, 4))),
                target=f"T{number % 7}",
            )
        )
    return RouteTable(tuple(routes))


def oracle(table: RouteTable, path: str, operation: str, *, strict: bool) -> tuple[str, ...]:
    return tuple(
        route.name
        for route in table.routes
        if operation in route.operations
        and (path.startswith(route.prefixes) or (not strict and path.endswith(route.suffixes)))
    )


def paths_for(table: RouteTable) -> st.SearchStrategy[str]:
    """Paths built from the table's own prefixes and suffixes (so that matches are common) plus noise."""
    prefixes = sorted({p for route in table.routes for p in route.prefixes}) or ["/"]
    suffixes = sorted({s for route in table.routes for s in route.suffixes}) or [""]
    noise = st.text(alphabet=ALPHABET + "AB", max_size=6)
    return st.one_of(
        noise,
        st.builds(lambda p, n: p + n, st.sampled_from(prefixes), noise),
        st.builds(lambda n, s: n + s, noise, st.sampled_from(suffixes)),
        st.builds(lambda p, n, s: p + n + s, st.sampled_from(prefixes), noise, st.sampled_from(suffixes)),
        st.builds(lambda p: p[:-1], st.sampled_from(prefixes)),  # one character short
        st.builds(lambda s: s[1:], st.sampled_from(suffixes)),
        st.builds(lambda p: p.upper(), st.sampled_from(prefixes)),  # case differs
    )


@settings(max_examples=200, deadline=None)
@given(table=route_tables(), strict=st.booleans(), data=st.data())
def test_match_equals_the_brute_force_oracle(table: RouteTable, strict: bool, data: st.DataObject) -> None:
    router = Router(table, strict=strict)
    events = data.draw(
        st.lists(st.tuples(paths_for(table), st.sampled_from([*OPERATIONS, "nope"])), min_size=1, max_size=25)
    )
    for _ in range(2):  # the second pass answers merged fan-outs from the router's cache
        for path, operation in events:
            assert router.match(path, operation) == oracle(table, path, operation, strict=strict), (path, operation)


@settings(max_examples=60, deadline=None)
@given(table=route_tables(max_routes=30), strict=st.booleans(), data=st.data())
def test_explain_agrees_with_match(table: RouteTable, strict: bool, data: st.DataObject) -> None:
    router = Router(table, strict=strict)
    path = data.draw(paths_for(table))
    operation = data.draw(st.sampled_from(OPERATIONS))
    explanations = router.explain(path, operation)
    assert [e.route for e in explanations] == [route.name for route in table.routes]
    assert tuple(e.route for e in explanations if e.matched) == router.match(path, operation)
    for e, route in zip(explanations, table.routes, strict=True):
        assert e.matched_prefixes == tuple(p for p in route.prefixes if path.startswith(p))
        assert e.operation_ok == (operation in route.operations)


# Any text TOML can hold (no surrogates); names restricted to what a rule name allows.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)


@st.composite
def free_text_tables(draw: st.DrawFn) -> RouteTable:
    names = draw(st.lists(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True), min_size=1, max_size=5, unique=True))
    routes = []
    for number, name in enumerate(names):
        prefixes = draw(st.lists(any_text.map(lambda t: "/" + t), max_size=3, unique=True))
        suffixes = draw(st.lists(any_text.filter(bool), min_size=0 if prefixes else 1, max_size=3, unique=True))
        routes.append(
            Route(
                name=name,
                id=f"{number}-" + draw(any_text),
                prefixes=tuple(prefixes),
                suffixes=tuple(suffixes),
                operations=tuple(draw(st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=3, unique=True))),
                target=draw(any_text.filter(str.strip)),
                sinks=tuple(draw(st.lists(any_text.map(lambda t: "jsonl:/x" + t), max_size=2, unique=True))),
                description=draw(any_text),
            )
        )
    return RouteTable(tuple(routes))


@settings(max_examples=150, deadline=None)
@given(table=free_text_tables())
def test_to_toml_round_trips(table: RouteTable) -> None:
    assert RouteTable.from_toml(table.to_toml()) == table
