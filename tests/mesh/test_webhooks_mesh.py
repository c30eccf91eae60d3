"""channel_occupied / channel_vacated across nodes over a real nats-server: each node asks
the others (mesh/query.py) on its local first-member / last-member transitions, and one
receiver gets every node's webhooks (docs/webhooks.md says what is guaranteed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from node.occupancy import event_id
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import joined
from tests.mesh_helpers import NatsServer, wait_until
from tests.webhook_receiver import SECRET, Receiver, receiving


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as rx:
        yield rx


async def mesh(node_factory: NodeFactory, nats: NatsServer, rx: Receiver,
               regions: tuple[str, ...], grace: str) -> list[RunningNode]:
    nodes = [await node_factory(MESH_ID=r, NATS_URL=nats.url, WEBHOOK_URL=rx.url,
                                WEBHOOK_SECRET=SECRET, WEBHOOK_GRACE=grace)
             for r in regions]
    for n in nodes:
        assert n.node.webhooks is not None
        n.node.webhooks.sender.window = 0.05  # the 1 s batch window, shortened for the test
        await wait_until(lambda n=n: len(n.node.liveness.nodes) >= len(regions) - 1, 10,
                         f"{n.node.node_id} to hear the others")
    return nodes


def settled(nodes: list[RunningNode]) -> bool:
    """Every decision made, every grace period over, every event delivered."""
    for n in nodes:
        w = n.node.webhooks
        assert w is not None
        if (w.occupancy.pending or len(w.occupancy.grace) or len(w.grace)
                or w.sender.queued or w.sender._inflight):
            return False
    return True


async def leave(node: RunningNode, ws: Any) -> None:
    """Close, and wait until the node has taken the peer out (its events are decided next)."""
    n = len(node.node.links)
    await ws.close()
    await wait_until(lambda: len(node.node.links) == n - 1, 5, "the peer gone")


def channel_events(rx: Receiver, channel: str) -> list[tuple[str, Any]]:
    return [(e["type"], e["mesh_id"]) for e in rx.events()
            if e["channel"] == channel and e["type"].startswith("channel_")]


@pytest.mark.parametrize("grace", ["0", "0.3"])
async def test_a_channel_used_from_three_regions_in_turn_is_occupied_and_vacated_once(
        receiver: Receiver, node_factory: NodeFactory, nats_server: NatsServer,
        grace: str) -> None:
    a, b, c = nodes = await mesh(node_factory, nats_server, receiver, ("eu", "us", "ap"),
                                 grace)
    alice = await joined(a, "room", "alice")
    await wait_until(lambda: settled(nodes), 10, "alice's events")
    bob = await joined(b, "room", "bob")
    await wait_until(lambda: settled(nodes), 10, "bob's events")
    assert b.node.webhooks is not None
    taken = b.node.webhooks.occupancy.answer({"app": "default", "channel": "room"})["period"]
    period = (taken[0], taken[1])
    assert period[1] == a.node.node_id
    await leave(a, alice)
    await wait_until(lambda: settled(nodes), 10, "alice gone")
    carol = await joined(c, "room", "carol")
    await wait_until(lambda: settled(nodes), 10, "carol's events")
    await leave(b, bob)
    await wait_until(lambda: settled(nodes), 10, "bob gone")
    await leave(c, carol)
    await wait_until(lambda: channel_events(receiver, "room")[-1:] == [
        ("channel_vacated", "ap")], 10, "the vacancy")
    await wait_until(lambda: settled(nodes), 10, "everything delivered")
    assert channel_events(receiver, "room") == [("channel_occupied", "eu"),
                                                ("channel_vacated", "ap")]
    # Both ids name the period eu began, which us took over (and ap from us).
    occupied_, vacated = (e for e in receiver.events() if e["type"].startswith("channel_"))
    assert occupied_["id"] == event_id("channel_occupied", "default", "room", period)
    assert vacated["id"] == event_id("channel_vacated", "default", "room", period)
    members = [(e["type"], e["user_id"], e["mesh_id"]) for e in receiver.events()
               if e["type"].startswith("member_")]
    assert members == [("member_joined", "alice", "eu"), ("member_joined", "bob", "us"),
                       ("member_left", "alice", "eu"), ("member_joined", "carol", "ap"),
                       ("member_left", "bob", "us"), ("member_left", "carol", "ap")]
    assert all(r["signed"] for r in receiver.requests)
    # Each transition asked the others, and they answered (none missing).
    assert all(n.node.webhooks is not None and n.node.webhooks.occupancy.ask_failures == 0
               for n in nodes)


async def test_two_regions_gaining_their_first_member_at_once_send_one_occupied(
        receiver: Receiver, node_factory: NodeFactory, nats_server: NatsServer) -> None:
    nodes = await mesh(node_factory, nats_server, receiver, ("eu", "us"), "0")
    for round_ in range(5):
        channel = f"room-{round_}"
        alice, bob = await asyncio.gather(joined(nodes[0], channel, "alice"),
                                          joined(nodes[1], channel, "bob"))
        await wait_until(lambda: settled(nodes), 10, "the decisions")
        kinds = [k for k, _ in channel_events(receiver, channel)]
        assert kinds == ["channel_occupied"], (channel, channel_events(receiver, channel))
        # Both leave at once: each asks while the other may be empty already, so both
        # may tell the vacancy, but with one id (the period's): once, for a receiver that
        # drops repeated ids (docs/webhooks.md).
        await asyncio.gather(alice.close(), bob.close())
        await wait_until(lambda c=channel: "channel_vacated" in [
            k for k, _ in channel_events(receiver, c)], 10, "the vacancy")
        await wait_until(lambda: settled(nodes), 10, "everything delivered")
        vacated = [e for e in receiver.events()
                   if e["channel"] == channel and e["type"] == "channel_vacated"]
        assert 1 <= len(vacated) <= 2 and len({e["id"] for e in vacated}) == 1, vacated
