"""A channel new on a node: answers to its first peer's peer_online that another region's
NATS server dropped (it had not yet heard of the subscription) are caught a heartbeat
later: the node asks who is in the channel and has its peers re-announce (docs/geo.md)."""

from __future__ import annotations

from tests.conftest import NodeFactory, RunningNode
from tests.helpers import control, joined, pack, recv
from tests.mesh_helpers import NatsServer, wait_until
from tests.test_webtransport import is_op, ws_until


async def two_nodes(node_factory: NodeFactory, nats: NatsServer) -> tuple[RunningNode,
                                                                            RunningNode]:
    a = await node_factory(MESH_ID="eu-west", NATS_URL=nats.url)
    b = await node_factory(MESH_ID="us-east", NATS_URL=nats.url)
    await wait_until(lambda: a.node.liveness.nodes and b.node.liveness.nodes, 5, "heartbeats")
    return a, b


async def test_a_member_whose_answer_never_came_gets_us_a_re_announce(
        node_factory: NodeFactory, nats_server: NatsServer) -> None:
    a, b = await two_nodes(node_factory, nats_server)
    alice = await joined(a, "room", "alice")
    await alice.send(control("peer_online", "room"))  # nobody else has the channel yet
    bob = await joined(b, "room", "bob")
    await bob.send(control("peer_online", "room"))
    await ws_until(alice, is_op("peer_online", "bob"))
    # alice does not answer (as if her answer had been dropped): bob's node never hears
    # of her; a heartbeat later it asks, finds her, and asks bob to re-announce.
    again = await ws_until(bob, lambda m: m.get("op") == "channel_join", timeout=5)
    assert again["c"] == "room"
    assert b.node.presence.dropped["mesh_answers_missed"] == 1
    # bob's client re-announces; alice answers this time: bob's node knows her now.
    await bob.send(control("peer_online", "room"))
    await ws_until(alice, is_op("peer_online", "bob"))
    await alice.send(control("peer_state", "room", pack({"id": "alice"})))
    await ws_until(bob, is_op("peer_state", "alice"))
    assert "alice" in b.node.presence.realms["default"].channels["room"].remote.values()


async def test_a_healthy_join_gets_exactly_one_ack(node_factory: NodeFactory,
                                                   nats_server: NatsServer) -> None:
    a, b = await two_nodes(node_factory, nats_server)
    alice = await joined(a, "room", "alice")
    await alice.send(control("peer_online", "room"))
    bob = await joined(b, "room", "bob")
    await bob.send(control("peer_online", "room"))
    await ws_until(alice, is_op("peer_online", "bob"))
    await alice.send(control("peer_state", "room", pack({"id": "alice"})))  # she answers
    await ws_until(bob, is_op("peer_state", "alice"))
    # Past the check (a heartbeat, 1 s, plus the query): nothing more for either.
    for ws in (alice, bob):
        try:
            extra = await recv(ws, 2.5)
        except TimeoutError:
            continue
        raise AssertionError(f"unexpected frame after a healthy join: {extra}")
    assert b.node.presence.dropped["mesh_answers_missed"] == 0
    assert a.node.presence.dropped["mesh_answers_missed"] == 0
