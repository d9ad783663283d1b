"""RankStreams: the driver's view of a rank group. A failure on one thread must not split a handoff
event being applied on another (its first token delivered or not, the handoff passed on or not,
always together); otherwise a killed prefill rank loses a request's first token."""

from __future__ import annotations

import threading
from typing import Any

from moecluster.workers.engine.outputs import CompletionOutput, RequestOutput, to_wire
from moecluster.workers.engine.rank_streams import RankStreams


def _first_token(request_id: str, token: int) -> tuple:
    # What a prefill rank reports for a sample it handed over: one token, no finish reason,
    # the request finished on that rank (in the outbox's wire form).
    return to_wire([RequestOutput(request_id, None, [], [CompletionOutput(0, "", [token])], finished=True)])[0]


def test_a_failure_waits_for_the_handoff_being_applied() -> None:
    order: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def sink(item: Any) -> None:
        if isinstance(item, RequestOutput):
            order.append(f"token {item.outputs[0].token_ids[0]}")
            entered.set()
            assert release.wait(10)
        else:
            order.append("error")

    streams = RankStreams(2, "test group", lambda kind, rank, payload: order.append(f"{kind} {payload}"))
    streams.open("a", sink, 1)
    handler = threading.Thread(target=streams.handle, args=(("handoff", 1, ([_first_token("a", 7)], ["h-a"])),))
    handler.start()
    assert entered.wait(10)
    failer = threading.Thread(target=streams.fail, args=("rank 0 is gone",))
    failer.start()
    failer.join(0.3)
    assert failer.is_alive(), "fail() returned while a handoff event was half applied"
    release.set()
    handler.join(10)
    failer.join(10)
    order.append("failed")
    # The finished first-token output closed the stream, so the failure has nobody to tell.
    assert order == ["token 7", "handoff h-a", "failed"]
    assert streams.error == "rank 0 is gone"


def test_events_after_a_failure_are_dropped_and_every_open_stream_hears_it() -> None:
    got: dict[str, list[Any]] = {"a": [], "b": []}
    heard: list[Any] = []
    streams = RankStreams(2, "test group", lambda kind, rank, payload: heard.append(payload))
    assert streams.open("a", got["a"].append) == 0
    assert streams.open("b", got["b"].append) == 1  # the rank with fewer open requests
    assert streams.load() == [1, 1]
    streams.handle(("out", 0, to_wire([RequestOutput("a", None, [], [CompletionOutput(0, "", [5])])])))
    streams.fail("rank 1 is gone")
    streams.fail("a second reason")  # the first one stays
    streams.handle(("handoff", 1, ([_first_token("b", 9)], ["h-b"])))
    assert [o.outputs[0].token_ids for o in got["a"][:1]] == [[5]]
    assert [str(e) for e in got["a"][1:]] == ["test group failed: rank 1 is gone"]
    assert [str(e) for e in got["b"]] == ["test group failed: rank 1 is gone"]
    assert heard == [] and streams.load() == [0, 0]


def test_outputs_survive_the_wire_form() -> None:
    from moecluster.workers.engine.outputs import Logprob, from_wire

    outs = [
        RequestOutput("a", None, [], [CompletionOutput(0, " hi", [7], -0.25, [{7: Logprob(-0.25, 1), 9: Logprob(-2.0, 2)}]),
                                      CompletionOutput(1, "", [8], None, None, "stop", 8)], finished=False),
        RequestOutput("b#3", None, [], [CompletionOutput(0, "", [], finish_reason="abort")], finished=True),
    ]
    import pickle

    assert from_wire(pickle.loads(pickle.dumps(to_wire(outs)))) == outs


def test_the_wire_tuple_follows_the_completion_fields() -> None:
    """from_wire rebuilds CompletionOutput positionally: a new field must join the wire form."""
    import dataclasses

    c = CompletionOutput(3, "t", [1], -0.5, None, "stop", 2)
    (_, _, (row,)), = to_wire([RequestOutput("x", None, [], [c])])
    assert len(row) == len(dataclasses.fields(CompletionOutput))
    assert row == tuple(getattr(c, f.name) for f in dataclasses.fields(CompletionOutput))
