"""MeshQuery on the in-process bus: several nodes' queries on one EmbeddedBus, each with a
real Liveness table filled by hand (no heartbeats, no sockets)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import pytest

from mesh.bus import BusMessage, EmbeddedBus
from mesh.liveness import Liveness, NodeInfo
from mesh.query import ALL_QUERIES, QUERY_ROOT, MeshQuery, QueryBusy
from tests.mesh_helpers import wait_until

pytestmark = pytest.mark.unit


async def mesh(names: list[str], *, alive: list[str] | None = None, timeout: float = 5.0,
               **kw: Any) -> tuple[EmbeddedBus, dict[str, MeshQuery]]:
    """One bus, a MeshQuery per name answering ``who``; every node believes ``alive``
    (default: all names) alive."""
    bus = EmbeddedBus()
    await bus.connect()
    queries = {}
    for name in names:
        liveness = Liveness(bus, name, "m")
        for other in alive if alive is not None else names:
            if other != name:
                liveness.nodes[other] = NodeInfo(other, 0.0)
        q = MeshQuery(bus, name, liveness, timeout, **kw)
        q.handle("who", lambda body, name=name: {"me": name, "asked": body})
        await q.start()
        queries[name] = q
    return bus, queries


async def test_alone_it_answers_itself_and_publishes_nothing() -> None:
    bus, qs = await mesh(["a"])
    g = await qs["a"].ask("who", {"x": 1})
    assert g.answers == {"a": {"me": "a", "asked": {"x": 1}}}
    assert (g.answered, g.missing) == (["a"], [])
    assert bus.published == 0


async def test_every_live_node_answers_this_one_first_before_the_deadline() -> None:
    _, qs = await mesh(["a", "b", "c"], timeout=5.0)
    t0 = time.monotonic()
    g = await qs["b"].ask("who", {"q": "members"})
    assert time.monotonic() - t0 < 1.0  # did not wait for the deadline
    assert g.answered[0] == "b" and sorted(g.answered) == ["a", "b", "c"]
    assert g.answers["c"] == {"me": "c", "asked": {"q": "members"}}
    assert g.missing == []


async def test_a_live_node_that_does_not_answer_is_missing_at_the_deadline() -> None:
    _, qs = await mesh(["a", "b"], alive=["a", "b", "ghost"], timeout=0.3)
    t0 = time.monotonic()
    g = await qs["a"].ask("who", {})
    assert 0.25 <= time.monotonic() - t0 < 1.5
    assert sorted(g.answered) == ["a", "b"] and g.missing == ["ghost"]


async def test_unknown_kind_and_failing_handler_are_answered_with_an_error() -> None:
    _, qs = await mesh(["a", "b"], timeout=5.0)
    g = await qs["a"].ask("nosuch", {})
    assert g.answers == {"a": {"error": "unknown query kind 'nosuch'"},
                         "b": {"error": "unknown query kind 'nosuch'"}}
    for q in qs.values():
        q.handle("boom", lambda body: body["missing"])
    g = await qs["a"].ask("boom", {})
    assert g.answers["b"] == {"error": "boom failed: KeyError"} and g.missing == []
    with pytest.raises(ValueError):
        qs["a"].handle("Bad.Kind", lambda body: {})


async def test_an_answer_over_the_limit_becomes_an_error_at_its_node() -> None:
    drops: list[str] = []
    _, qs = await mesh(["a", "b"], timeout=5.0, max_reply_bytes=4096, on_drop=drops.append)
    qs["b"].handle("big", lambda body: {"blob": "x" * 10_000})
    qs["a"].handle("big", lambda body: {"small": True})
    g = await qs["a"].ask("big", {})
    assert g.answers["b"]["error"].startswith("answer of 100") and "over the limit" in \
        g.answers["b"]["error"]
    assert qs["b"].dropped["query_answer_too_big"] == 1 and drops == ["query_answer_too_big"]


async def test_a_reply_over_the_askers_limit_is_dropped_counted_and_not_waited_for() -> None:
    bus, qs = await mesh(["a"], alive=["a", "b"], timeout=5.0, max_reply_bytes=1000)
    big = MeshQuery(bus, "b", Liveness(bus, "b", "m"), 5.0)  # a bigger limit: it sends
    big.handle("who", lambda body: {"blob": "x" * 5000})
    await big.start()
    t0 = time.monotonic()
    g = await qs["a"].ask("who", {})
    assert time.monotonic() - t0 < 1.0
    assert g.answered == ["a"] and g.missing == ["b"]
    assert qs["a"].dropped["query_reply_too_big"] == 1


async def test_a_handler_never_runs_inside_the_bus_callback() -> None:
    _, qs = await mesh(["a"])
    calls: list[str] = []
    qs["a"].handle("slow", lambda body: calls.append("ran") or {})
    request = msgpack.packb({"v": 1, "kind": "slow", "body": {}, "from": "other"})
    await qs["a"]._on_request(BusMessage(f"{QUERY_ROOT}.slow", request, reply="_INBOX.x.1"))
    assert calls == []  # the callback returned first
    await wait_until(lambda: calls == ["ran"], 2, "the handler, in its own task")


async def test_answers_for_others_are_bounded_and_busy_is_an_answer() -> None:
    bus, qs = await mesh(["a"], max_answering=1)
    replies: list[dict[str, Any]] = []

    async def collect(message: BusMessage) -> None:
        head = msgpack.Unpacker(raw=False)
        head.feed(message.data)
        replies.append({"node": head.unpack(), **head.unpack()})

    await bus.subscribe("_INBOX.t.*", collect)
    request = msgpack.packb({"v": 1, "kind": "who", "body": {}, "from": "other"})
    for i in range(2):  # no await between them lets the first answer run
        await qs["a"]._on_request(BusMessage(ALL_QUERIES, request, reply=f"_INBOX.t.{i}"))
    await wait_until(lambda: len(replies) == 2, 2, "both replies")
    assert {"node": "a", "error": "busy: too many queries at once"} in replies
    assert {"node": "a", "answer": {"me": "a", "asked": {}}} in replies
    assert qs["a"].dropped["query_busy"] == 1


async def test_asks_waiting_at_once_are_bounded() -> None:
    _, qs = await mesh(["a"], alive=["a", "ghost"], timeout=0.5, max_pending=1)
    first = asyncio.ensure_future(qs["a"].ask("who", {}))
    await wait_until(lambda: qs["a"]._pending, 1, "the first ask waiting")
    with pytest.raises(QueryBusy):
        await qs["a"].ask("who", {})
    assert (await first).missing == ["ghost"]


async def test_late_malformed_oversized_and_own_requests_are_counted_or_ignored() -> None:
    bus, qs = await mesh(["a"])
    a = qs["a"]
    head = msgpack.packb("b")
    await bus.publish(f"{a._inbox}.999", head + msgpack.packb({"answer": {}}))
    await a._on_request(BusMessage(ALL_QUERIES, b"\xc1"))
    await a._on_request(BusMessage(ALL_QUERIES, b"x" * 20_000))
    own = msgpack.packb({"v": 1, "kind": "who", "body": {}, "from": "a"})
    await a._on_request(BusMessage(ALL_QUERIES, own, reply="_INBOX.own.1"))
    assert not a._answering  # its own ask: answered locally already
    no_reply = msgpack.packb({"v": 1, "kind": "who", "body": {}, "from": "z"})
    await a._on_request(BusMessage(ALL_QUERIES, no_reply))
    assert dict(a.dropped) == {"query_reply_late": 1, "query_request_malformed": 2,
                               "query_request_too_big": 1}


async def test_stop_releases_waiting_asks() -> None:
    _, qs = await mesh(["a"], alive=["a", "ghost"], timeout=30.0)
    pending = asyncio.ensure_future(qs["a"].ask("who", {}))
    await wait_until(lambda: qs["a"]._pending, 1, "the ask waiting")
    await qs["a"].stop()
    g = await asyncio.wait_for(pending, 2)
    assert g.missing == ["ghost"]
