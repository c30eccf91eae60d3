"""Membership webhooks on real sockets: a node with WebSocket peers, and a local receiver
(aiohttp.web) that checks every signature the way docs/webhooks.md tells a backend to."""

from __future__ import annotations

import base64
import json
import logging
import statistics
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from node.webhooks import STOP_FLUSH, Event, Sender
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import data_frame, get, joined, recv
from tests.mesh_helpers import wait_until
from tests.webhook_receiver import SECRET, Receiver, receiving


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as rx:
        yield rx



async def hooked(node_factory: NodeFactory, rx: Receiver, **env: Any) -> RunningNode:
    base = {"WEBHOOK_URL": rx.url, "WEBHOOK_SECRET": SECRET, "WEBHOOK_GRACE": "0"}
    rn = await node_factory(**{**base, **env})
    assert rn.node.webhooks is not None
    rn.node.webhooks.sender.window = 0.05  # the 1 s batch window, shortened for the test
    return rn


async def metrics(rn: RunningNode) -> dict[str, float]:
    _, _, body = await get(f"https://127.0.0.1:{rn.port}/metrics")
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in
                                         body.decode().splitlines()
                                         if line and not line.startswith("#"))}


async def gone(rn: RunningNode, n: int) -> None:
    await wait_until(lambda: len(rn.node.links) == n, 5.0, f"{n} peers left on the node")


async def test_member_joined_and_left_signed_with_every_field(
        receiver: Receiver, node_factory: NodeFactory) -> None:
    rn = await hooked(node_factory, receiver)
    before = time.time()
    alice = await joined(rn, "room", "alice")
    await wait_until(lambda: len(receiver.events()) == 2, 5.0, "joined + occupied")
    await alice.close()
    await wait_until(lambda: len(receiver.events()) == 4, 5.0, "left + vacated")
    events = receiver.events()
    # A channel event is decided apart from the member events (it asks the mesh): only
    # each kind's own order holds.
    assert sorted((e["type"], e["user_id"]) for e in events[:2]) == [
        ("channel_occupied", None), ("member_joined", "alice")]
    assert sorted((e["type"], e["user_id"]) for e in events[2:]) == [
        ("channel_vacated", None), ("member_left", "alice")]
    for e in events:
        assert set(e) == {"id", "type", "app", "channel", "user_id", "mesh_id", "at"}
        assert (e["app"], e["channel"], e["mesh_id"]) == ("default", "room", "local")
        assert e["at"].endswith("Z") and len(e["at"]) == len("2024-01-01T00:00:00.000Z")
        at = datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp()
        assert before - 0.01 <= at <= time.time()
    assert len({e["id"] for e in events}) == 4
    assert all(r["signed"] for r in receiver.requests)
    assert all(r["headers"]["Content-Type"] == "application/json" for r in receiver.requests)
    m = await metrics(rn)
    assert m["prscd_webhook_batches_sent_total"] == len(receiver.requests)
    assert m["prscd_webhook_events_sent_total"] == 4
    assert m["prscd_webhook_batches_failed_total"] == 0
    assert rn.node.stats()["webhooks"]["events_sent"] == 4


async def test_two_tabs_of_one_id_are_one_member(
        receiver: Receiver, node_factory: NodeFactory) -> None:
    rn = await hooked(node_factory, receiver)
    tab1 = await joined(rn, "room", "alice")
    tab2 = await joined(rn, "room", "alice")
    await tab1.close()
    await gone(rn, 1)
    bob = await joined(rn, "room", "bob")  # a marker: events go out in the order queued
    await wait_until(lambda: ("member_joined", "room", "bob") in receiver.seen("member_joined"),
                     5.0, "bob's member_joined")
    await tab2.close()
    await wait_until(lambda: receiver.seen("member_left"), 5.0, "alice's member_left")
    assert receiver.seen("member_joined", "member_left") == [
        ("member_joined", "room", "alice"), ("member_joined", "room", "bob"),
        ("member_left", "room", "alice")]
    await bob.close()


