"""A synchronous session's STATUS_QUERY answers against a brute-force model.

Any interleaving of requests (by either decoder, ids that repeat), answers written once durable (in any order, late
ones included), cancels and queries: each query is answered exactly as a model that replays the whole history from
the start says, and the session never tracks more than its bound."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.protocol.messages import (
    STATUS_IN_PROGRESS,
    STATUS_REQUEST_LOST,
    ScreenCancel,
    StatusQuery,
    StatusQueryResp,
)
from fpolicyd.protocol.session import FileNotification, OutstandingRequests, PendingAnswer, Reply, Session
from fpolicyd.protocol.session_config import EngineMode, SessionConfig
from fpolicyd.protocol.xml_codec import decode_payload, encode_message
from support.captures import NEGO_REQ
from support.notifications import frame

#: Few ids, so that requests repeat, collide with cancels and are asked about after their answer.
REQ_IDS = st.integers(min_value=1, max_value=6)


@dataclass(frozen=True)
class Request:
    req_id: int
    decoder: bool  # the full decoder (receive) rather than the canonical reader's entry (screened)


@dataclass(frozen=True)
class Answer:
    pick: int  # which not-yet-written answer, modulo how many there are


@dataclass(frozen=True)
class Cancel:
    req_id: int


@dataclass(frozen=True)
class Query:
    req_id: int


Step = Request | Answer | Cancel | Query

STEPS = st.lists(
    st.one_of(
        st.builds(Request, REQ_IDS, st.booleans()),
        st.builds(Answer, st.integers(min_value=0, max_value=50)),
        st.builds(Cancel, REQ_IDS),
        st.builds(Query, REQ_IDS),
    ),
    max_size=60,
)


def model_answer(history: list[tuple[str, int, int]], req_id: int, bound: int) -> int:
    """Replay everything that happened, from the start, with the plainest bookkeeping there is: a list of
    (req_id, copy) in the order their newest copy arrived. ``history`` holds ("request", req_id, copy),
    ("answer", req_id, copy) and ("cancel", req_id, 0)."""
    waiting: list[tuple[int, int]] = []
    for what, rid, copy in history:
        if what == "request":
            waiting = [w for w in waiting if w[0] != rid] + [(rid, copy)]
            if len(waiting) > bound:
                waiting = waiting[1:]
        elif what == "answer":
            waiting = [w for w in waiting if w != (rid, copy)]
        else:
            waiting = [w for w in waiting if w[0] != rid]
    return STATUS_IN_PROGRESS if any(w[0] == req_id for w in waiting) else STATUS_REQUEST_LOST


@given(steps=STEPS, bound=st.integers(min_value=1, max_value=4))
@settings(max_examples=400, deadline=None)
def test_status_answers_match_the_model(steps: list[Step], bound: int) -> None:
    session = Session(SessionConfig(engine_mode=EngineMode.SYNC, max_outstanding=bound), peer="p", now=0.0)
    session.receive(NEGO_REQ.payload, 0.0)
    history: list[tuple[str, int, int]] = []
    unwritten: list[tuple[PendingAnswer, int]] = []  # (answer, copy number in the model)
    copies = 0
    for step in steps:
        if isinstance(step, Request):
            copies += 1
            if step.decoder:
                [out] = session.receive(frame(step.req_id, "SMB_WR", "/a.txt")[6:], 1.0)
                assert isinstance(out, FileNotification)
                answer = out.response
            else:
                answer = session.screened(step.req_id, "SMB_WR", 1.0)
            assert answer is not None
            assert answer.req_id == step.req_id
            unwritten.append((answer, copies))
            history.append(("request", step.req_id, copies))
        elif isinstance(step, Answer):
            if unwritten:
                answer, copy = unwritten.pop(step.pick % len(unwritten))
                session.answered(answer)
                history.append(("answer", answer.req_id, copy))
        elif isinstance(step, Cancel):
            session.receive(encode_message(ScreenCancel(step.req_id, "SMB_WR", "2"))[6:], 1.0)
            history.append(("cancel", step.req_id, 0))
        else:
            outputs = session.receive(encode_message(StatusQuery(step.req_id, "SMB_WR"))[6:], 1.0)
            [reply] = [o for o in outputs if isinstance(o, Reply)]
            assert decode_payload(reply.data[6:]).message == StatusQueryResp(
                step.req_id, "SMB_WR", model_answer(history, step.req_id, bound)
            )
        assert len(session.outstanding) <= bound


@given(req_ids=st.lists(REQ_IDS, max_size=40), bound=st.integers(min_value=1, max_value=4))
@settings(max_examples=200, deadline=None)
def test_every_request_beyond_the_bound_is_counted(req_ids: list[int], bound: int) -> None:
    """Requests never answered: the tracker keeps the newest ``bound`` distinct ids and counts each one it let go."""
    tracker = OutstandingRequests(bound)
    waiting: list[int] = []  # the model: oldest first
    evicted = 0
    for req_id in req_ids:
        tracker.received(req_id)
        waiting = [w for w in waiting if w != req_id] + [req_id]
        if len(waiting) > bound:
            waiting, evicted = waiting[1:], evicted + 1
    newest_first = list(dict.fromkeys(reversed(req_ids)))
    assert len(tracker) == min(bound, len(newest_first))
    assert all(req_id in tracker for req_id in newest_first[:bound])
    assert not any(req_id in tracker for req_id in newest_first[bound:])
    assert tracker.untracked == evicted
