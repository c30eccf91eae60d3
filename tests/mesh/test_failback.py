"""Fail-back: a node whose home NATS server died moves away, keeps serving, and moves back
once home has been healthy for NATS_FAILBACK_AFTER, losing and doubling nothing; a home
server that flaps does not pull it back. Two regions (two nats-servers joined by a
gateway), real prscd nodes, raw protocol peers."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect

from mesh.home import HomeWatch, Overlap, probe
from mesh.nats import redact
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import data_frame, get, insecure, join_frame, joined, peer
from tests.mesh.conftest import NatsFactory
from tests.mesh_helpers import NatsServer, free_port, http_json, wait_until

REGIONS = ("home", "away")


def gateway_pair(factory: NatsFactory, tmp: Path) -> tuple[NatsServer, NatsServer]:
    """Two single-server regions joined by a gateway, as infra/nats/region.conf does."""
    ports = {r: (free_port(), free_port(), free_port()) for r in REGIONS}
    gateways = ", ".join(f'{{name: "{r}", urls: ["nats://127.0.0.1:{ports[r][2]}"]}}'
                         for r in REGIONS)
    servers = []
    for r in REGIONS:
        client, http, gw = ports[r]
        conf = tmp / f"{r}.conf"
        conf.write_text(f'server_name: "{r}-1"\nlisten: "127.0.0.1:{client}"\n'
                        f'http: "127.0.0.1:{http}"\nping_interval: "1s"\n'
                        f'gateway {{\n name: "{r}"\n listen: "127.0.0.1:{gw}"\n'
                        f' gateways: [{gateways}]\n}}\n')
        servers.append(factory(r, config=conf, port=client, http_port=http))
    for s in servers:
        wait_gateway(s)
    return servers[0], servers[1]


def wait_gateway(server: NatsServer, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gz = server.gatewayz()
        if gz.get("outbound_gateways") and gz.get("inbound_gateways"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{server.name}: gateway not formed")


class Counting:
    """A raw peer sending numbered messages and recording the numbers it receives (event
    "n"), and how long stamped messages took to reach it (event "t"; one process, one
    clock)."""

    def __init__(self, ws: ClientConnection, name: str, channel: str) -> None:
        self.ws, self.name, self.channel = ws, name, channel
        self.sent = 0
        self.got: list[int] = []
        self.by: dict[str, list[int]] = {}  # the numbers by sender
        self.took: list[float] = []
        self.acked = asyncio.Event()
        self._tasks = [asyncio.create_task(self._read())]

    @classmethod
    async def join(cls, node: RunningNode, channel: str, name: str) -> Counting:
        """Join reading from the start: another region's events may come before the ack."""
        self = cls(await peer(node, name), name, channel)
        await self.ws.send(join_frame(channel, name))
        await asyncio.wait_for(self.acked.wait(), 5)
        return self

    async def _read(self) -> None:
        async for raw in self.ws:
            frame = msgpack.unpackb(raw)
            if frame.get("op") == "channel_join":
                self.acked.set()
            if frame.get("t") == "data":
                body = msgpack.unpackb(frame["pl"])
                if body.get("event") == "n":
                    self.got.append(int(body["data"]))
                    self.by.setdefault(frame.get("p", "?"), []).append(int(body["data"]))
                elif body.get("event") == "t":
                    self.took.append(time.perf_counter() - float(body["data"]))

    def start(self, every: float = 0.01) -> None:
        self._tasks.append(asyncio.create_task(self._send(every)))

    async def _send(self, every: float) -> None:
        while True:
            await self.ws.send(data_frame(self.channel, "n", str(self.sent)))
            self.sent += 1
            await asyncio.sleep(every)

    async def stop_sending(self) -> None:
        task = self._tasks.pop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ws.close()


def health(node: RunningNode) -> dict[str, Any]:
    return node.node.bus.where()  # what /health shows under "bus" (node/server.py)


def contiguous(seq: list[int]) -> tuple[int, int, int]:
    """(missing, doubled, out of order) in a run that should be first..last, each once."""
    distinct = set(seq)
    missing = max(seq) - min(seq) + 1 - len(distinct)
    return missing, len(seq) - len(distinct), sum(b < a for a, b in itertools.pairwise(seq))


