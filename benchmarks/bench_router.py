"""Cost of one route match: the indexed :class:`Router` against the brute-force loop over the routes.

    .venv/bin/python benchmarks/bench_router.py [--events 20000] [--repeat 5] [--sizes 17,1000,10000]

For each table size (17 = the packaged reference routes; larger ones generated: 1-3 department/project
prefixes of varied lengths per route, and, for the first 40 routes only, 1-3 file types from a pool of 60, so
that the fan-out per event stays comparable across sizes) it matches the same pre-generated events (paths built
from the table's prefixes and suffixes plus noise, operations mostly create and write, some read/open/close/
getattr that no route lists) and prints the CPU time per match (process time, so other load on the machine
counts less) for

- ``indexed``: ``Router.match`` (a few dict lookups per event, see ``fpolicyd.pipeline.router``);
- ``brute force``: a loop over the routes with ``op in operations and (startswith(prefixes) or
  endswith(suffixes))``, the fastest pure-Python way to evaluate the same rules one by one.

Both must return the same names for every event (checked before timing). Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from fpolicyd.pipeline.router import Route, Router, RouteTable
from fpolicyd.storage.routes_file import load_routes

Event = tuple[str, str]
COMMON_EXTENSIONS = [".pdf", ".docx", ".xlsx", ".tiff", ".png", ".jpg", ".csv", ".json", ".parquet", ".mov", ".mp4"]
EXTENSIONS = COMMON_EXTENSIONS + [f".x{i}" for i in range(60 - len(COMMON_EXTENSIONS))]
#: Routes of a generated table that also have suffixes (file types shared by many routes fan out to all).
SUFFIX_ROUTES = 40
OPERATION_MIXES = [("create", "write"), ("create", "write", "rename"), ("create", "write", "rename", "delete")]
#: What ONTAP sends, roughly: mostly creates and writes, some operations no route lists.
EVENT_OPERATIONS = ["create"] * 4 + ["write"] * 4 + ["rename", "delete", "read", "open", "close", "getattr"]


def generated_table(size: int, seed: int = 1) -> RouteTable:
    rng = random.Random(seed)
    routes = []
    for n in range(size):
        prefixes = tuple(
            f"/{rng.choice(['dept', 'division', 'p', 'team-area'])}{n}/{rng.choice(['', 'proj', 'data-'])}{k}/"
            for k in range(rng.randint(1, 3))
        )
        routes.append(
            Route(
                name=f"route-{n}",
                id=f"G{n}",
                prefixes=prefixes,
                # Every route owns directories; the first SUFFIX_ROUTES also claim a few file types, as in the
                # reference table, so the fan-out stays the same whatever the size of the table.
                suffixes=tuple(rng.sample(EXTENSIONS, rng.randint(1, 3))) if n < SUFFIX_ROUTES else (),
                operations=rng.choice(OPERATION_MIXES),
                target=f"Target{n % 20}",
            )
        )
    return RouteTable(tuple(routes), source=f"generated-{size}")


def generated_events(table: RouteTable, count: int, seed: int = 2) -> list[Event]:
    rng = random.Random(seed)
    prefixes = [p for route in table.routes for p in route.prefixes]
    suffixes = sorted({s for route in table.routes for s in route.suffixes} | {".txt", ".log", ".tmp"})
    events = []
    for _ in range(count):
        middle = "/".join(rng.choice(["2024", "q3", "report", "raw", "a b", "ünï"]) for _ in range(rng.randint(1, 4)))
        shape = rng.random()
        if shape < 0.6:
            path = rng.choice(prefixes) + middle + "/file" + rng.choice(suffixes)
        elif shape < 0.85:
            path = "/home/" + middle + "/file" + rng.choice(suffixes)
        else:
            path = "/scratch/" + middle
        events.append((path, rng.choice(EVENT_OPERATIONS)))
    return events


def brute_force(table: RouteTable) -> Callable[[str, str], tuple[str, ...]]:
    rules = [(route.name, frozenset(route.operations), route.prefixes, route.suffixes) for route in table.routes]

    def match(path: str, operation: str) -> tuple[str, ...]:
        return tuple(
            name
            for name, operations, prefixes, suffixes in rules
            if operation in operations and (path.startswith(prefixes) or path.endswith(suffixes))
        )

    return match


def best_ns_per_call(match: Callable[[str, str], tuple[str, ...]], events: list[Event], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time_ns()
        for path, operation in events:
            match(path, operation)
        best = min(best, (time.process_time_ns() - start) / len(events))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events matched per run (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case; the best is reported (default 5)")
    parser.add_argument("--sizes", default="17,1000,10000", help="table sizes; 17 = the packaged reference routes")
    args = parser.parse_args()

    rows = []
    for size in (int(part) for part in args.sizes.split(",")):
        table = load_routes(None) if size == 17 else generated_table(size)
        started = time.perf_counter()
        router = Router(table)
        build_ms = (time.perf_counter() - started) * 1000
        events = generated_events(table, args.events)
        slow = brute_force(table)
        mismatches = sum(router.match(p, o) != slow(p, o) for p, o in events)
        if mismatches:
            raise SystemExit(f"{size} routes: the router and the brute-force loop disagree on {mismatches} events")
        results = [router.match(p, o) for p, o in events]
        routed = sum(map(bool, results)) / len(events)
        fan_out = sum(map(len, results)) / max(1, sum(map(bool, results)))
        # Brute force over 10,000 routes costs ~1 ms a match: time it on fewer events.
        brute_events = events[: max(200, args.events * 17 // max(size, 17))]
        indexed_ns = best_ns_per_call(router.match, events, args.repeat)
        brute_ns = best_ns_per_call(slow, brute_events, args.repeat)
        rows.append((size, indexed_ns, brute_ns, build_ms, routed, fan_out))

    print(
        f"{'routes':>7} | {'indexed ns/match':>16} | {'brute force ns/match':>20} | {'speed-up':>8} | "
        f"{'router build ms':>15} | routed events | routes per routed event"
    )
    print(f"{'-' * 7}-|-{'-' * 16}-|-{'-' * 20}-|-{'-' * 8}-|-{'-' * 15}-|---------------|------------------------")
    for size, indexed_ns, brute_ns, build_ms, routed, fan_out in rows:
        print(
            f"{size:>7} | {indexed_ns:>16,.0f} | {brute_ns:>20,.0f} | {brute_ns / indexed_ns:>7.1f}x | "
            f"{build_ms:>15,.1f} | {routed:>13.0%} | {fan_out:.1f}"
        )


if __name__ == "__main__":
    main()
