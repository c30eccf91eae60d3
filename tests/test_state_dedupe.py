"""peer_state dedupe: the same member lists, far fewer deliveries.

The checks drive the pure rules with simulated real clients (what ``@yomo/presence``
2.2.18 does with each frame, see docs/client.md) over one or two nodes, and compare the
member lists every client ends up with, with and without dedupe.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import protocol
from node.presence import Deliver, Peer, Presence, Publish
from node.protocol import Signalling

pytestmark = pytest.mark.unit

CH = "room"


@dataclass
class Client:
    """One connection running the real client's Channel logic for one channel."""

    peer: Peer
    node: int
    state: bytes
    joined: bool = False
    members: dict[str, bytes | None] = field(default_factory=dict)


class Mesh:
    """One or more nodes (Presence), their clients, and a FIFO of everything in flight."""

    def __init__(self, nodes: int, dedupe: bool) -> None:
        self.nodes = [Presence(f"m{i}", dedupe_state=dedupe) for i in range(nodes)]
        self.clients: dict[str, Client] = {}
        self.queue: deque[tuple[str, Any]] = deque()
        self.deliveries = 0
        self._sid = 0

    def connect(self, cid: str, node: int) -> Client:
        self._sid += 1
        peer = Peer(sid=f"{node}-{self._sid}", client_id=cid, app="app", transport="sim")
        self.nodes[node].connect(peer)
        client = self.clients[cid] = Client(peer, node, msgpack.packb({"id": cid, "v": 0}))
        return client

    def send(self, client: Client, op: str, pl: bytes | None = None) -> None:
        self.queue.append(("up", (client, Signalling(t="control", op=op, c=CH, pl=pl))))

    def join(self, client: Client) -> None:
        client.members = {}
        self.send(client, protocol.CHANNEL_JOIN, client.state)

    def leave(self, client: Client) -> None:
        client.joined = False
        client.members = {}
        self.send(client, protocol.PEER_OFFLINE)

    def set_state(self, client: Client, version: int) -> None:
        client.state = msgpack.packb({"id": client.peer.client_id, "v": version})
        if client.joined:
            self.send(client, protocol.PEER_STATE, client.state)

    def drop(self, client: Client) -> None:
        del self.clients[client.peer.client_id]
        self._run(client.node, self.nodes[client.node].disconnect(client.peer))

    def pump(self) -> None:
        while self.queue:
            kind, item = self.queue.popleft()
            if kind == "up":
                client, sig = item
                if client.peer.client_id in self.clients:
                    self._run(client.node, self.nodes[client.node].handle(client.peer, sig))
            elif kind == "mesh":
                origin, sig = item
                for i, node in enumerate(self.nodes):
                    if i != origin:
                        self._run(i, node.dispatch_remote(sig, f"node{origin}"))
            else:
                self._on_frame(*item)

    def _run(self, node: int, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Deliver):
                for peer in action.peers:
                    self.deliveries += 1
                    self.queue.append(("down", (peer.client_id, msgpack.unpackb(action.frame))))
            elif isinstance(action, Publish):
                self.queue.append(("mesh", (node, action.sig)))

    def _on_frame(self, cid: str, msg: dict[str, Any]) -> None:
        client = self.clients.get(cid)
        if client is None:
            return
        op, p = msg.get("op"), msg.get("p")
        if op == protocol.CHANNEL_JOIN:  # the ack: announce, then send the state
            client.joined = True
            self.send(client, protocol.PEER_ONLINE)
            self.send(client, protocol.PEER_STATE, client.state)
        elif not client.joined or p == cid:
            return
        elif op == protocol.PEER_ONLINE:  # the client resets that member to {id}
            client.members[p] = None
            self.send(client, protocol.PEER_STATE, client.state)
        elif op == protocol.PEER_STATE:
            client.members[p] = msg["pl"]
        elif op == protocol.PEER_OFFLINE:
            client.members.pop(p, None)

    def views(self) -> dict[str, dict[str, bytes | None]]:
        return {cid: dict(c.members) for cid, c in self.clients.items() if c.joined}

    def truth(self) -> dict[str, dict[str, bytes | None]]:
        joined = {cid: c.state for cid, c in self.clients.items() if c.joined}
        return {cid: {o: s for o, s in joined.items() if o != cid} for cid in joined}


def storm(n: int, nodes: int, dedupe: bool) -> Mesh:
    mesh = Mesh(nodes, dedupe)
    clients = [mesh.connect(f"c{i}", i % nodes) for i in range(n)]
    for client in clients:
        mesh.join(client)
    mesh.pump()
    return mesh


def test_storm_lists_everyone_with_quadratic_not_cubic_deliveries() -> None:
    n = 40
    plain, deduped = storm(n, 1, False), storm(n, 1, True)
    assert plain.views() == plain.truth() == deduped.views() == deduped.truth()
    assert plain.deliveries > n ** 3 / 2
    assert deduped.deliveries < 3 * n * n


def test_storm_over_two_nodes() -> None:
    mesh = storm(30, 2, True)
    assert mesh.views() == mesh.truth()
    assert mesh.deliveries < 3 * 30 * 30


def test_changed_state_reaches_everyone_unchanged_state_nobody() -> None:
    mesh = storm(5, 1, True)
    a = mesh.clients["c0"]
    before = mesh.deliveries
    mesh.send(a, protocol.PEER_STATE, a.state)  # nothing new
    mesh.pump()
    assert mesh.deliveries == before
    mesh.set_state(a, 1)
    mesh.pump()
    assert mesh.deliveries == before + 4
    assert mesh.views() == mesh.truth()


def test_reannounce_leave_rejoin_and_disconnect_keep_lists_right() -> None:
    mesh = storm(6, 2, True)
    a, b = mesh.clients["c0"], mesh.clients["c1"]
    mesh.send(a, protocol.PEER_ONLINE)  # (what a resync or a second channel causes)
    mesh.send(a, protocol.PEER_STATE, a.state)
    mesh.pump()
    assert mesh.views() == mesh.truth()
    mesh.leave(b)
    mesh.pump()
    mesh.join(b)
    mesh.pump()
    assert mesh.views() == mesh.truth()
    mesh.drop(a)
    mesh.pump()
    assert mesh.views() == mesh.truth()


OPS = st.lists(st.tuples(st.sampled_from(["join", "leave", "state", "drop", "online"]),
                         st.integers(0, 5)), max_size=25)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, nodes=st.integers(1, 2))
def test_any_history_converges_to_the_same_lists_as_without_dedupe(
        ops: list[tuple[str, int]], nodes: int) -> None:
    meshes = [Mesh(nodes, False), Mesh(nodes, True)]
    for mesh in meshes:
        version = 0
        for op, i in ops:
            cid = f"c{i}"
            client = mesh.clients.get(cid)
            if client is None:
                client = mesh.connect(cid, i % nodes)
            if op == "join":
                mesh.join(client)
            elif op == "leave" and client.joined:
                mesh.leave(client)
            elif op == "state":
                version += 1
                mesh.set_state(client, version)
            elif op == "drop":
                mesh.drop(client)
            elif op == "online" and client.joined:
                mesh.send(client, protocol.PEER_ONLINE)
                mesh.send(client, protocol.PEER_STATE, client.state)
            mesh.pump()
            assert mesh.views() == mesh.truth()
    assert meshes[0].views() == meshes[1].views()
    assert meshes[1].deliveries <= meshes[0].deliveries