async def finish(a: Counting, b: Counting) -> None:
    """A few hundred ms more traffic both ways, then stop and wait for the last numbers."""
    n_b, n_a = len(b.got), len(a.got)
    await wait_until(lambda: len(b.got) > n_b + 30 and len(a.got) > n_a + 30, 10,
                     "traffic both ways after")
    await a.stop_sending()
    await b.stop_sending()
    await wait_until(lambda: a.got[-1] == b.sent - 1 and b.got[-1] == a.sent - 1, 10,
                     "the last numbers")


@asynccontextmanager
async def two_regions(node_factory: NodeFactory, nats_factory: NatsFactory, tmp_path: Path,
                      after: float) -> AsyncIterator[tuple[Any, ...]]:
    home, away = gateway_pair(nats_factory, tmp_path)
    x = await node_factory(MESH_ID="home", NATS_URL=f"{home.url},{away.url}",
                           NATS_FAILBACK_AFTER=str(after), NATS_RECONNECT_WAIT="0.05",
                           NATS_RECONNECT_MAX_WAIT="0.3", NODE_TIMEOUT="6")
    y = await node_factory(MESH_ID="away", NATS_URL=away.url, NODE_TIMEOUT="6")
    await wait_until(lambda: x.node.liveness.nodes and y.node.liveness.nodes, 10, "heartbeats")
    a = Counting(await joined(x, "room", "alice"), "alice", "room")
    b = Counting(await joined(y, "room", "bob"), "bob", "room")
    try:
        yield home, away, x, y, a, b
    finally:
        await a.close()
        await b.close()


async def moved_away(x: RunningNode, away: NatsServer) -> None:
    await wait_until(lambda: health(x)["server"] == redact(away.url) and x.node.bus.up,
                     10, "the node to move to the other region's server")
    assert health(x)["home"] is False


async def test_node_moves_away_keeps_serving_and_moves_back_without_loss(
        node_factory: NodeFactory, nats_factory: NatsFactory, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="prscd.mesh.nats")
    async with two_regions(node_factory, nats_factory, tmp_path, after=1.0) as (
            home, away, x, y, a, b):
        assert health(x)["home"] is True and health(x)["server"] == redact(home.url)
        a.start()
        b.start()
        await wait_until(lambda: len(a.got) > 20 and len(b.got) > 20, 10, "traffic both ways")
        home.kill()
        await moved_away(x, away)
        # It keeps serving: the peer on the other node gets its new events.
        n_b, n_a = len(b.got), len(a.got)
        await wait_until(lambda: len(b.got) > n_b + 20 and len(a.got) > n_a + 20, 10,
                         "traffic both ways while away")
        # From here on nothing may be lost or doubled: the move back is make-before-break.
        mark_a, mark_b = len(a.got), len(b.got)
        erin = Counting(await joined(y, "late", "erin"), "erin", "late")
        erin.start()
        t_up = time.monotonic()
        home.start()
        # A channel joined while the node is moving: its events from the other region too.
        await wait_until(lambda: x.node.bus.failback.moving, 20, "the move to begin")
        dave = await Counting.join(x, "late", "dave")
        await wait_until(lambda: health(x)["failbacks"] == 1, 20, "the move back home")
        took = time.monotonic() - t_up
        assert health(x)["home"] is True and health(x)["server"] == redact(home.url)
        await finish(a, b)
        await erin.stop_sending()
        await wait_until(lambda: dave.got and dave.got[-1] == erin.sent - 1, 10, "erin's last")
        await dave.close()
        await erin.close()
    assert contiguous(dave.got) == (0, 0, 0), dave.got
    bus = health(x)
    window_a, window_b = a.got[mark_a - 1:], b.got[mark_b - 1:]
    print(f"\nmissing, doubled, out of order: alice {contiguous(window_a)}, bob "
          f"{contiguous(window_b)}, dave (joined during the move; {len(dave.got)} numbers) "
          f"{contiguous(dave.got)}")
    print(f"\nmoved back {took:.2f}s after home restarted (NATS_FAILBACK_AFTER=1 x "
          f"{bus['failback_after_s']:.2f}s); across it alice got {len(window_a)} of bob's, "
          f"bob {len(window_b)} of alice's; copies dropped {bus['copies_dropped']}")
    assert contiguous(window_a) == (0, 0, 0), window_a
    assert contiguous(window_b) == (0, 0, 0), window_b
    assert took >= bus["failback_after_s"]
    assert bus["failback_aborts"] == 0 and bus["moved_away"] == 1
    assert bus["away_s"] == 0 and bus["away_total_s"] > 0
    text = caplog.text
    for line in ("moved away from home server", "answers again", "moving back to home server",
                 "back home on"):
        assert line in text, line


