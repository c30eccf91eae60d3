"""One broadcast, one trace, across two regions: in-memory spans and a real OTLP/HTTP export."""

from __future__ import annotations

import gzip
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgpack
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from node.hops import SPAN_CHANNELS
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import control, data_frame, join_frame, joined, recv
from tests.mesh_helpers import NatsServer, wait_until


async def two_regions(node_factory: NodeFactory, nats: NatsServer,
                      **kw: Any) -> tuple[RunningNode, RunningNode]:
    # Every data message traced here (the default samples 1% of them: see below).
    eu = await node_factory(MESH_ID="eu-west", NATS_URL=nats.url, TRACE_DATA_RATIO="1",
                            **kw.get("eu", {}))
    us = await node_factory(MESH_ID="us-east", NATS_URL=nats.url, TRACE_DATA_RATIO="1",
                            **kw.get("us", {}))
    await wait_until(lambda: eu.node.liveness.nodes and us.node.liveness.nodes, 5, "heartbeats")
    return eu, us


async def broadcast_across(eu: RunningNode, us: RunningNode) -> None:
    alice = await joined(eu, "room", "alice")
    bob = await joined(us, "room", "bob")
    await alice.send(data_frame("room", "mouse", '{"x":1}'))
    got = await recv(bob)
    assert got["p"] == "alice" and msgpack.unpackb(got["pl"])["event"] == "mouse"
    await alice.close()
    await bob.close()


def by_name(spans: list[ReadableSpan], name: str, **attrs: Any) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name
            and all((s.attributes or {}).get(k) == v for k, v in attrs.items())]


async def test_span_tree_of_one_cross_region_broadcast(node_factory: NodeFactory,
                                                       nats_server: NatsServer) -> None:
    exp_eu, exp_us = InMemorySpanExporter(), InMemorySpanExporter()
    eu, us = await two_regions(node_factory, nats_server,
                               eu={"span_exporter": exp_eu}, us={"span_exporter": exp_us})
    await broadcast_across(eu, us)
    eu.node.tracing.flush()
    us.node.tracing.flush()
    eu_spans, us_spans = list(exp_eu.get_finished_spans()), list(exp_us.get_finished_spans())

    # Origin node: one span, transport receive; its context rides the NATS headers.
    [receive] = by_name(eu_spans, "prscd.receive", **{"prscd.op": "data"})
    assert receive.kind == SpanKind.SERVER and receive.parent is None
    assert receive.attributes["prscd.transport"] == "websocket"
    assert receive.attributes["prscd.peer.id"] == "alice"
    assert receive.attributes["prscd.channel"] == "room"
    assert receive.attributes["prscd.delivered"] == 0  # nobody else on the origin node
    # The subject is not repeated on the origin's span (it follows from app, channel and
    # node): the consumer's span has it.
    assert "messaging.destination.name" not in receive.attributes
    trace_id = receive.context.trace_id
    in_trace = [s for s in eu_spans if s.context.trace_id == trace_id]
    assert len(in_trace) == 1, [s.name for s in in_trace]

    # Remote node: Stream Function receive (CONSUMER, parent from the NATS headers).
    remote = [s for s in us_spans if s.context.trace_id == trace_id]
    [consume] = by_name(remote, "stream_function.receive")
    assert len(remote) == 1, [s.name for s in remote]
    assert consume.kind == SpanKind.CONSUMER
    assert consume.parent.span_id == receive.context.span_id and consume.parent.is_remote
    assert consume.attributes["prscd.origin.mesh_id"] == "eu-west"
    assert consume.attributes["prscd.origin.node_id"] == eu.node.node_id
    assert (consume.attributes["messaging.destination.name"]
            == f"prscd.default.room.20.eu-west.{eu.node.node_id}")
    assert consume.attributes["messaging.system"] == "nats"
    assert consume.attributes["prscd.delivered"] == 1

    # Every span says where it ran.
    for spans, node, region in ((in_trace, eu, "eu-west"), (remote, us, "us-east")):
        for span in spans:
            assert span.resource.attributes["service.name"] == "prscd"
            assert span.resource.attributes["service.instance.id"] == node.node.node_id
            assert span.resource.attributes["cloud.region"] == region

    # Joins and disconnects are traced too; an offline sent for a closed peer crosses the
    # mesh in the disconnect's trace.
    assert by_name(eu_spans, "prscd.receive", **{"prscd.op": "channel_join"})
    assert by_name(eu_spans, "prscd.disconnect")


REGIONS = ("eu-west", "us-east", "ap-south")