async def test_back_within_the_grace_window_nothing_beyond_it_left_then_joined(
        receiver: Receiver, node_factory: NodeFactory) -> None:
    rn = await hooked(node_factory, receiver, WEBHOOK_GRACE="0.5")
    alice = await joined(rn, "room", "alice")
    await alice.close()
    await gone(rn, 0)
    alice = await joined(rn, "room", "alice")  # a reload: back within 0.5 s
    # A marker: carol's member_left is held 0.5 s too, after alice's would have been.
    carol = await joined(rn, "hall", "carol")
    await carol.close()
    await wait_until(lambda: receiver.seen("member_left"), 5.0, "carol's member_left")
    assert receiver.seen("member_joined", "member_left", "channel_vacated") == [
        ("member_joined", "room", "alice"), ("member_joined", "hall", "carol"),
        ("member_left", "hall", "carol"), ("channel_vacated", "hall", None)]
    # Beyond the grace: alice left, then joined again.
    await alice.close()
    await wait_until(lambda: ("member_left", "room", "alice") in receiver.seen("member_left"),
                     5.0, "alice's member_left")
    alice = await joined(rn, "room", "alice")
    await wait_until(lambda: len(receiver.seen("member_joined")) == 3, 5.0, "the new join")
    assert receiver.seen("member_joined", "member_left")[-2:] == [
        ("member_left", "room", "alice"), ("member_joined", "room", "alice")]
    assert len(receiver.seen("channel_occupied")) == 3  # room, hall, room again
    await alice.close()


async def test_a_500_is_retried_with_the_same_event_ids(
        receiver: Receiver, node_factory: NodeFactory) -> None:
    receiver.script = [500, 503]
    rn = await hooked(node_factory, receiver)
    alice = await joined(rn, "room", "alice")
    await wait_until(lambda: len(receiver.requests) == 3, 10.0, "two retries")
    first, second, third = (r["body"] for r in receiver.requests)
    assert first == second == third  # the same events, the same ids
    assert all(r["signed"] for r in receiver.requests)  # each attempt signed anew
    assert [r["status"] for r in receiver.requests] == [500, 503, 200]
    # The backoff: 0.25-0.5 s, then 0.5-1 s.
    gaps = [b["at"] - a["at"] for a, b in zip(receiver.requests[:-1], receiver.requests[1:], strict=True)]
    assert 0.2 < gaps[0] < 1.0 and 0.45 < gaps[1] < 1.5, gaps
    # The receiver has answered 200; the node counts the batch once that answer reaches it.
    await wait_until(lambda: rn.node.stats()["webhooks"]["batches_sent"] == 1, 5.0, "sent counted")
    assert rn.node.stats()["webhooks"]["batches_retried"] == 2
    await alice.close()


async def test_a_4xx_refusal_is_dropped_counted_and_not_retried(
        receiver: Receiver, node_factory: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    receiver.script = [400]
    rn = await hooked(node_factory, receiver, WEBHOOK_URL=receiver.url.replace(
        "http://", "http://hookuser:hookpass@"))
    alice = await joined(rn, "room", "alice")
    await wait_until(lambda: rn.node.stats()["webhooks"]["batches_failed"] == 1, 5.0,
                     "the refusal")
    refused = len(receiver.requests[0]["body"]["events"])
    bob = await joined(rn, "room", "bob")  # the next batch still goes
    await wait_until(lambda: receiver.seen("member_joined"), 5.0, "bob's member_joined")
    assert [r["status"] for r in receiver.requests] == [400, 200]
    assert receiver.seen("member_joined") == [("member_joined", "room", "bob")]
    _, _, body = await get(f"https://127.0.0.1:{rn.port}/health")
    assert json.loads(body)["dropped"]["webhook_refused"] == refused
    # Credentials in the URL go as Basic auth, and are never logged (nor the path).
    auth = receiver.requests[0]["headers"]["Authorization"]
    assert base64.b64decode(auth.removeprefix("Basic ")) == b"hookuser:hookpass"
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("prscd"))
    assert "status=400" in ours and "hookpass" not in ours and "/hook" not in ours
    await alice.close()
    await bob.close()


