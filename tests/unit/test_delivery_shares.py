"""Several delivery processes, the pure parts: which sinks each runs and with what shard
(``delivery_child.shares``), and one sink's figures added up over the processes that share it."""

from __future__ import annotations

import pytest

from fpolicyd.obs.metrics import SinkFigures
from fpolicyd.server.delivery_child import shares
from fpolicyd.sinks.runner import Sender
from fpolicyd.storage.shard import Shard
from support.sinks import Collect


def sender(name: str, in_flight: int, max_records: int = 40) -> Collect:
    made = Collect(max_records=max_records)
    made.name = name
    made.max_in_flight = in_flight
    return made


def senders() -> list[Sender]:
    return [sender("jsonl:/e", 1), sender("sqs:q", 64), sender("sqs:q.fifo", 1), sender("eventbridge:b", 8, 40)]


def test_one_process_runs_every_sink_unshared() -> None:
    run, shards = shares(senders(), 0, 1)
    assert [s.name for s in run] == ["jsonl:/e", "sqs:q", "sqs:q.fifo", "eventbridge:b"]
    assert shards == {}


def test_unordered_sinks_are_shared_by_blocks_of_one_read_ordered_ones_stay_in_the_first() -> None:
    first, first_shards = shares(senders(), 0, 3)
    assert [s.name for s in first] == ["jsonl:/e", "sqs:q", "sqs:q.fifo", "eventbridge:b"]
    assert first_shards == {"sqs:q": Shard(0, 3, 40), "eventbridge:b": Shard(0, 3, 40)}
    third, third_shards = shares(senders(), 2, 3)
    assert [s.name for s in third] == ["sqs:q", "eventbridge:b"]
    assert third_shards == {"sqs:q": Shard(2, 3, 40), "eventbridge:b": Shard(2, 3, 40)}


@pytest.mark.parametrize(("index", "count"), [(1, 1), (-1, 2), (2, 2)])
def test_an_index_outside_the_count_is_refused(index: int, count: int) -> None:
    with pytest.raises(ValueError, match="delivery process"):
        shares(senders(), index, count)


def test_a_shared_sinks_figures_are_added_up() -> None:
    a = SinkFigures(
        name="sqs:q",
        delivered=10,
        sends=2,
        failures=1,
        requests=3,
        retries=1,
        dead_lettered=1,
        batch_records=((1, 2, 0), 5.0),
        request_seconds=((0, 3), 0.5),
    )
    b = SinkFigures(
        name="sqs:q",
        delivered=7,
        sends=1,
        requests=2,
        last_error="throttled",
        last_error_retriable=True,
        batch_records=((0, 1, 1), 9.0),
        end_to_end_seconds=((2, 0), 0.25),
        request_seconds=((1, 1), 0.25),
    )
    total = SinkFigures.total("sqs:q", [a, b])
    assert (total.delivered, total.sends, total.failures, total.requests, total.retries, total.dead_lettered) == (
        17,
        3,
        1,
        5,
        1,
        1,
    )
    assert total.batch_records == ((1, 3, 1), 14.0)
    assert total.end_to_end_seconds == ((2, 0), 0.25)  # an empty state adds nothing
    assert total.request_seconds == ((1, 4), 0.75)
    assert (total.last_error, total.last_error_retriable) == ("throttled", True)  # failing while any part fails
    assert SinkFigures.total("jsonl:/e", [SinkFigures(name="jsonl:/e")] * 2).request_seconds is None


def test_histogram_states_of_other_bounds_are_not_added() -> None:
    with pytest.raises(ValueError, match="cannot be added"):
        SinkFigures.total(
            "q", [SinkFigures(name="q", send_seconds=((1, 2), 1.0)), SinkFigures(name="q", send_seconds=((1,), 1.0))]
        )
