"""The published @yomo/presence 2.2.18 client, unmodified, against a real node (WebSocket)."""

from __future__ import annotations

import pytest

from tests.conftest import NodeFactory, RunningNode
from tests.e2e.puppet import Puppet, PuppetRejected, puppets


async def pair(make, node: RunningNode, channel: str = "room"):  # type: ignore[no-untyped-def]
    alice, bob = await make("alice"), await make("bob")
    await alice.connect(node.url, "key", "alice")
    await bob.connect(node.url, "key", "bob")
    await alice.join(channel, {"name": "Alice", "color": "red"})
    await bob.join(channel, {"name": "Bob", "color": "blue"})
    return alice, bob


async def marker(sender: Puppet, receiver: Puppet, channel: str = "room") -> None:
    """A later message from ``sender`` reached ``receiver``: earlier traffic has settled."""
    await receiver.subscribe(channel, "marker")
    before = len(receiver.data(channel, "marker"))
    await sender.broadcast(channel, "marker", {"n": before})
    await receiver.wait_data(channel, "marker", count=before + 1)


async def test_two_peers_see_each_others_state(node: RunningNode) -> None:
    async with puppets() as make:
        alice, bob = await pair(make, node)
        [seen_by_alice] = await alice.wait_peers("room", {"bob"})
        [seen_by_bob] = await bob.wait_peers("room", {"alice"})
        await alice.wait_for(lambda: alice.peers("room")[0].get("name") == "Bob",
                             what="bob's state at alice")
        assert bob.peers("room")[0]["name"] == "Alice"
        assert bob.peers("room")[0]["color"] == "red"
        assert seen_by_alice["id"] == "bob" and seen_by_bob["id"] == "alice"


async def test_broadcast_arrives_once_with_sender_id_not_at_sender(node: RunningNode) -> None:
    async with puppets() as make:
        alice, bob = await pair(make, node)
        await alice.subscribe("room", "chat")
        await bob.subscribe("room", "chat")
        await alice.broadcast("room", "chat", {"text": "hello", "n": [1, 2]})
        [msg] = await bob.wait_data("room", "chat")
        assert msg["from"] == "alice" and msg["data"] == {"text": "hello", "n": [1, 2]}
        await marker(alice, bob)  # anything duplicated would have arrived before this
        assert len(bob.data("room", "chat")) == 1
        await marker(bob, alice)
        assert alice.data("room", "chat") == []


async def test_leave_removes_and_later_broadcasts_are_dropped(node: RunningNode) -> None:
    async with puppets() as make:
        alice, bob = await pair(make, node)
        await bob.wait_peers("room", {"alice"})
        await bob.subscribe("room", "chat")
        await alice.leave("room")
        await bob.wait_peers("room", set())
        await alice.broadcast("room", "chat", "after leaving")
        carol = await make("carol")
        await carol.connect(node.url, "key", "carol")
        await carol.join("room", {})
        await marker(carol, bob)
        assert bob.data("room", "chat") == []
        assert node.node.presence.dropped["not_joined"] >= 1


async def test_abrupt_disconnect_removes(node: RunningNode) -> None:
    async with puppets() as make:
        alice, bob = await pair(make, node)
        await bob.wait_peers("room", {"alice"})
        alice.kill()
        await bob.wait_peers("room", set())


async def test_closing_tab_removes(node: RunningNode) -> None:
    async with puppets() as make:
        alice, bob = await pair(make, node)
        await bob.wait_peers("room", {"alice"})
        await alice.unload()
        await bob.wait_peers("room", set())


async def test_channels_are_isolated(node: RunningNode) -> None:
    async with puppets() as make:
        alice, bob = await pair(make, node, "room")
        carol, dave = await make("carol"), await make("dave")
        await carol.connect(node.url, "key", "carol")
        await dave.connect(node.url, "key", "dave")
        await carol.join("hall", {"name": "Carol"})
        await dave.join("hall", {"name": "Dave"})
        await carol.wait_peers("hall", {"dave"})
        await carol.subscribe("hall", "chat")
        await alice.broadcast("room", "chat", "room only")
        await bob.wait_peers("room", {"alice"})
        await marker(dave, carol, "hall")
        assert carol.data("hall", "chat") == []
        assert carol.peer_ids("hall") == {"dave"}


async def test_apps_are_isolated(node_factory: NodeFactory) -> None:
    node = await node_factory(PUBLIC_KEYS="key-one:app1,key-two:app2")
    async with puppets() as make:
        alice, bob = await make("alice"), await make("bob")
        eve, frank = await make("eve"), await make("frank")
        await alice.connect(node.url, "key-one", "alice")
        await bob.connect(node.url, "key-one", "bob")
        await eve.connect(node.url, "key-two", "eve")
        await frank.connect(node.url, "key-two", "frank")
        for p in (alice, bob, eve, frank):
            await p.join("room", {})
        await alice.wait_peers("room", {"bob"})
        await eve.wait_peers("room", {"frank"})
        await eve.subscribe("room", "chat")
        await alice.broadcast("room", "chat", "app1 only")
        await marker(frank, eve)
        assert eve.data("room", "chat") == []
        assert eve.peer_ids("room") == {"frank"}


async def test_bad_key_is_rejected_with_403(node_factory: NodeFactory) -> None:
    node = await node_factory(PUBLIC_KEYS="good:app")
    async with puppets() as make:
        alice, mallory = await make("alice"), await make("mallory")
        await alice.connect(node.url, "good", "alice")
        await alice.join("room", {})
        with pytest.raises(PuppetRejected) as err:
            await mallory.connect(node.url, "wrong", "mallory")
        assert err.value.status == 403
        assert err.value.headers.get("x-prscd-meshid") == "local"
        bob = await make("bob")
        await bob.connect(node.url, "good", "bob")
        await bob.join("room", {})
        await alice.wait_peers("room", {"bob"})


async def test_percent_encoded_id_matches_the_clients_own_id(node: RunningNode) -> None:
    async with puppets() as make:
        alice, bob = await make("alice"), await make("bob")
        await alice.connect(node.url, "key", "alice smith")
        await bob.connect(node.url, "key", "bob")
        await alice.join("room", {})
        await bob.join("room", {})
        await bob.wait_peers("room", {"alice smith"})
        await alice.leave("room")
        # peer_offline removes the member only if p equals the client's own id exactly.
        await bob.wait_peers("room", set())