async def broadcast_latencies(rn: RunningNode, n: int = 40) -> list[float]:
    sender = await joined(rn, "lat", "sender")
    reader = await joined(rn, "lat", "reader")
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await sender.send(data_frame("lat", "ping", f'"{i}"'))
        while (await recv(reader))["t"] != "data":
            pass
        out.append(time.perf_counter() - t0)
    await sender.close()
    await reader.close()
    return out


async def test_a_receiver_that_never_answers_hurts_no_peer(
        receiver: Receiver, node_factory: NodeFactory) -> None:
    receiver.script = ["hang"] * 1000  # never answers
    rn = await hooked(node_factory, receiver, WEBHOOK_TIMEOUT="0.3", WEBHOOK_QUEUE="20")
    webhooks = rn.node.webhooks
    assert webhooks is not None
    t0 = time.perf_counter()
    # (These peers read nothing: an unbounded client queue keeps their closes quick.)
    peers = [await joined(rn, "room", f"user-{i}", max_queue=None) for i in range(60)]
    join_s = time.perf_counter() - t0
    latencies = await broadcast_latencies(rn)
    p50, worst = statistics.median(latencies), max(latencies)
    print(f"60 joins in {join_s:.2f} s; broadcast p50 {p50 * 1000:.1f} ms, "
          f"max {worst * 1000:.1f} ms")
    assert p50 < 0.05 and worst < 0.5 and join_s < 10
    # Bounded: 20 events wait at most (the hung batch included); the rest were dropped.
    sender = webhooks.sender
    assert sender.queued + len(sender._inflight) <= 20
    await wait_until(lambda: webhooks.stats()["batches_retried"] >= 2, 5.0, "retries")
    _, _, body = await get(f"https://127.0.0.1:{rn.port}/health")
    dropped = json.loads(body)["dropped"]
    assert dropped["webhook_queue_full"] >= 60 + 4 - 20, dropped  # 60 + sender/reader, x2
    for p in peers:
        await p.close()
    # The stop: one last attempt within STOP_FLUSH, then what is left is counted.
    t0 = time.monotonic()
    await rn.app.stop()
    assert time.monotonic() - t0 < STOP_FLUSH + 1.5
    assert rn.node.presence.dropped["webhook_undelivered"] > 0
    assert rn.node.stats()["webhooks"]["batches_failed"] >= 1


async def test_held_events_are_delivered_at_the_stop(
        receiver: Receiver, node_factory: NodeFactory) -> None:
    rn = await hooked(node_factory, receiver, WEBHOOK_GRACE="60")
    await joined(rn, "room", "alice")
    await wait_until(lambda: receiver.seen("member_joined"), 5.0, "alice's member_joined")
    await rn.app.stop()  # alice goes offline: her left is held for 60 s, but the node stops
    assert receiver.seen("member_left", "channel_vacated") == [
        ("member_left", "room", "alice"), ("channel_vacated", "room", None)]
    assert "webhook_undelivered" not in rn.node.presence.dropped


async def test_batches_of_100_at_once_the_rest_one_window_after_the_first(
        receiver: Receiver) -> None:
    """The sender on its own: 250 events queued at once, a 0.3 s window."""
    counted: dict[str, int] = {}
    sender = Sender(receiver.url, SECRET, mesh_id="eu", timeout=2.0, limit=1000,
                    count_drop=lambda r, n: counted.__setitem__(r, counted.get(r, 0) + n),
                    window=0.3)
    sender.start()
    t0 = time.monotonic()
    for i in range(250):
        assert sender.put(Event("member_joined", "app", "room", f"u{i}", 1.0))
    await wait_until(lambda: len(receiver.requests) == 3, 5.0, "three batches")
    sizes = [len(r["body"]["events"]) for r in receiver.requests]
    after = [r["at"] - t0 for r in receiver.requests]
    assert sizes == [100, 100, 50]
    assert after[1] < 0.3 <= after[2] < 1.5, after  # full ones at once, the rest after 0.3 s
    assert [e["user_id"] for e in receiver.events()] == [f"u{i}" for i in range(250)]
    await sender.aclose()
    assert counted == {}
