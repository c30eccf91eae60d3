"""MAX_PEERS_PER_CHANNEL counts one node's peers, on two nodes joined by a real nats-server.

Per node on purpose (docs/operations.md): a mesh-wide count would come from the members
each node has heard of (``Channel.remote``), which lags, so two regions could both admit
the last seat.
"""

from __future__ import annotations

import asyncio
import time

from websockets.asyncio.client import ClientConnection

from node.presence import Channel
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import control, data_frame, join_frame, joined, pack, peer, recv
from tests.mesh_helpers import NatsServer, wait_until
from tests.test_limits import close_of

N = 2


def room(node: RunningNode) -> Channel | None:
    for realm in node.node.presence.realms.values():
        if "room" in realm.channels:
            return realm.channels["room"]
    return None


def members(node: RunningNode) -> tuple[int, int]:
    """(local peers, remote members) of ``room`` as this node knows them."""
    channel = room(node)
    return (len(channel.peers), len(channel.remote)) if channel else (0, 0)


async def fill(node: RunningNode, prefix: str, count: int) -> list[ClientConnection]:
    peers = [await joined(node, "room", f"{prefix}{i}") for i in range(count)]
    for ws in peers:
        await ws.send(control("peer_online", "room"))
    return peers


async def hears(receiver: ClientConnection, sender: ClientConnection) -> None:
    """A message from ``sender`` crosses the mesh to ``receiver`` (other frames skipped)."""
    who = sender.request.path.split("id=")[1] if sender.request else ""
    await sender.send(data_frame("room", "hello", '"hi"'))
    deadline = time.monotonic() + 5
    while (got := await recv(receiver, deadline - time.monotonic())).get("t") != "data":
        pass
    assert got["p"] == who


async def test_the_limit_is_per_node_not_mesh_wide(node_factory: NodeFactory,
                                                   nats_server: NatsServer) -> None:
    limit = {"MAX_PEERS_PER_CHANNEL": str(N), "NATS_URL": nats_server.url}
    a = await node_factory(MESH_ID="east", **limit)
    b = await node_factory(MESH_ID="west", **limit)
    await wait_until(lambda: a.node.liveness.nodes and b.node.liveness.nodes, 5, "heartbeats")
    on_a = await fill(a, "a", N)
    on_b = await fill(b, "b", N - 1)
    for i, ws in enumerate(on_a):  # as the real client answers B's peer_online
        await ws.send(control("peer_state", "room", pack({"id": f"a{i}"})))
    await wait_until(lambda: members(b) == (N - 1, N), 5, "B hears of A's members")
    # B already knows of N members: a mesh-wide limit would refuse its N-th peer.
    on_b += await fill(b, "b-last", 1)
    await wait_until(lambda: members(a) == (N, N) and members(b) == (N, N), 5,
                     "each node hears of the other's members")
    await hears(on_a[-1], on_b[-1])
    await hears(on_b[-1], on_a[-1])

    late = await peer(a, "a-late")
    await late.send(join_frame("room", "a-late"))
    code, reason = await close_of(late)
    assert code == 4008
    assert reason == f"channel full: at most {N} peers per channel on this node"
    assert a.node.presence.dropped["channel_full"] == 1
    assert "channel_full" not in b.node.presence.dropped
    assert members(a) == (N, N) and members(b) == (N, N)  # nobody inside was touched
    await asyncio.gather(*(ws.close() for ws in on_a + on_b))