async def alice_online_on_three(nodes: list[RunningNode]) -> tuple[Any, list[Any]]:
    """Watchers on nodes 2 and 3, alice joins node 1 and comes online; both watchers see
    it. Returns alice and the watchers (open)."""
    await wait_until(lambda: all(len(n.node.liveness.nodes) >= 2 for n in nodes), 5,
                     "heartbeats from the other two nodes")
    watchers = [await joined(n, "room", f"w{i}") for i, n in enumerate(nodes[1:])]
    alice = await joined(nodes[0], "room", "alice")
    await wait_until(lambda: all(n.node.presence.channel_count() for n in nodes), 5,
                     "interest in the channel everywhere")
    await alice.send(control("peer_online", "room"))
    for w in watchers:
        got = await recv(w)
        assert got["op"] == "peer_online" and got["p"] == "alice", got
    return alice, watchers


async def test_defaults_trace_every_join_across_three_nodes_and_sample_data(
        node_factory: NodeFactory, nats_server: NatsServer) -> None:
    """Defaults: a peer coming online (the join the others see) is one trace over all three
    nodes; data messages are sampled (none with TRACE_DATA_RATIO=0 on the origin)."""
    exporters = [InMemorySpanExporter() for _ in range(3)]
    nodes = [await node_factory(MESH_ID=region, NATS_URL=nats_server.url, span_exporter=exp,
                                **({"TRACE_DATA_RATIO": "0"} if i == 0 else {}))
             for i, (region, exp) in enumerate(zip(REGIONS, exporters, strict=True))]
    alice, watchers = await alice_online_on_three(nodes)
    for i in range(50):
        await alice.send(data_frame("room", "mouse", f'{{"x":{i}}}'))
    for w in watchers:
        for _ in range(50):
            assert (await recv(w))["t"] == "data"
    for node in nodes:
        node.node.tracing.flush()
    spans = [list(exp.get_finished_spans()) for exp in exporters]
    [online] = by_name(spans[0], "prscd.receive", **{"prscd.op": "peer_online"})
    for remote in spans[1:]:
        assert [s for s in by_name(remote, "stream_function.receive")
                if s.context.trace_id == online.context.trace_id], "trace did not reach a node"
    # TRACE_DATA_RATIO=0 on the origin: no data span there; its events carry no trace
    # headers, and the others sample header-less data at their own 1% (100 draws: allow 5).
    assert not by_name(spans[0], "prscd.receive", **{"prscd.op": "data"})
    assert not by_name(spans[0], "source.publish"), "publishes ride the receive span"
    data_remote = sum(len(by_name(r, "stream_function.receive", **{"prscd.op": "data"}))
                      for r in spans[1:])
    assert data_remote <= 5, data_remote
    await alice.close()
    for w in watchers:
        await w.close()


async def test_a_disconnect_span_names_every_channel_bounded(
        node_factory: NodeFactory, nats_server: NatsServer) -> None:
    """A peer in 20 channels leaves: its disconnect span names the first SPAN_CHANNELS of
    them and counts all 20; the offline of each channel another node listens to reaches
    it in that trace."""
    exp_eu, exp_us = InMemorySpanExporter(), InMemorySpanExporter()
    eu, us = await two_regions(node_factory, nats_server,
                               eu={"span_exporter": exp_eu}, us={"span_exporter": exp_us})
    names = [f"c{i:02d}" for i in range(20)]
    alice = await joined(eu, names[0], "alice")
    for name in names[1:]:
        await alice.send(join_frame(name, "alice"))
        assert (await recv(alice))["c"] == name
    listened = names[::7]  # c00, c07, c14: one past the first SPAN_CHANNELS
    # A join's ack follows its subscription on the server (node/server.py _execute).
    bobs = [await joined(us, name, f"bob{i}") for i, name in enumerate(listened)]
    await alice.close()
    for bob in bobs:
        while (await recv(bob))["op"] != "peer_offline":
            pass
    eu.node.tracing.flush()
    us.node.tracing.flush()
    [gone] = by_name(list(exp_eu.get_finished_spans()), "prscd.disconnect",
                     **{"prscd.peer.id": "alice"})
    assert gone.attributes["prscd.channels"] == tuple(names[:SPAN_CHANNELS])
    assert gone.attributes["prscd.channel_count"] == 20
    arrived = [s for s in by_name(list(exp_us.get_finished_spans()), "stream_function.receive",
                                  **{"prscd.op": "peer_offline"})
               if s.context.trace_id == gone.context.trace_id]
    assert sorted(s.attributes["prscd.channel"] for s in arrived) == listened
    for bob in bobs:
        await bob.close()


