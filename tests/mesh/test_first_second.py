"""A node's first second: one join, one ack, unless the mesh really could have missed it.

Until a node hears its own first heartbeat come back (mesh/liveness.py), its mesh link is
not proven. Peers joining then must not be asked to re-announce (a second join ack) when
the bus was up all along; they must be when the bus came up only after they joined.
"""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import ClientConnection

from mesh.bus import CONNECTED, RECONNECTING, BusMessage, EmbeddedBus
from mesh.liveness import Liveness, heartbeat_subject
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import join_frame, joined, recv
from tests.mesh.conftest import NatsFactory
from tests.mesh_helpers import NatsServer, wait_until


async def settled(node: RunningNode) -> None:
    """The node has heard its own heartbeat, and a resync it scheduled has run."""
    await wait_until(lambda: node.node.liveness.link_ok and node.node._resync is None, 5,
                     "own heartbeat back, no resync pending")


async def next_is_ack_for(ws: ClientConnection, channel: str, client_id: str) -> None:
    """Per-connection order: the ack of a new join is the next frame, so nothing (no
    second ack of an earlier join) came before it."""
    await ws.send(join_frame(channel, client_id))
    got = await recv(ws)
    assert got.get("op") == "channel_join" and got.get("c") == channel, got


async def test_a_peer_joining_in_the_first_second_gets_exactly_one_ack(
        node_factory: NodeFactory, nats_server: NatsServer) -> None:
    node = await node_factory(MESH_ID="east", NATS_URL=nats_server.url)
    assert node.node.bus.up  # /health answers, NATS is connected
    ws = await joined(node, "room", "alice", ping_interval=None)
    # The case at hand: the join (and its ack) came before the first link check.
    assert not node.node.liveness.link_ok, "joined too late to test the first second"
    await settled(node)
    await next_is_ack_for(ws, "lobby", "alice")
    await ws.close()


async def test_a_peer_that_joined_while_the_bus_was_down_is_asked_to_re_announce(
        node_factory: NodeFactory, nats_factory: NatsFactory) -> None:
    nats = nats_factory("late")
    nats.kill()  # the node starts without its NATS server (it serves local peers)
    node = await node_factory(MESH_ID="east", NATS_URL=nats.url, NATS_RECONNECT_WAIT="0.05")
    assert not node.node.bus.up
    ws = await joined(node, "room", "alice", ping_interval=None)
    nats.start()
    # Its peer_online could not go out: the first link asks for it again.
    again = await recv(ws, timeout=15)
    assert again.get("op") == "channel_join" and again.get("c") == "room", again
    await settled(node)
    await next_is_ack_for(ws, "lobby", "alice")  # and only once
    await ws.close()


# -- the rule, with a fake clock ------------------------------------------------


class FakeBus(EmbeddedBus):
    def go(self, state: str) -> None:
        self._set_state(state)


def make(peers: int = 1, now: float = 100.0) -> tuple[Liveness, FakeBus, list[str]]:
    bus = FakeBus()
    bus.go(CONNECTED)
    resyncs: list[str] = []
    lv = Liveness(bus, "me", "m", interval=1.0, timeout=3.0, clock=lambda: now,
                  on_resync=resyncs.append, stats=lambda: {"peers": peers})
    lv.link_lost_at = 100.0  # what start() sets
    return lv, bus, resyncs


async def echo(lv: Liveness) -> None:
    body = json.dumps({"node": "me", "mesh": "m", "state": "alive"}).encode()
    await lv._receive(BusMessage(heartbeat_subject("m", "me"), body))


@pytest.mark.unit
async def test_first_link_with_the_bus_up_all_along_asks_nobody() -> None:
    lv, _, resyncs = make()
    await echo(lv)
    lv.check(100.0)
    assert lv.link_ok and resyncs == []


@pytest.mark.unit
async def test_first_link_after_a_bus_outage_with_local_peers_asks_them() -> None:
    lv, bus, resyncs = make()
    bus.go(RECONNECTING)
    lv.check(100.0)
    bus.go(CONNECTED)
    await echo(lv)
    lv.check(100.0)
    assert resyncs == ["first link with local peers"]


@pytest.mark.unit
async def test_first_link_after_a_bus_outage_without_peers_asks_nobody() -> None:
    lv, bus, resyncs = make(peers=0)
    bus.go(RECONNECTING)
    bus.go(CONNECTED)
    await echo(lv)
    lv.check(100.0)
    assert lv.link_ok and resyncs == []


@pytest.mark.unit
async def test_a_first_heartbeat_back_unusually_late_asks_local_peers() -> None:
    lv, _, resyncs = make(now=103.0)  # 3 s after start: more than link_grace (2 s)
    await echo(lv)
    lv.check(103.0)
    assert resyncs == ["first link with local peers"]