async def test_health_and_metrics_show_where_the_bus_is(
        node_factory: NodeFactory, nats_factory: NatsFactory, tmp_path: Path) -> None:
    async with two_regions(node_factory, nats_factory, tmp_path, after=30.0) as (
            home, away, x, _y, _a, _b):
        home.kill()
        await moved_away(x, away)
        status, _, body = await get(f"https://127.0.0.1:{x.port}/metrics")
        assert status == 200
        lines = body.decode().splitlines()

        def value(name: str) -> float:
            return next(float(v) for k, _, v in (li.partition(" ") for li in lines) if k == name)

        assert value("prscd_bus_home") == 0
        assert value("prscd_bus_failbacks_total") == 0
        assert 0 <= value("prscd_bus_away_seconds") < 10
        [info] = [li for li in lines if li.startswith("prscd_bus_server_info{")]
        assert f'server="{redact(away.url)}"' in info
        assert f'home_server="{redact(home.url)}"' in info
        status, _, body = await get(f"https://127.0.0.1:{x.port}/health")
        assert b'"home": false' in body and b'"failbacks": 0' in body


async def test_a_flapping_home_server_does_not_pull_the_node_back(
        node_factory: NodeFactory, nats_factory: NatsFactory, tmp_path: Path) -> None:
    async with two_regions(node_factory, nats_factory, tmp_path, after=2.0) as (
            home, away, x, _y, a, b):
        period = health(x)["failback_after_s"]
        home.kill()
        await moved_away(x, away)
        for _ in range(3):  # up for less than the period, then down again
            home.start()
            await wait_until(lambda: health(x)["home_healthy_s"] > 0, 5, "a healthy probe")
            await asyncio.sleep(period / 3)
            home.kill()
            await wait_until(lambda: health(x)["home_healthy_s"] == 0, 5, "a failed probe")
            assert health(x)["failbacks"] == 0 and health(x)["server"] == redact(away.url)
        t_up = time.monotonic()
        home.start()
        await wait_until(lambda: health(x)["failbacks"] == 1, 20, "the move back home")
        took = time.monotonic() - t_up
        print(f"\nafter 3 flaps: moved back {took:.2f}s after home's last start "
              f"(period {period:.2f}s)")
        assert took >= period  # the earlier up-times did not count
        # The mesh still works after it all.
        a.start()
        await wait_until(lambda: len(b.got) > 10, 10, "alice's events at bob")


