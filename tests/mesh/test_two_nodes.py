"""Two nodes on one nats-server, real @yomo/presence clients on each."""

from __future__ import annotations

from tests.conftest import NodeFactory, RunningNode
from tests.e2e.puppet import Puppet
from tests.mesh.conftest import PuppetFactory
from tests.mesh_helpers import NatsServer, wait_until


async def two_nodes(node_factory: NodeFactory, nats: NatsServer) -> tuple[RunningNode, RunningNode]:
    a = await node_factory(MESH_ID="east", NATS_URL=nats.url)
    b = await node_factory(MESH_ID="west", NATS_URL=nats.url)
    for n in (a, b):
        assert n.node.bus.state == "connected", n.node.bus.state
    # Each node has heard the other's heartbeat: the mesh is formed.
    await wait_until(lambda: a.node.liveness.nodes and b.node.liveness.nodes, 5, "heartbeats")
    return a, b


async def client(make: PuppetFactory, node: RunningNode, name: str, channel: str = "room",
                 **state: object) -> Puppet:
    p = await make(name)
    await p.connect(node.url, "key", name)
    await p.join(channel, {"name": name.title(), **state})
    return p


async def marker(sender: Puppet, receiver: Puppet, channel: str = "room") -> None:
    """A later message from ``sender`` reached ``receiver``: earlier traffic has settled."""
    await receiver.subscribe(channel, "marker")
    before = len(receiver.data(channel, "marker"))
    await sender.broadcast(channel, "marker", {"n": before})
    await receiver.wait_data(channel, "marker", count=before + 1)


async def test_peers_on_two_nodes_see_each_other(node_factory: NodeFactory,
                                                 nats_server: NatsServer,
                                                 make_puppet: PuppetFactory) -> None:
    a, b = await two_nodes(node_factory, nats_server)
    alice = await client(make_puppet, a, "alice", color="red")
    bob = await client(make_puppet, b, "bob", color="blue")
    await alice.wait_peers("room", {"bob"})
    await bob.wait_peers("room", {"alice"})
    await alice.wait_for(lambda: alice.peers("room")[0].get("color") == "blue", what="state")
    assert bob.peers("room")[0]["color"] == "red"
    assert bob.peers("room")[0]["name"] == "Alice"


async def test_broadcast_crosses_once_in_order_and_never_echoes(
        node_factory: NodeFactory, nats_server: NatsServer, make_puppet: PuppetFactory) -> None:
    a, b = await two_nodes(node_factory, nats_server)
    alice = await client(make_puppet, a, "alice")
    bob = await client(make_puppet, b, "bob")
    carol = await client(make_puppet, a, "carol")  # same node as alice
    for p in (alice, bob, carol):
        await p.subscribe("room", "chat")
    await alice.wait_peers("room", {"bob", "carol"})
    await bob.wait_peers("room", {"alice", "carol"})
    for i in range(30):
        await alice.broadcast("room", "chat", {"i": i})
    got = await bob.wait_data("room", "chat", count=30)
    await carol.wait_data("room", "chat", count=30)
    # Markers from bob prove everything alice sent has settled at alice and carol.
    await marker(bob, alice)
    await marker(bob, carol)
    assert [m["data"]["i"] for m in got] == list(range(30))
    assert {m["from"] for m in got} == {"alice"}
    assert [m["data"]["i"] for m in carol.data("room", "chat")] == list(range(30))
    assert alice.data("room", "chat") == []  # nobody gets their own events back
    assert len(bob.data("room", "chat")) == 30  # exactly once


async def test_leave_and_disconnect_propagate(node_factory: NodeFactory,
                                              nats_server: NatsServer,
                                              make_puppet: PuppetFactory) -> None:
    a, b = await two_nodes(node_factory, nats_server)
    alice = await client(make_puppet, a, "alice")
    bob = await client(make_puppet, b, "bob")
    await alice.wait_peers("room", {"bob"})
    await bob.leave("room")
    await alice.wait_peers("room", set())
    await bob.join("room", {"name": "Bob again"})
    await alice.wait_peers("room", {"bob"})
    bob.kill()  # abrupt drop on node b: node b publishes peer_offline
    await alice.wait_peers("room", set())
    assert a.node.presence.realms["default"].channels["room"].remote == {}
