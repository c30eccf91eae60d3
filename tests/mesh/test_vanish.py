"""A vanished peer is offline for the others within 5 s at the defaults; one back within the
grace period never flickers; a live peer frozen a while is never closed and comes back;
a node whose loop stalls makes no live peer silent (issue 17). Two nodes on a real
nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect

from node.app import App
from node.config import Settings
from node.tls import CertInfo
from node.transports.websocket import WebSocketListener
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import control, insecure, join_frame, joined, recv
from tests.mesh_helpers import NatsServer, wait_until
from tests.test_webtransport import is_op, path, ws_until, wt_transport
from tests.wt_client import wt_connect

_SHIPPED = Settings.from_env({})
#: The shipped keepalive defaults (tests/conftest.py pings every 10 s otherwise).
DEFAULTS = {name.upper(): str(getattr(_SHIPPED, name)) for name in (
    "ping_interval", "ping_silent_timeout", "ping_timeout", "presence_grace",
    "wt_ping_interval", "wt_silent_timeout", "wt_idle_timeout")} | {"WEBTRANSPORT": "true"}
#: Goal 5 s; a loaded 2-core machine may run timers late: allow a little, report the time.
BOUND = 5.0 + 0.75


class SilentProxy:
    """A TCP proxy to a node that can go silent: bytes stop both ways, sockets stay open
    (a laptop lid closing: no FIN, no RST)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.silent = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> SilentProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if not self.silent:
                        dst.write(data)
                        await dst.drain()
            if not self.silent:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """The network is back: the connections it held die (RST), new ones go through."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        self.silent = False

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def proxy_to(node: RunningNode) -> AsyncIterator[SilentProxy]:
    proxy = await SilentProxy(node.port).start()
    try:
        yield proxy
    finally:
        await proxy.close()


class SilentUdpProxy:
    """A UDP proxy to a node's QUIC port that can go silent: datagrams stop both ways (a
    network lost without a word), and flow again when it is switched back."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.silent = False
        self.port = 0
        self.front: asyncio.DatagramTransport | None = None
        self.upstreams: dict[Any, asyncio.DatagramTransport | list[bytes]] = {}

    async def start(self) -> SilentUdpProxy:
        proxy = self

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                proxy._from_client(data, addr)

        loop = asyncio.get_running_loop()
        front, _ = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", 0))
        self.front = front  # type: ignore[assignment]
        self.port = front.get_extra_info("sockname")[1]
        return self

    def _from_client(self, data: bytes, addr: Any) -> None:
        if self.silent:
            return
        up = self.upstreams.get(addr)
        if isinstance(up, list):
            up.append(data)  # its upstream socket is being opened
        elif up is not None:
            up.sendto(data)
        else:
            self.upstreams[addr] = [data]
            asyncio.get_running_loop().create_task(self._open(addr))

    async def _open(self, addr: Any) -> None:
        proxy = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _: Any) -> None:
                if not proxy.silent and proxy.front and not proxy.front.is_closing():
                    proxy.front.sendto(data, addr)

        up, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Back, remote_addr=self.target)
        queued = self.upstreams[addr]
        self.upstreams[addr] = up  # type: ignore[assignment]
        for data in queued if isinstance(queued, list) else ():
            up.sendto(data)

    def close(self) -> None:
        for up in self.upstreams.values():
            if not isinstance(up, list):
                up.close()
        if self.front is not None:
            self.front.close()


async def two_nodes(node_factory: NodeFactory, nats: NatsServer) -> tuple[RunningNode,
                                                                            RunningNode]:
    a = await node_factory(MESH_ID="eu-west", NATS_URL=nats.url, **DEFAULTS)
    b = await node_factory(MESH_ID="us-east", NATS_URL=nats.url, **DEFAULTS)
    await wait_until(lambda: a.node.liveness.nodes and b.node.liveness.nodes, 5, "heartbeats")
    return a, b


async def online(ws: ClientConnection, channel: str, client_id: str) -> None:
    await ws.send(join_frame(channel, client_id))
    assert (await recv(ws))["op"] == "channel_join"
    await ws.send(control("peer_online", channel))


