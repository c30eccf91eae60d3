"""/metrics scraped from real nodes, parsed by the Prometheus text parser; every named
metric moves as its scenario says (docs/metrics.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from node.metrics import FRAME_SAMPLE, Buckets, close_code
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import data_frame, get, insecure, join_frame, joined, recv
from tests.mesh.conftest import nats_factory, nats_server  # noqa: F401 (fixtures)
from tests.mesh_helpers import NatsServer, free_port, port_open, wait_sync, wait_until
from tests.wt_client import wt_connect

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and (sample name, labels) -> value; HELP and TYPE checked."""
    types, samples = {}, {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        assert f"# TYPE {family.name}" in text or f"# TYPE {family.name}_total" in text
        types[family.name] = family.type
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return types, samples


async def scrape(port: int, scheme: str = "https") -> tuple[dict[str, str], Samples]:
    status, headers, body = await get(f"{scheme}://127.0.0.1:{port}/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def metric(node: RunningNode, name: str, **labels: str) -> float:
    return value((await scrape(node.port))[1], name, **labels)


async def test_families_have_help_and_type_and_the_old_names_stay(node: RunningNode) -> None:
    types, samples = await scrape(node.port)
    for name, kind in {"prscd_peers": "gauge", "prscd_channels": "gauge",
                       "prscd_frames_handled": "counter", "prscd_frames_delivered": "counter",
                       "prscd_mesh_published": "counter", "prscd_mesh_received": "counter",
                       "prscd_mesh_publish_failed": "counter", "prscd_bus_up": "gauge",
                       "prscd_dropped": "counter", "prscd_frame_handle_seconds": "histogram",
                       "prscd_join_ack_seconds": "histogram",
                       "prscd_mesh_delivery_seconds": "histogram",
                       "prscd_ping_rtt_seconds": "histogram",
                       "prscd_mesh_publish_seconds": "histogram",
                       "prscd_mesh_nodes": "gauge", "process_cpu_seconds": "counter",
                       "prscd_build_info": "gauge", "prscd_uptime_seconds": "gauge"}.items():
        assert types.get(name) == kind, name
    assert value(samples, "prscd_build_info", version=node.node.health()["version"],
                 mesh_id="local", node_id=node.node.node_id) == 1
    assert value(samples, "prscd_mesh_nodes", state="alive") == 1


async def test_a_join_a_drop_a_close_code_and_http_statuses(
        node_factory: NodeFactory) -> None:
    node = await node_factory(PUBLIC_KEYS="key:app", PING_INTERVAL="0.2",
                              MAX_CHANNELS_PER_PEER="1", RATE_LIMIT="0")
    before = (await scrape(node.port))[1]
    alice = await joined(node, "room", "alice")
    after = (await scrape(node.port))[1]
    assert value(after, "prscd_peers") == 1
    assert value(after, "prscd_connections", transport="websocket") == 1
    for name, labels in (("prscd_join_ack_seconds_count", {}),
                         ("prscd_connections_opened_total", {"transport": "websocket"}),
                         ("prscd_auth_total", {"result": "ok"}),
                         ("prscd_http_responses_total", {"listener": "node", "status": "101"})):
        assert value(after, name, **labels) == value(before, name, **labels) + 1, name
    assert value(after, "prscd_join_ack_seconds_sum") > 0
    # Frames are timed one in FRAME_SAMPLE: 2 * FRAME_SAMPLE frames in a row, two timed.
    handled = value(after, "prscd_frames_handled_total")
    for i in range(2 * FRAME_SAMPLE):
        await alice.send(data_frame("room", "move", str(i)))
    await wait_until(lambda: _eq(metric(node, "prscd_frames_handled_total"),
                                 handled + 2 * FRAME_SAMPLE), 5.0, "the frames handled")
    assert await metric(node, "prscd_frame_handle_seconds_count") == value(
        after, "prscd_frame_handle_seconds_count") + 2

    # The keepalive's pong: the WebSocket RTT histogram.
    await wait_until(lambda: metric(node, "prscd_ping_rtt_seconds_count",
                                    transport="websocket"), 5.0, "a pong")

    # A second channel over MAX_CHANNELS_PER_PEER: closed 4008, a drop and a refusal.
    await alice.send(join_frame("second", "alice"))
    with pytest.raises(ConnectionClosed):
        while True:
            await recv(alice)
    assert alice.close_code == 4008
    await wait_until(lambda: not node.node.links, 5.0, "alice closed")
    samples = (await scrape(node.port))[1]
    assert value(samples, "prscd_dropped_total", reason="too_many_channels") == 1
    assert value(samples, "prscd_limit_refusals_total", limit="channels") == 1
    assert value(samples, "prscd_connections_closed_total", transport="websocket",
                 code="4008") == 1
    assert value(samples, "prscd_peers") == 0

    # A client's own close code, an unknown key (403) and a page that does not exist (404).
    bob = await joined(node, "room", "bob")
    await bob.close(4100, "bye")
    await wait_until(lambda: not node.node.links, 5.0, "bob closed")
    with pytest.raises(Exception, match="403"):
        await connect(node.ws_url("nope", "eve"), ssl=insecure())
    assert (await get(f"https://127.0.0.1:{node.port}/nope"))[0] == 404
    samples = (await scrape(node.port))[1]
    assert value(samples, "prscd_connections_closed_total", transport="websocket",
                 code="4100") == 1
    assert value(samples, "prscd_auth_total", result="denied") == 1
    assert value(samples, "prscd_http_responses_total", listener="node", status="403") == 1
    assert value(samples, "prscd_http_responses_total", listener="node", status="404") == 1


async def test_webtransport_sessions_rtt_and_close_codes(node_factory: NodeFactory) -> None:
    node = await node_factory(WEBTRANSPORT="true", WT_PING_INTERVAL="0.2")
    async with wt_connect(node.port, "/v1?publickey=key&id=wt") as wt:
        wt.send_datagram(join_frame("room", "wt"))
        await wt.next_message(match=lambda m: m.get("op") == "channel_join")
        samples = (await scrape(node.port))[1]
        assert value(samples, "prscd_connections", transport="webtransport") == 1
        assert value(samples, "prscd_connections_opened_total", transport="webtransport") == 1
        assert value(samples, "prscd_http_responses_total", listener="node", status="200") >= 1
        await wait_until(lambda: metric(node, "prscd_ping_rtt_seconds_count",
                                        transport="webtransport"), 5.0, "a QUIC RTT sample")
        wt.close_session(4100, "tab closed")
        await wait_until(lambda: not node.node.links, 5.0, "the session closed")
    samples = (await scrape(node.port))[1]
    assert value(samples, "prscd_connections_closed_total", transport="webtransport",
                 code="4100") == 1
    assert value(samples, "prscd_connections", transport="webtransport") == 0


async def test_a_close_is_counted_under_its_real_code_not_its_reason_text(
        node_factory: NodeFactory) -> None:
    """The code label is the code a transport sent or received, passed as a value: a
    reason (client-written) or a why text saying "code=1000" does not move it."""
    node = await node_factory(WEBTRANSPORT="true")
    bob = await joined(node, "room", "bob")
    await bob.close(4100, "code=1000")
    async with wt_connect(node.port, "/v1?publickey=key&id=wt") as wt:
        wt.send_datagram(join_frame("room", "wt"))
        await wt.next_message(match=lambda m: m.get("op") == "channel_join")
        wt.close_session(4101, "code=1000")
        await wait_until(lambda: not node.node.links, 5.0, "both closed")
    # A connection gone without a code, its why text naming one: counted "none".
    carol = await joined(node, "room", "carol")
    [peer] = node.node.presence.peers.values()
    await node.node.closed(peer, "client said code=1000 reason='code=1000'")
    await carol.close()
    samples = (await scrape(node.port))[1]
    for transport, code in (("websocket", "4100"), ("webtransport", "4101"),
                            ("websocket", "none")):
        assert value(samples, "prscd_connections_closed_total", transport=transport,
                     code=code) == 1, (transport, code)
    for transport in ("websocket", "webtransport"):
        assert value(samples, "prscd_connections_closed_total", transport=transport,
                     code="1000") == 0


async def test_metrics_off_keeps_counters_and_drops_histograms(
        node_factory: NodeFactory) -> None:
    node = await node_factory(METRICS="false", METRICS_PORT=str(free_port()))
    ws = await joined(node, "room", "alice")
    types, samples = await scrape(node.node.settings.metrics_port, "http")
    assert "prscd_join_ack_seconds" not in types and "prscd_frame_handle_seconds" not in types
    assert value(samples, "prscd_peers") == 1
    assert value(samples, "prscd_frames_handled_total") == 1
    await ws.close()


# -- the mesh: an in-process node and a node process on one real nats-server ----------


@pytest.fixture
def process_node(tmp_path: Path, nats_server: NatsServer) -> Iterator[tuple[int, Any]]:  # noqa: F811
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "PORT", "TLS")}
    env.update({"HOST": "127.0.0.1", "TLS": "false", "PORT": str(port), "MESH_ID": "far",
                "NATS_URL": nats_server.url, "HEARTBEAT_INTERVAL": "0.3", "NODE_TIMEOUT": "1.5",
                "PID_FILE": str(tmp_path / "far.pid")})
    proc = subprocess.Popen([sys.executable, "-m", "node", "--env-file", os.devnull],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_sync(lambda: port_open(port), 20, "the node process to listen")
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_mesh_delivery_latency_and_a_killed_node_counted_dead(
        node_factory: NodeFactory, nats_server: NatsServer,  # noqa: F811
        process_node: tuple[int, Any]) -> None:
    port, proc = process_node
    near = await node_factory(MESH_ID="near", NATS_URL=nats_server.url,
                              HEARTBEAT_INTERVAL="0.3", NODE_TIMEOUT="1.5")

    async def nodes(state: str) -> float:
        return await metric(near, "prscd_mesh_nodes", state=state)

    await wait_until(lambda: _eq(nodes("alive"), 2), 10.0, "the far node alive")
    samples = (await scrape(near.port))[1]
    far_rows = [k for k in samples if k[0] == "prscd_mesh_node_heartbeat_age_seconds"
                and ("mesh_id", "far") in k[1]]
    assert len(far_rows) == 1 and samples[far_rows[0]] < 1.5

    # A data message from the far node's peer reaches ours: one delivery latency, origin far.
    alice = await joined(near, "room", "alice")
    bob = await connect(f"ws://127.0.0.1:{port}/v1?publickey=key&id=bob")
    await bob.send(join_frame("room", "bob"))
    assert (await recv(bob))["op"] == "channel_join"
    await asyncio.sleep(0)
    await bob.send(data_frame("room", "hello", '"hi"'))
    while (await recv(alice, 10.0))["t"] != "data":
        pass
    samples = (await scrape(near.port))[1]
    count = value(samples, "prscd_mesh_delivery_seconds_count", origin="far")
    assert count >= 1
    # One host, one clock: the latency is real, under a second, and never negative.
    assert 0 < value(samples, "prscd_mesh_delivery_seconds_sum", origin="far") < count
    assert value(samples, "prscd_mesh_delivery_seconds_bucket", origin="far", le="1.0") == count

    proc.send_signal(signal.SIGKILL)
    await wait_until(lambda: _eq(nodes("dead"), 1), 1.5 + 3.0, "the far node counted dead")
    assert await nodes("alive") == 1
    samples = (await scrape(near.port))[1]
    assert not [k for k in samples if k[0] == "prscd_mesh_node_heartbeat_age_seconds"
                and ("mesh_id", "far") in k[1]]
    await alice.close()


async def _eq(got: Any, want: float) -> bool:
    return await got == want


# -- pure parts ------------------------------------------------------------------------


@pytest.mark.unit
def test_buckets_are_cumulative_with_le_bounds() -> None:
    from prometheus_client.metrics_core import HistogramMetricFamily

    b = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        b.observe(v)
    family = HistogramMetricFamily("x_seconds", "x")
    b.add_to(family, [])
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("x_seconds_bucket", "0.1")] == 2  # 0.1 itself is "le 0.1"
    assert got[("x_seconds_bucket", "1.0")] == 3
    assert got[("x_seconds_bucket", "+Inf")] == 4 == got[("x_seconds_count", None)]
    assert got[("x_seconds_sum", None)] == pytest.approx(2.65)


@pytest.mark.unit
def test_close_code_labels() -> None:
    assert close_code(1000) == "1000"
    assert close_code(4100) == "4100"
    assert close_code(0) == "0"  # WebTransport's plain close
    assert close_code(4999) == "4999"
    assert close_code(5000) == "other"  # WebTransport's 32-bit codes
    assert close_code(70000) == "other"
    assert close_code(None) == "none"