async def test_data_ratio_samples_about_that_share(node_factory: NodeFactory) -> None:
    exp = InMemorySpanExporter()
    node = await node_factory(TRACE_DATA_RATIO="0.5", span_exporter=exp)
    alice = await joined(node, "room", "alice")
    bob = await joined(node, "room", "bob")
    for i in range(200):
        await alice.send(data_frame("room", "mouse", f'{{"x":{i}}}'))
    for _ in range(200):
        await recv(bob)
    node.node.tracing.flush()
    traced = by_name(list(exp.get_finished_spans()), "prscd.receive", **{"prscd.op": "data"})
    assert 50 <= len(traced) <= 150, len(traced)  # binomial(200, 0.5): sd 7
    assert all(s.attributes["prscd.delivered"] == 1 for s in traced)
    await alice.close()
    await bob.close()


class Collector:
    """A local OTLP/HTTP receiver: what Jaeger would get, decoded with opentelemetry-proto."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.requests.append(request)
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[str, Any]]:
        """(service.instance.id, span) for every exported span."""
        out = []
        for request in self.requests:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out.extend((attrs["service.instance.id"], span) for span in ss.spans)
        return out


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


async def test_real_otlp_export_from_two_nodes_joins_one_trace(
        collector: Collector, node_factory: NodeFactory, nats_server: NatsServer) -> None:
    # (collector first: it must outlive the nodes, which flush to it when they stop)
    endpoint = {"YOMO_TRACE_JAEGER_ENDPOINT": f"http://127.0.0.1:{collector.port}/v1/traces"}
    eu, us = await two_regions(node_factory, nats_server, eu=endpoint, us=endpoint)
    await broadcast_across(eu, us)
    for node in (eu, us):
        node.node.tracing.flush()
    spans = collector.spans()
    [(_, receive)] = [(n, s) for n, s in spans if s.name == "prscd.receive"
                      and any(a.key == "prscd.op" and a.value.string_value == "data"
                              for a in s.attributes)]
    trace = [(n, s) for n, s in spans if s.trace_id == receive.trace_id]
    assert {n for n, _ in trace} == {eu.node.node_id, us.node.node_id}
    [(node, consume)] = [(n, s) for n, s in trace if s.name == "stream_function.receive"]
    assert node == us.node.node_id
    assert consume.parent_span_id == receive.span_id and receive.parent_span_id == b""


async def test_legacy_jaeger_endpoint_is_mapped_with_one_log_line(
        node_factory: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prscd.tracing")
    node = await node_factory(YOMO_TRACE_JAEGER_ENDPOINT="http://127.0.0.1:14268/api/traces",
                              OTEL_BSP_SCHEDULE_DELAY="60000")
    assert node.node.tracing.enabled
    assert node.node.tracing.endpoint == "http://127.0.0.1:4318/v1/traces"
    notes = [r.getMessage() for r in caplog.records if "legacy" in r.getMessage()]
    assert len(notes) == 1 and "http://127.0.0.1:4318/v1/traces" in notes[0]


async def test_no_endpoint_no_tracing(node: RunningNode) -> None:
    assert not node.node.tracing.enabled and node.node.tracing.provider is None


async def test_jaeger_shows_a_join_across_three_nodes_as_one_trace(
        collector: Collector, node_factory: NodeFactory, nats_server: NatsServer) -> None:
    """What Jaeger gets over OTLP/HTTP from three nodes at the default settings: the peer
    coming online is one trace with one root, every other span's parent in it, and a
    span from each node (Jaeger shows a span whose parent never arrived as a broken
    trace)."""
    endpoint = f"http://127.0.0.1:{collector.port}/v1/traces"
    nodes = [await node_factory(MESH_ID=region, NATS_URL=nats_server.url,
                                YOMO_TRACE_JAEGER_ENDPOINT=endpoint) for region in REGIONS]
    alice, watchers = await alice_online_on_three(nodes)
    for node in nodes:
        node.node.tracing.flush()

    def op(span: Any) -> str:
        return next((a.value.string_value for a in span.attributes if a.key == "prscd.op"), "")

    spans = collector.spans()
    [(origin, root)] = [(n, s) for n, s in spans
                        if s.name == "prscd.receive" and op(s) == "peer_online"]
    trace = [(n, s) for n, s in spans if s.trace_id == root.trace_id]
    assert origin == nodes[0].node.node_id and root.parent_span_id == b""
    assert {n for n, _ in trace} == {n.node.node_id for n in nodes}, trace
    ids = {s.span_id for _, s in trace}
    assert [s for _, s in trace if not s.parent_span_id] == [root]
    assert all(s.parent_span_id in ids for _, s in trace if s is not root)
    consumers = [(n, s) for n, s in trace if s.name == "stream_function.receive"]
    assert sorted(n for n, _ in consumers) == sorted(n.node.node_id for n in nodes[1:])
    assert all(op(s) == "peer_online" for _, s in consumers)
    await alice.close()
    for w in watchers:
        await w.close()