async def test_a_home_cut_off_from_the_mesh_is_not_moved_to(
        node_factory: NodeFactory, nats_factory: NatsFactory, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Home answers probes but has no gateway to where the node is: the marker sent through
    the old server never reaches home, so the move is given up and the node keeps serving
    from where it is, losing nothing (held publishes go out on the old connection)."""
    async with two_regions(node_factory, nats_factory, tmp_path, after=0.5) as (
            home, away, x, _y, a, b):
        home.kill()
        await moved_away(x, away)
        assert home.config is not None
        home.config.write_text(f'server_name: "home-alone"\nlisten: "127.0.0.1:{home.port}"\n')
        a.start()
        b.start()
        await wait_until(lambda: len(a.got) > 20 and len(b.got) > 20, 10, "traffic both ways")
        mark_a, mark_b = len(a.got), len(b.got)
        home.start()
        await wait_until(lambda: health(x)["failback_aborts"] >= 1, 20, "the move given up")
        assert health(x)["failbacks"] == 0 and health(x)["server"] == redact(away.url)
        await finish(a, b)
    assert contiguous(a.got[mark_a - 1:]) == (0, 0, 0)
    assert contiguous(b.got[mark_b - 1:]) == (0, 0, 0)
    assert "given up: nothing sent through" in caplog.text


async def test_probe_answers_for_a_live_server_only(nats_server: NatsServer) -> None:
    assert await probe(nats_server.url) == ""
    assert await probe(f"nats://127.0.0.1:{free_port()}") != ""


pytestmark_unit = pytest.mark.unit  # the pure tests below


@pytestmark_unit
def test_home_watch_starts_over_after_one_failed_probe() -> None:
    w = HomeWatch(30.0)
    assert not w.note(True, 0.0)
    assert not w.note(True, 29.0)
    assert not w.note(False, 29.5)  # a flap: the 30 s start over
    assert not w.note(True, 31.0)
    assert not w.note(True, 60.0)
    assert w.note(True, 61.0)


@pytestmark_unit
def test_overlap_delivers_each_message_once() -> None:
    class M:
        def __init__(self, subject: str, data: bytes) -> None:
            self.subject, self.data = subject, data

    old, new, sub = object(), object(), object()
    ov = Overlap(old, new)
    m = [M("s.x", str(i).encode()) for i in range(6)]
    # The old path carries 0..3 (unsubscribed after 3), the new path 2..5, slower: only 2
    # has come when the old connection is drained.
    assert all(ov.accept(sub, old, m[i]) for i in (0, 1))
    assert not ov.accept(sub, new, m[2])  # held
    assert all(ov.accept(sub, old, m[i]) for i in (2, 3))
    assert [msg for s, msg in ov.held if not ov.copy(ov.key(s, msg))] == []  # the cut
    ov.holding = False
    assert [ov.accept(sub, new, m[i]) for i in (3, 4, 5)] == [False, True, True]
    assert ov.duplicates == 2
    # Another subscription's copy of the same message is its own.
    assert ov.accept(object(), new, M("s.x", b"1"))


# -- with real distances: python -m infra.cluster up --wan (infra/wan.py) ------------------

async def raw_join(url: str, channel: str, client_id: str) -> ClientConnection:
    ws = await connect(f"{url.replace('https://', 'wss://')}?publickey=key&id={client_id}",
                       ssl=insecure())
    await ws.send(join_frame(channel, client_id))
    while True:
        frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5))
        if frame.get("op") == "channel_join":
            return ws


async def one_way(sender: ClientConnection, receivers: list[Counting], channel: str,
                  n: int = 20) -> list[tuple[float, float]]:
    """(median, max) ms from sender to each receiver over n messages 50 ms apart."""
    before = [len(r.took) for r in receivers]
    for _ in range(n):
        await sender.send(data_frame(channel, "t", repr(time.perf_counter())))
        await asyncio.sleep(0.05)
    await wait_until(lambda: all(len(r.took) >= b + n for r, b in zip(receivers, before,
                                                                       strict=True)),
                     10, "the stamped messages")
    out = []
    for r, b in zip(receivers, before, strict=True):
        took = sorted(r.took[b:b + n])
        out.append((took[len(took) // 2] * 1000, took[-1] * 1000))
    return out


def link_bytes(cluster: Any, src: str, dst: str) -> int:
    link = cluster.wan_stats(dst).get("links", {}).get(f"{src}->{dst}", {})
    return sum(d["bytes"] for d in link.get("directions", {}).values())


async def test_wan_a_region_away_from_home_pays_the_detour_then_goes_back(
        node_factory: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """eu-west loses its NATS server: its nodes move to ap-south's (60 ms away), come back
    once it is healthy again; what two eu-west nodes and a us-east peer see meanwhile."""
    from infra.cluster import Cluster
    from infra.wan import WanConfig
    from tests.mesh.conftest import cluster_ports
    from tests.mesh_helpers import free_port_block

    caplog.set_level("INFO", logger="prscd.mesh.nats")
    ports = cluster_ports()
    ports.wan = free_port_block(12)
    cluster = Cluster(tmp_path / "wan", ports, wan=WanConfig(),
                      node_env={"NATS_FAILBACK_AFTER": "3"})
    await asyncio.to_thread(cluster.up)
    peers: list[Counting] = []
    try:
        # ap-south's server (60 ms) before the nearer us-east's (40 ms), unlike
        # node_nats_urls: the detour (2 x 60 ms) then stands far out from the home path.
        urls = ",".join([cluster.nats_url("eu-west")] + [
            f"nats://127.0.0.1:{cluster.client_proxy_port('eu-west', r)}"
            for r in ("ap-south", "us-east")])
        nodes = [await node_factory(MESH_ID="eu-west", NATS_URL=urls, NATS_FAILBACK_AFTER="3",
                                    YOMO_SNDR_NAME=f"fb-source-{i}",
                                    YOMO_RCVR_NAME=f"fb-sfn-{i}") for i in (1, 2)]
        ch = "wan-home"
        peers += [Counting(await joined(nodes[0], ch, "alice"), "alice", ch),
                  Counting(await joined(nodes[1], ch, "bob"), "bob", ch),
                  Counting(await raw_join(cluster.node_url("us-east"), ch, "carol"), "carol",
                           ch)]
        alice, bob, carol = peers
        await asyncio.sleep(1.0)  # interest crosses the gateways
        home = await one_way(alice.ws, [bob, carol], ch)
        cluster.stop("nats", "eu-west", signal.SIGKILL)
        t_kill = time.monotonic()
        for n in nodes:
            await wait_until(lambda n=n: health(n)["server"].endswith(
                f":{cluster.client_proxy_port('eu-west', 'ap-south')}") and n.node.bus.up,
                15, "eu-west's nodes on ap-south's server")
        moved = time.monotonic() - t_kill
        await asyncio.sleep(1.0)
        away = await one_way(alice.ws, [bob, carol], ch)
        # Numbered traffic both ways across the move back: alice's through both moving nodes
        # and to us-east, carol's from us-east into a moving node.
        alice.start()
        carol.start()
        flows = [(bob, "alice"), (carol, "alice"), (alice, "carol"), (bob, "carol")]
        await wait_until(lambda: all(len(r.by.get(s, [])) > 20 for r, s in flows), 10,
                         "numbers everywhere")
        marks = {(r.name, s): len(r.by[s]) for r, s in flows}
        via_before = link_bytes(cluster, "eu-west", "ap-south")
        t_up = time.monotonic()
        await asyncio.to_thread(cluster.start_nats, "eu-west")
        await asyncio.to_thread(cluster.wait_nats)
        for n in nodes:
            await wait_until(lambda n=n: health(n)["failbacks"] == 1, 30, "the move back home")
        back_after = time.monotonic() - t_up
        await wait_until(lambda: cluster.node_health("eu-west")["bus"].get("home"), 30,
                         "the cluster's eu-west node back home too")
        n_alice = len(alice.got)
        await wait_until(lambda: len(alice.got) > n_alice + 30, 10, "carol's numbers after")
        await alice.stop_sending()
        await carol.stop_sending()
        sent = {"alice": alice.sent, "carol": carol.sent}
        await wait_until(lambda: all(r.by[s][-1] == sent[s] - 1 for r, s in flows), 10,
                         "the last numbers")
        windows = {f"{s}->{r.name}": r.by[s][marks[r.name, s] - 1:] for r, s in flows}
        back = await one_way(alice.ws, [bob, carol], ch)
        names = {c.get("name") for c in
                 await asyncio.to_thread(lambda: http_json(
                     f"{cluster.monitor('eu-west')}/connz")["connections"])}
        assert {"fb-source-1", "fb-sfn-1", "fb-source-2", "fb-sfn-2"} <= names
        # Nothing goes through the eu-west -> ap-south client link any more.
        via_after = link_bytes(cluster, "eu-west", "ap-south")
        await asyncio.sleep(2.5)  # the proxy rewrites its counters every second
        via_quiet = link_bytes(cluster, "eu-west", "ap-south") - via_after
        stats = health(nodes[0])
    finally:
        for p in peers:
            await p.close()
        await asyncio.to_thread(cluster.down)
    print("\nWAN (40/90/60 ms +-10), eu-west's NATS server killed, its nodes on ap-south's:")
    for what, row in (("home", home), ("away", away), ("back", back)):
        print(f"  {what}: eu-west->eu-west median {row[0][0]:.1f} ms (max {row[0][1]:.1f}); "
              f"eu-west->us-east median {row[1][0]:.1f} ms (max {row[1][1]:.1f})")
    for rec in caplog.records:
        if rec.getMessage().startswith(("nats back home on", "nats copies over")):
            print("  " + rec.getMessage())
    for name, seq in windows.items():
        print(f"  across the move back, {name}: {len(seq)} numbers, missing, doubled, out "
              f"of order {contiguous(seq)}")
    print(f"  moved away {moved:.2f}s after the kill; back {back_after:.2f}s after the "
          f"restart (period {stats['failback_after_s']}s); away {stats['away_total_s']}s; "
          f"client link eu-west->ap-south: {via_after - via_before} bytes while moving back, "
          f"{via_quiet} bytes in 2.5 s after")
    assert away[0][0] > 100 > home[0][0] + 50  # the detour: ~2 x 60 ms
    assert away[1][0] > home[1][0] + 60  # 60 + 90 instead of 40
    assert back[0][0] < 50 and back[1][0] < home[1][0] + 30
    assert via_quiet == 0
    for name, seq in windows.items():
        assert contiguous(seq) == (0, 0, 0), (name, seq)
