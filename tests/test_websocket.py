"""The WebSocket transport over real sockets: handshake rules, frames, close codes."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from http import HTTPStatus

import msgpack
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import NodeFactory, RunningNode
from tests.helpers import (
    barrier,
    control,
    data_frame,
    get,
    insecure,
    join_frame,
    joined,
    pack,
    peer,
    recv,
    still_served,
)

# -- HTTP endpoints ----------------------------------------------------------------

async def test_health_answers_json(node: RunningNode) -> None:
    status, headers, body = await get(f"https://127.0.0.1:{node.port}/health")
    doc = json.loads(body)
    assert status == 200 and headers["X-Prscd-MeshID"] == "local"
    assert doc["status"] == "ok" and doc["service"] == "prscd" and doc["mesh_id"] == "local"
    assert doc["peers"] == 0 and doc["channels"] == 0 and doc["version"]


async def test_health_counts_peers_and_channels(node: RunningNode) -> None:
    a = await joined(node, "room", "alice")
    _, _, body = await get(f"https://127.0.0.1:{node.port}/health")
    doc = json.loads(body)
    assert (doc["peers"], doc["channels"]) == (1, 1)
    await a.close()


async def test_ready_and_metrics(node: RunningNode) -> None:
    status, _, body = await get(f"https://127.0.0.1:{node.port}/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    status, _, body = await get(f"https://127.0.0.1:{node.port}/metrics")
    assert status == 200 and b"prscd_peers 0.0" in body


async def test_unknown_path_is_404_with_mesh_header(node: RunningNode) -> None:
    status, headers, _ = await get(f"https://127.0.0.1:{node.port}/nope")
    assert status == 404 and headers["X-Prscd-MeshID"] == "local"


# -- handshake rejections: each leaves others unharmed -------------------------------

async def rejected(url: str) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as err:
        await connect(url, ssl=insecure())
    return err.value


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/v1?id=alice", 401, b"missing publickey"),
        ("/v1?publickey=k", 401, b"missing id"),
        ("/v1?publickey=&id=alice", 401, b"missing publickey"),
        ("/v1?publickey=k&id=", 401, b"missing id"),
        ("/v2?publickey=k&id=alice", 404, b"no WebSocket endpoint"),
        ("/?publickey=k&id=alice", 404, b"no WebSocket endpoint"),
    ],
)
async def test_handshake_rejections(node: RunningNode, path: str, status: int,
                                    reason: bytes) -> None:
    bystander = await joined(node, "room", "bystander")
    err = await rejected(f"{node.ws_base}{path}")
    assert err.response.status_code == status
    assert reason in err.response.body
    assert err.response.headers["X-Prscd-MeshID"] == "local"
    assert err.response.headers["X-Prscd-Version"]
    await still_served(node)
    other = await joined(node, "room", "other")
    await other.send(data_frame("room", "hi", '"x"'))
    assert (await recv(bystander))["p"] == "other"


async def test_unlisted_key_is_403_when_keys_are_configured(node_factory: NodeFactory) -> None:
    node = await node_factory(PUBLIC_KEYS="good-key:app1")
    err = await rejected(node.ws_url("bad-key", "alice"))
    assert err.response.status_code == 403
    assert b"publickey rejected" in err.response.body
    assert b"bad-key" not in err.response.body
    ws = await joined(node, "room", "alice", key="good-key")
    await ws.close()


async def test_plain_get_on_v1_asks_for_upgrade(node: RunningNode) -> None:
    status, _, _ = await get(f"https://127.0.0.1:{node.port}/v1?publickey=k&id=a")
    assert status == HTTPStatus.UPGRADE_REQUIRED


async def test_101_carries_mesh_and_version_headers(node: RunningNode) -> None:
    ws = await peer(node)
    assert ws.response.headers["X-Prscd-MeshID"] == "local"
    assert ws.response.headers["X-Prscd-Version"]
    await ws.close()


# -- frames and close codes ------------------------------------------------------------

async def closed_with(ws, code: int, reason: str | None = None) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConnectionClosed) as err:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert err.value.rcvd is not None, "server did not send a close frame"
    assert err.value.rcvd.code == code, err.value.rcvd
    if reason is not None:
        assert reason in err.value.rcvd.reason


async def test_text_frame_closes_1003(node: RunningNode) -> None:
    bystander = await joined(node, "room", "bystander")
    ws = await joined(node, "room", "texter")
    await ws.send("hello")
    await closed_with(ws, 1003, "binary frames only")
    assert (await recv(bystander))["op"] == "peer_offline"
    await still_served(node)


async def test_oversize_closes_1009(node_factory: NodeFactory) -> None:
    node = await node_factory(MAX_MESSAGE_SIZE="1024")
    bystander = await joined(node, "room", "bystander")
    ws = await joined(node, "room", "big")
    await ws.send(data_frame("room", "big", '"' + "x" * 2000 + '"'))
    await closed_with(ws, 1009)
    offline = await recv(bystander)
    assert offline["op"] == "peer_offline" and offline["p"] == "big"
    await still_served(node)
    assert node.node.presence.dropped["too_big"] == 1


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xc1", "not valid msgpack"),
        (pack([1]), "must be a msgpack map"),
        (pack({"t": "data", "c": "room", "pl": b"\xc1"}), "pl: not valid msgpack"),
        (pack({"t": "control", "op": "peer_state", "c": "room", "pl": pack(1)}), "msgpack map"),
        (pack({"t": "control", "op": "peer_online", "c": "room", "app": "x"}), "server-internal"),
    ],
)
async def test_invalid_message_closes_1007_with_reason(node: RunningNode, frame: bytes,
                                                       reason: str) -> None:
    bystander = await joined(node, "room", "bystander")
    ws = await joined(node, "room", "bad")
    await ws.send(frame)
    await closed_with(ws, 1007, reason)
    # The bad frame never reached the bystander: its next frame is the offline.
    nxt = await recv(bystander)
    assert nxt["op"] == "peer_offline" and nxt["p"] == "bad"
    await still_served(node)
    assert node.node.presence.dropped["invalid"] == 1


# -- the presence behaviour over sockets ------------------------------------------------

async def test_two_peers_exchange_online_state_and_data(node: RunningNode) -> None:
    a = await joined(node, "room", "alice")
    b = await joined(node, "room", "bob")
    await b.send(control("peer_online", "room"))
    got = await recv(a)
    assert got == {"t": "control", "op": "peer_online", "c": "room", "p": "bob"}
    state = pack({"id": "alice", "name": "A"})
    await a.send(control("peer_state", "room", state))
    assert await recv(b) == {"t": "control", "op": "peer_state", "c": "room", "p": "alice",
                             "pl": state}
    await a.send(data_frame("room", "mouse", '{"x":1}'))
    got = await recv(b)
    assert got["p"] == "alice" and msgpack.unpackb(got["pl"]) == {"event": "mouse",
                                                                 "data": '{"x":1}'}
    # Nothing came back to alice: bob's marker is the next thing she sees.
    await barrier(b, a, "room")


async def test_leave_then_broadcasts_are_dropped(node: RunningNode) -> None:
    a = await joined(node, "room", "alice")
    b = await joined(node, "room", "bob")
    await a.send(control("peer_offline", "room"))
    assert (await recv(b))["op"] == "peer_offline"
    await a.send(data_frame("room", "ghost", '"boo"'))
    await barrier(await joined(node, "room", "carol"), b, "room")
    assert node.node.presence.dropped["not_joined"] == 1


async def test_disconnect_sends_offline_to_each_channel(node: RunningNode) -> None:
    a = await joined(node, "x", "alice")
    await a.send(join_frame("y", "alice"))
    await recv(a)
    bx = await joined(node, "x", "bx")
    by = await joined(node, "y", "by")
    await a.close()
    assert await recv(bx) == {"t": "control", "op": "peer_offline", "c": "x", "p": "alice"}
    assert await recv(by) == {"t": "control", "op": "peer_offline", "c": "y", "p": "alice"}


async def test_channels_and_apps_are_isolated(node_factory: NodeFactory) -> None:
    node = await node_factory(PUBLIC_KEYS="k1:app1,k2:app2")
    a = await joined(node, "room", "alice", key="k1")
    other_app = await joined(node, "room", "eve", key="k2")
    other_channel = await joined(node, "hall", "carl", key="k1")
    same = await joined(node, "room", "bob", key="k1")
    await a.send(data_frame("room", "secret", '"s"'))
    assert (await recv(same))["p"] == "alice"
    await barrier(await joined(node, "room", "m2", key="k2"), other_app, "room")
    await barrier(await joined(node, "hall", "m3", key="k1"), other_channel, "hall")


async def test_id_is_percent_decoded(node: RunningNode) -> None:
    a = await joined(node, "room", "alice")
    b = await connect(f"{node.ws_base}/v1?publickey=k&id=b%C3%B6b%20x+y", ssl=insecure())
    await b.send(join_frame("room", "böb x+y"))
    await recv(b)
    await b.send(control("peer_online", "room"))
    assert (await recv(a))["p"] == "böb x+y"


async def test_same_id_twice_is_two_peers(node: RunningNode) -> None:
    tab1 = await joined(node, "room", "alice")
    tab2 = await joined(node, "room", "alice")
    bob = await joined(node, "room", "bob")
    await tab1.send(data_frame("room", "hi", '"1"'))
    assert (await recv(tab2))["p"] == "alice"
    assert (await recv(bob))["p"] == "alice"
    # Clients list members by id: while the second tab stays, nobody hears "alice offline".
    await tab1.close()
    await barrier(tab2, bob, "room")
    await tab2.close()
    offline = await recv(bob)
    assert (offline["op"], offline["p"]) == ("peer_offline", "alice")


async def test_frames_of_one_connection_keep_their_order(node: RunningNode) -> None:
    a = await joined(node, "room", "alice")
    b = await joined(node, "room", "bob")
    for i in range(200):
        await a.send(data_frame("room", "n", str(i)))
    got = [msgpack.unpackb((await recv(b))["pl"])["data"] for _ in range(200)]
    assert got == [str(i) for i in range(200)]


async def test_join_is_registered_before_the_next_frame(node: RunningNode) -> None:
    a = await joined(node, "room", "alice")
    b = await peer(node, "bob")
    # No waiting for the ack: the data right behind the join must be forwarded.
    await b.send(join_frame("room", "bob") + b"")
    await b.send(data_frame("room", "now", '"1"'))
    got = await recv(a)
    assert got["p"] == "bob" and got["t"] == "data"


# -- keepalive ----------------------------------------------------------------------------

async def test_server_pings_with_random_bytes_and_records_rtt(node_factory: NodeFactory) -> None:
    node = await node_factory(PING_INTERVAL="0.2")
    ws = await joined(node, "room", "alice")
    pings: list[bytes] = []
    original = ws.protocol.recv_frame

    def spy(frame):  # type: ignore[no-untyped-def]
        if frame.opcode.name == "PING":
            pings.append(bytes(frame.data))
        return original(frame)

    ws.protocol.recv_frame = spy  # type: ignore[method-assign]
    (server_peer,) = node.node.presence.peers.values()
    deadline = time.monotonic() + 5
    while (server_peer.rtt_ms is None or not pings) and time.monotonic() < deadline:
        await ws.send(control("peer_online", "room"))  # keep the loop turning
        await asyncio.sleep(0.05)
    assert server_peer.rtt_ms is not None and server_peer.rtt_ms >= 0
    assert len(pings[0]) == 8  # random (issue 15): a timestamp could be answered blindly


async def test_silent_peer_is_dropped_and_goes_offline(node_factory: NodeFactory) -> None:
    node = await node_factory(PING_INTERVAL="0.2", PING_TIMEOUT="0.3")
    bystander = await joined(node, "room", "bystander", ping_interval=None)
    mute = await joined(node, "room", "mute", ping_interval=None)
    original = mute.protocol.send_frame

    def no_pongs(frame):  # type: ignore[no-untyped-def]
        if frame.opcode.name != "PONG":
            original(frame)

    mute.protocol.send_frame = no_pongs  # type: ignore[method-assign]
    offline = await recv(bystander, timeout=5)
    assert offline == {"t": "control", "op": "peer_offline", "c": "room", "p": "mute"}


# -- plain TCP mode -------------------------------------------------------------------------

async def test_plain_tcp_mode(node_factory: NodeFactory) -> None:
    node = await node_factory(TLS="false")
    status, _, body = await get(f"http://127.0.0.1:{node.port}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    ws = await connect(f"ws://127.0.0.1:{node.port}/v1?publickey=k&id=a")
    await ws.send(join_frame("room", "a"))
    assert (await recv(ws))["op"] == "channel_join"
    await ws.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
async def test_tls_refuses_tls_1_1(node: RunningNode) -> None:
    ctx = insecure()
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        await connect(node.ws_url(), ssl=ctx)