async def frames_for(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    """Everything ``ws`` receives in the next ``seconds``."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(await recv(ws, left))
        except TimeoutError:
            break
    return out


async def alice_and_bob(node_factory: NodeFactory, nats_server: NatsServer,
                        make_puppet: Any) -> tuple[RunningNode, RunningNode, Any, Any]:
    """Real clients: alice on the first node, bob on the second, both in "room", and bob
    listing alice."""
    a, b = await two_nodes(node_factory, nats_server)
    alice, bob = await make_puppet("alice"), await make_puppet("bob")
    await alice.connect(a.url, "key", "alice")
    await alice.join("room", {"name": "Alice"})
    await bob.connect(b.url, "key", "bob")
    await bob.join("room", {"name": "Bob"})
    await bob.wait_peers("room", {"alice"})
    return a, b, alice, bob


def closed_1011(node: RunningNode) -> int:
    return sum(n for (_, code), n in node.node.metrics.closed.items() if code == "1011")


async def test_a_frozen_real_client_is_offline_for_the_other_region_within_5s_and_back(
        node_factory: NodeFactory, nats_server: NatsServer, make_puppet: Any) -> None:
    """Frozen (SIGSTOP) long enough to be released: offline for the other region within the
    bound, its connection never closed; thawed, it is back in the member list with its
    state, though the client itself never noticed anything (it re-joins nothing)."""
    a, _, alice, bob = await alice_and_bob(node_factory, nats_server, make_puppet)
    (peer,) = a.node.presence.peers.values()
    await wait_until(lambda: peer.rtt_ms is not None, 3, "alice's RTT from the pings")
    os.kill(alice.proc.pid, signal.SIGSTOP)  # the process stops; its TCP socket stays open
    try:
        t0 = time.monotonic()
        await bob.wait_peers("room", set(), timeout=BOUND + 2)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(alice.proc.pid, signal.SIGCONT)
    print(f"frozen WebSocket client gone for the other region after {elapsed:.2f} s")
    assert elapsed <= BOUND, elapsed
    counts = a.node.grace_counts
    assert counts["silent"] == 1 and counts["released"] == 1
    peers = await bob.wait_peers("room", {"alice"}, timeout=5)  # its pong: re-joined
    assert [p.get("name") for p in peers] == ["Alice"], peers
    assert counts["rejoined"] == 1 and closed_1011(a) == 0 and len(a.node.links) == 1
    metrics = a.node.metrics_text()
    for outcome in ("silent", "released", "rejoined"):
        assert f'prscd_presence_grace_total{{outcome="{outcome}"}} 1.0' in metrics
    assert a.node.health()["presence_grace"]["rejoined"] == 1
    # The same connection carries on both ways.
    await bob.subscribe("room", "hello")
    await alice.broadcast("room", "hello", {"n": 1})
    await bob.wait_data("room", "hello")


@pytest.mark.parametrize("frozen", ["until silent", "3 s"])
async def test_a_real_client_frozen_a_while_is_not_closed_and_stays_listed(
        node_factory: NodeFactory, nats_server: NatsServer, make_puppet: Any,
        frozen: str) -> None:
    """Frozen until the node found it silent (then thawed within PRESENCE_GRACE), or for
    3 s: never closed, and listed again at the end; the first never flickers."""
    a, _, alice, bob = await alice_and_bob(node_factory, nats_server, make_puppet)
    mark = bob.mark()
    counts = a.node.grace_counts
    os.kill(alice.proc.pid, signal.SIGSTOP)
    try:
        if frozen == "until silent":
            await wait_until(lambda: counts["silent"] == 1, 6, "alice silent")
        else:
            await asyncio.sleep(3.0)
    finally:
        os.kill(alice.proc.pid, signal.SIGCONT)
    await wait_until(lambda: counts["heard"] + counts["rejoined"] == 1, 5, "alice heard")
    await asyncio.sleep(2.0)  # past the grace period: a release would show now
    await bob.wait_peers("room", {"alice"})
    assert closed_1011(a) == 0 and len(a.node.links) == 1
    if frozen == "until silent":
        lists = [{str(p.get("id")) for p in e["peers"]} for e in bob.events[mark:]
                 if e["ev"] == "peers" and e.get("channel") == "room"]
        assert all("alice" in ids for ids in lists), lists
        assert counts["heard"] == 1 and counts["released"] == 0
    print(f"frozen {frozen}: {dict(counts)}")


@pytest.mark.parametrize("silent_for", ["past the grace", "within the grace"])
async def test_a_silent_webtransport_peer_is_offline_within_5s_and_back_when_heard(
        node_factory: NodeFactory, nats_server: NatsServer, silent_for: str) -> None:
    """Its packets stop both ways (a UDP proxy goes silent): offline for the other region
    within the bound; when they flow again it is back (re-joined), or, back within the
    grace period, nobody saw anything."""
    a, b = await two_nodes(node_factory, nats_server)
    watcher = await joined(b, "room", "watcher")
    proxy = await SilentUdpProxy(a.port).start()
    counts = a.node.grace_counts
    try:
        async with wt_connect(proxy.port, path("wtpeer")) as wt:
            state = {"id": "wtpeer", "name": "WT"}
            wt.send_datagram(join_frame("room", "wtpeer"))
            await wt.next_message(match=lambda m: m.get("op") == "channel_join")
            wt.send_datagram(control("peer_online", "room"))
            wt.send_datagram(control("peer_state", "room", msgpack.packb(state)))
            await ws_until(watcher, is_op("peer_state", "wtpeer"))
            proxy.silent = True
            t0 = time.monotonic()
            if silent_for == "past the grace":
                await ws_until(watcher, is_op("peer_offline", "wtpeer"), timeout=BOUND + 2)
                elapsed = time.monotonic() - t0
                print(f"silent WebTransport peer gone for the other region after "
                      f"{elapsed:.2f} s")
                assert elapsed <= BOUND, elapsed
                proxy.silent = False
                await ws_until(watcher, is_op("peer_online", "wtpeer"), timeout=5)
                back = await ws_until(watcher, is_op("peer_state", "wtpeer"), timeout=2)
                assert msgpack.unpackb(back["pl"]) == state
                assert counts["released"] == 1 and counts["rejoined"] == 1
            else:
                await wait_until(lambda: counts["silent"] == 1, 6, "wtpeer silent")
                proxy.silent = False
                await wait_until(lambda: counts["heard"] == 1, 3, "wtpeer heard")
                frames = await frames_for(watcher, 2.5)
                assert not any(is_op("peer_offline", "wtpeer")(f) for f in frames), frames
                assert counts["released"] == 0
            assert counts["silent"] == 1 and wt.terminated is None
    finally:
        proxy.close()


@pytest.mark.parametrize("transport", ["websocket", "webtransport"])
def test_a_stalled_node_makes_no_live_peer_silent(dev_cert: CertInfo, tmp_path: Path,
                                                  transport: str) -> None:
    """The node's loop blocked for 3 s (longer than the soft timeouts) in a socket callback
    right after it pinged, on uvloop as in production: uvloop then runs the due keepalive
    timers before it reads the pongs and ACKs waiting in its sockets. Those are the peers'
    answers, not their silence: no peer goes silent, none is closed. (WebSocket peers
    without TLS: the stall follows the pings; one WebTransport peer: it follows a PING.)"""
    import socket

    import uvloop

    async def main() -> tuple[dict[str, int], int, int, bool]:
        loop = asyncio.get_running_loop()
        env = {"PORT": "0", "HOST": "127.0.0.1", "PID_FILE": str(tmp_path / "pid"),
               "CERT_CACHE_DIR": str(tmp_path), **DEFAULTS}
        if transport == "websocket":
            env |= {"TLS": "false", "WEBTRANSPORT": "false"}
        app = App(Settings.from_env(env), dev_cert)
        await app.start()
        node = RunningNode(app)
        busy, poke = socket.socketpair()
        busy.setblocking(False)
        stalls = 0
        wanted: list[str] = []

        def stall() -> None:
            nonlocal stalls
            busy.recv(100)
            time.sleep(3.0)  # the pongs and ACKs arrive meanwhile
            stalls += 1

        def stall_after(kind: str, ping: Any) -> Any:
            def pinged(*args: Any) -> None:
                ping(*args)
                if wanted and wanted[0] == kind:
                    wanted.pop(0)
                    poke.send(b"x")  # handled in the next poll: a busy socket callback
            return pinged

        async def stalls_after(kind: str) -> None:
            for round_ in range(3):
                wanted.append(kind)
                await wait_until(lambda r=round_: stalls > r, 10, f"stall {round_}")
            await asyncio.sleep(3.0)

        loop.add_reader(busy.fileno(), stall)
        try:
            if transport == "websocket":
                listener = next(t for t in app.listeners if isinstance(t, WebSocketListener))
                keepalive = listener.keepalive
                keepalive._ping = stall_after("ws", keepalive._ping)  # type: ignore[method-assign]
                url = node.ws_url("key", "ws").replace("wss://", "ws://")
                watchers = [await connect(url.replace("id=ws", f"id=ws{i}")) for i in range(5)]
                for i, w in enumerate(watchers):
                    await online(w, "room", f"ws{i}")
                await stalls_after("ws")
                links, wt_open = len(node.node.links), True
                for w in watchers:
                    await w.close()
            else:
                async with wt_connect(node.port, path("wtpeer")) as wt:
                    wt.send_datagram(join_frame("room", "wtpeer"))
                    await wt.next_message(match=lambda m: m.get("op") == "channel_join")
                    conn = next(iter(wt_transport(node).connections))
                    conn._ping = stall_after("wt", conn._ping)  # type: ignore[method-assign]
                    await stalls_after("wt")
                    links, wt_open = len(node.node.links), wt.terminated is None
            return dict(node.node.grace_counts), closed_1011(node), links, wt_open
        finally:
            loop.remove_reader(busy.fileno())
            busy.close()
            poke.close()
            await app.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        counts, closed, links, wt_open = runner.run(main())
    assert counts["silent"] == 0 and counts["held"] == 0, counts
    assert closed == 0 and links == (5 if transport == "websocket" else 1) and wt_open


@pytest.mark.parametrize("back_on", ["same node", "other node"])
async def test_a_peer_back_within_the_grace_period_never_flickers(
        node_factory: NodeFactory, nats_server: NatsServer, back_on: str) -> None:
    a, b = await two_nodes(node_factory, nats_server)
    local, remote = await joined(a, "room", "local"), await joined(b, "room", "remote")
    async with proxy_to(a) as proxy:
        url = a.ws_url("key", "alice").replace(f":{a.port}/", f":{proxy.port}/")
        first = await connect(url, ssl=insecure())
        await online(first, "room", "alice")
        for w in (local, remote):
            await ws_until(w, is_op("peer_online", "alice"))
        proxy.silent = True  # the connection vanishes: the node's pings go unanswered
        await wait_until(lambda: a.node.grace_counts["held"] == 1, 6, "alice held")
        # Back, as an app that joins again on `open` does, within PRESENCE_GRACE.
        again = await connect((a if back_on == "same node" else b).ws_url("key", "alice"),
                              ssl=insecure())
        await online(again, "room", "alice")
        seen = await asyncio.gather(frames_for(local, 2.5), frames_for(remote, 2.5))
        for frames in seen:  # beyond the grace period: no offline ever came
            ops = [(f.get("op"), f.get("p")) for f in frames]
            assert ("peer_offline", "alice") not in ops, ops
            assert ("peer_online", "alice") in ops  # the client answers it with its state
        assert a.node.grace_counts["returned"] == 1
        assert a.node.grace_counts["released"] == 0
        # The old connection left the mesh quietly: a clean leave now is seen at once.
        await again.send(control("peer_offline", "room"))
        for w in (local, remote):
            await ws_until(w, is_op("peer_offline", "alice"), timeout=2)
        await again.close()
        with contextlib.suppress(Exception):
            await first.close()


async def test_a_real_client_that_rejoins_on_open_never_leaves_the_member_list(
        node_factory: NodeFactory, nats_server: NatsServer, make_puppet: Any) -> None:
    """The app pattern of docs/presence.md: the client reconnects by itself (WebSocket),
    the app joins again on `open`; back within PRESENCE_GRACE, the other region's member
    list holds alice at every step."""
    a, b = await two_nodes(node_factory, nats_server)
    alice, bob = await make_puppet("alice"), await make_puppet("bob")
    async with proxy_to(a) as proxy:
        await alice.connect(f"https://127.0.0.1:{proxy.port}/v1", "key", "alice", rejoin=True)
        await alice.join("room", {"name": "Alice"})
        await bob.connect(b.url, "key", "bob")
        await bob.join("room", {"name": "Bob"})
        await bob.wait_peers("room", {"alice"})
        mark = bob.mark()
        proxy.silent = True
        await wait_until(lambda: a.node.grace_counts["held"] == 1, 6, "alice held")
        proxy.cut()  # her socket dies: the client reconnects, the app joins again
        await alice.wait_event(lambda e: e["ev"] == "rejoined", timeout=5)
        await wait_until(lambda: a.node.grace_counts["returned"] == 1, 3, "alice back")
        await asyncio.sleep(2.0)  # past the grace period: a release would show now
        lists = [{str(p.get("id")) for p in e["peers"]} for e in bob.events[mark:]
                 if e["ev"] == "peers" and e.get("channel") == "room"]
        assert all("alice" in ids for ids in lists), lists
        assert a.node.grace_counts["released"] == 0
        assert bob.peer_ids("room") == {"alice"}


async def test_a_clean_close_is_offline_at_once(node_factory: NodeFactory,
                                                nats_server: NatsServer) -> None:
    a, b = await two_nodes(node_factory, nats_server)
    remote = await joined(b, "room", "remote")
    alice = await joined(a, "room", "alice")
    await alice.send(control("peer_online", "room"))
    await ws_until(remote, is_op("peer_online", "alice"))
    t0 = time.monotonic()
    await alice.close()  # a close frame: no grace
    await ws_until(remote, is_op("peer_offline", "alice"), timeout=2)
    assert time.monotonic() - t0 < 1.0
    assert a.node.grace_counts["held"] == 0
