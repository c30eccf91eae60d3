"""Prometheus metrics of one node: a registry of its own, read at scrape time.

Every family (names, types, labels: docs/metrics.md) comes from one custom collector,
:meth:`NodeMetrics.collect`, which reads plain integers the node keeps anyway (frames
handled and delivered, drops by reason, bus counters) or keeps here (connections by
transport and close code, HTTP answers, auth results) and turns them into
``prometheus_client`` families at scrape time. The hot path pays an integer increment,
never a label lookup or a lock: measured on this machine, ``Counter.inc()`` of the
library costs ~1.5 us and ``Histogram.observe()`` ~3.7 us, an ``int += 1`` ~0.05 us and
:class:`Buckets` ``.observe`` ~0.6 us (bench/metrics.py measures the whole fan-out).

One registry per node (not the library's global one), so several nodes in one process
(the tests) never collide; the process collector and ``python_info`` are added to it.
``METRICS=false`` turns the histograms off (no clock read per frame).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from mesh.liveness import BYE
from node import __version__
from node.endpoints import METRICS_TYPE
from node.protocol import CHANNEL_JOIN, Signalling

if TYPE_CHECKING:
    from mesh.bridge import Source, StreamFunction
    from mesh.bus import Bus
    from mesh.liveness import Liveness
    from node.presence import Presence
    from node.webhooks import Webhooks

log = logging.getLogger("prscd.metrics")

TRANSPORTS = ("websocket", "webtransport")

FRAME_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
                 0.1, 0.25, 1.0)
JOIN_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0)
MESH_BUCKETS = (5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
                2.5, 5.0, 10.0)
RTT_BUCKETS = (1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
PUBLISH_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 0.01, 0.1, 1.0)

#: Drop reasons that are a limit's refusal (node/limits.py, node/protocol.py Fault).
LIMITS = {"connection_limit": "connections", "rate_limited": "rate", "rate_flood": "rate_flood",
          "too_many_channels": "channels", "channel_full": "members",
          "slow_reader": "write_backlog", "too_big": "message_size", "wt_backlog": "wt_backlog"}
#: One frame (and one bus publish) in FRAME_SAMPLE is timed: two clock reads and an
#: observation cost ~1.5-2.5 us per frame in place on the bench machine (measured by
#: toggling them on one node: bench/metrics.py), ~5% of a frame to 10 receivers. Every
#: join is timed (they are few). Quantiles of a 1-in-8 sample are the frames' quantiles.
FRAME_SAMPLE = 8
#: Distinct ``origin`` labels kept (one per region); more are counted as "other".
MAX_ORIGINS = 64


class Buckets:
    """A histogram without labels, locks or clocks: ``observe`` is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        total, cumulative = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
        family.add_metric(labels, cumulative, sum_value=self.sum)


class Labelled:
    """Histograms by one bounded label; children made on first use, at most ``limit``."""

    __slots__ = ("bounds", "children", "limit")

    def __init__(self, bounds: tuple[float, ...], limit: int = MAX_ORIGINS) -> None:
        self.bounds, self.limit = bounds, limit
        self.children: dict[str, Buckets] = {}

    def child(self, label: str) -> Buckets:
        child = self.children.get(label)
        if child is None:
            if len(self.children) >= self.limit:
                label = "other"
            child = self.children.get(label)
            if child is None:
                child = self.children[label] = Buckets(self.bounds)
        return child


def close_code(code: int | None) -> str:
    """The ``code`` label of a close: the code the node sent or a transport sent or
    received (passed as a value, never read back from a reason text a client may write);
    "none" when the connection ended without one. WebTransport's codes are 32 bits (0 is
    its plain close): outside 0-4999 they are counted as "other"."""
    if code is None:
        return "none"
    return str(code) if 0 <= code <= 4999 else "other"


class Node(Protocol):
    """What a scrape reads of node/server.py's Node (this module does not import it)."""

    node_id: str
    started_at: float
    draining: bool
    delivered: int
    links: dict[str, Any]
    presence: Presence
    bus: Bus
    source: Source
    stream_function: StreamFunction
    liveness: Liveness
    webhooks: Webhooks | None

    @property
    def mesh_id(self) -> str: ...


class NodeMetrics:
    """The node's registry and the counters only metrics need. ``text()`` is a scrape."""

    def __init__(self, node: Node, *, histograms: bool = True) -> None:
        self.node = node
        self.opened: Counter[str] = Counter()
        self.closed: Counter[tuple[str, str]] = Counter()
        #: HTTP answers on PORT (node/transports/*.py), by status.
        self.http: Counter[int] = Counter()
        self.auth: Counter[str] = Counter()
        self.clock_behind: Counter[str] = Counter()
        #: The server API's answers by status (node/api.py), set by node/app.py.
        self.api_answered: Counter[int] = Counter()
        on = histograms
        self.frame = Buckets(FRAME_BUCKETS) if on else None
        self.join = Buckets(JOIN_BUCKETS) if on else None
        self.publish = Buckets(PUBLISH_BUCKETS) if on else None
        self.delivery = Labelled(MESH_BUCKETS) if on else None
        self.rtt = {t: Buckets(RTT_BUCKETS) for t in TRANSPORTS} if on else None
        self.registry = CollectorRegistry()
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    # -- what the node and its transports report ---------------------------------

    def mesh_delivered(self, origin: str, sent_at: float) -> None:
        """An event from ``origin`` (a MESH_ID), stamped ``sent_at`` by the origin's wall
        clock, is dispatched here. Clock skew between the hosts adds to it; an origin
        clock ahead of ours is counted and observed as 0."""
        if self.delivery is None or not sent_at:
            return
        latency = time.time() - sent_at
        child = self.delivery.child(origin)
        if latency < 0:
            self.clock_behind[origin if origin in self.delivery.children else "other"] += 1
            latency = 0.0
        child.observe(latency)

    def handled(self, sig: Signalling, seconds: float, *, sampled: bool) -> None:
        """A timed frame from a local peer went through the node in ``seconds`` (only
        with the histograms on); ``sampled``: one of the 1-in-FRAME_SAMPLE frames."""
        if sampled:
            self.frame.observe(seconds)  # type: ignore[union-attr]
        if sig.op == CHANNEL_JOIN:
            self.join.observe(seconds)  # type: ignore[union-attr]

    def ping_rtt(self, transport: str, seconds: float) -> None:
        if self.rtt is not None and transport in self.rtt:
            self.rtt[transport].observe(seconds)

    # -- scrape ---------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield from self._node(node)
        yield from self._mesh(node)
        yield from self._histograms()
        if node.webhooks is not None:
            yield from _webhooks(node.webhooks.stats())

    def _node(self, node: Node) -> Iterator[Metric]:
        info = GaugeMetricFamily("prscd_build_info", "The build and node that answered (always 1).",
                                 labels=["version", "mesh_id", "node_id"])
        info.add_metric([__version__, node.mesh_id, node.node_id], 1)
        yield info
        yield _gauge("prscd_uptime_seconds", "Seconds since this node started.",
                     time.monotonic() - node.started_at)
        yield _gauge("prscd_peers", "Connected peers (all transports).", len(node.links))
        current = GaugeMetricFamily("prscd_connections", "Connected peers by transport.",
                                    labels=["transport"])
        closed_by = Counter[str]()
        for (transport, _), n in self.closed.items():
            closed_by[transport] += n
        for transport in TRANSPORTS:
            current.add_metric([transport], self.opened[transport] - closed_by[transport])
        yield current
        yield _gauge("prscd_channels", "Channels with at least one local peer.",
                     node.presence.channel_count())
        yield _gauge("prscd_realms", "Apps with at least one local peer.",
                     len(node.presence.realms))
        yield _counters("prscd_connections_opened_total", "Peers admitted and opened.",
                        ["transport"], {(t,): self.opened[t] for t in TRANSPORTS})
        yield _counters("prscd_connections_closed_total", "Peers closed, by transport and "
                        "close code (the node's or the client's; 1006: no close frame, "
                        "none: no code).", ["transport", "code"], self.closed)
        yield _counter("prscd_frames_handled_total", "Frames from local peers the rules "
                       "handled.", node.presence.handled)
        yield _counter("prscd_frames_delivered_total", "Frames queued to local peers.",
                       node.delivered)
        yield _counters("prscd_presence_grace_total", "Vanished peers (keepalive or idle "
                        "timeout) held for PRESENCE_GRACE, by outcome: held, returned (back in "
                        "time, no offline), released (offline after the grace); silent (past "
                        "the soft keepalive timeout, still connected), heard (a silent peer "
                        "back within the grace), rejoined (back after it).", ["outcome"],
                        {(k,): v for k, v in node.grace_counts.items()})
        dropped = dict(node.presence.dropped)
        yield _counters("prscd_dropped_total", "Dropped or refused, by reason (/health "
                        "dropped).", ["reason"], {(r,): n for r, n in sorted(dropped.items())})
        refused = Counter[str]()
        for reason, n in dropped.items():
            if reason in LIMITS:
                refused[LIMITS[reason]] += n
        yield _counters("prscd_limit_refusals_total", "Refusals by a limit (node/limits.py).",
                        ["limit"], {(k,): refused[k] for k in sorted(set(LIMITS.values()))})
        yield _counters("prscd_auth_total", "Admissions by auth result.", ["result"],
                        {(r,): self.auth[r] for r in ("ok", "denied", "expired", "unavailable")})
        answers = {("node", str(status)): n for status, n in self.http.items()}
        answers.update({("api", str(status)): n for status, n in self.api_answered.items()})
        yield _counters("prscd_http_responses_total", "HTTP answers, by listener (node: PORT, "
                        "api: the server API) and status.", ["listener", "status"], answers)

    def _mesh(self, node: Node) -> Iterator[Metric]:
        live, source, stream = node.liveness, node.source, node.stream_function
        yield _gauge("prscd_bus_up", "1 while the bus is connected.", int(node.bus.up))
        where = node.bus.where()  # the NATS bus: its server, home or away (mesh/home.py)
        if where:
            yield from _bus_home(where)
        yield _gauge("prscd_mesh_link_up", "1 while this node hears its own heartbeat come "
                     "back.", int(live.link_ok))
        yield _counter("prscd_mesh_published_total", "Events published to the bus.",
                       source.published)
        yield _counter("prscd_mesh_publish_failed_total", "Publishes that failed (bus down).",
                       source.failed)
        yield _counter("prscd_mesh_received_total", "Events from other nodes.", stream.received)
        yield _counter("prscd_mesh_nodes_declared_dead_total", "Nodes this node declared "
                       "dead or saw leave.", live.declared_dead)
        yield _counters("prscd_mesh_clock_behind_total", "Mesh events stamped ahead of our "
                        "clock (skew), observed as 0.", ["origin"],
                        {(o,): n for o, n in self.clock_behind.items()})
        states = Counter({"alive": 0, "draining": 0, "dead": 0, "left": 0})
        states["draining" if node.draining else "alive"] += 1  # this node
        now = live.clock()
        age = GaugeMetricFamily("prscd_mesh_node_heartbeat_age_seconds", "Seconds since each "
                                "live node was last heard from.", labels=["mesh_id", "node"])
        peers = GaugeMetricFamily("prscd_mesh_node_peers", "Peers of each live node (its "
                                  "heartbeat).", labels=["mesh_id", "node"])
        channels = GaugeMetricFamily("prscd_mesh_node_channels", "Channels of each live node "
                                     "(its heartbeat).", labels=["mesh_id", "node"])
        own = now - live.own_echo_at if live.own_echo_at is not None else float("nan")
        age.add_metric([node.mesh_id, node.node_id], own)
        peers.add_metric([node.mesh_id, node.node_id], len(node.links))
        channels.add_metric([node.mesh_id, node.node_id], node.presence.channel_count())
        for info in live.nodes.values():
            ready = bool(info.info.get("ready", True))
            states["alive" if ready else "draining"] += 1
            age.add_metric([info.mesh, info.node], now - info.last_seen)
            peers.add_metric([info.mesh, info.node], info.peers)
            channels.add_metric([info.mesh, info.node], info.channels)
        for why, _ in live.dead.values():
            states["left" if why == BYE else "dead"] += 1
        by_state = GaugeMetricFamily("prscd_mesh_nodes", "Nodes this node knows, itself "
                                     "included, by state.", labels=["state"])
        for state, n in states.items():
            by_state.add_metric([state], n)
        yield by_state
        yield age
        yield peers
        yield channels

    def _histograms(self) -> Iterator[Metric]:
        if self.frame is not None:
            yield _histogram("prscd_frame_handle_seconds", "A frame from a local peer, "
                             "received to its actions carried out.", self.frame)
        if self.join is not None:
            yield _histogram("prscd_join_ack_seconds", "A channel_join frame to its ack "
                             "queued.", self.join)
        if self.publish is not None:
            yield _histogram("prscd_mesh_publish_seconds", "One bus publish call.",
                             self.publish)
        if self.delivery is not None:
            family = HistogramMetricFamily("prscd_mesh_delivery_seconds", "Origin node's "
                                           "publish (its clock) to dispatch here done.",
                                           labels=["origin"])
            for origin, child in sorted(self.delivery.children.items()):
                child.add_to(family, [origin])
            yield family
        if self.rtt is not None:
            family = HistogramMetricFamily("prscd_ping_rtt_seconds", "Keepalive round "
                                           "trips by transport.", labels=["transport"])
            for transport, child in self.rtt.items():
                child.add_to(family, [transport])
            yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _counters(name: str, doc: str, labels: list[str],
              values: dict[tuple[str, ...], int] | Counter[tuple[str, str]]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key), n)
    return family


def _histogram(name: str, doc: str, buckets: Buckets) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    buckets.add_to(family, [])
    return family


def _bus_home(where: dict[str, Any]) -> Iterator[Metric]:
    info = GaugeMetricFamily("prscd_bus_server_info", "The NATS server the bus is on, and "
                             "its home server (always 1).", labels=["server", "home_server"])
    info.add_metric([str(where["server"]), str(where["home_server"])], 1)
    yield info
    yield _gauge("prscd_bus_home", "1 while the bus is on its home server.", int(where["home"]))
    yield _gauge("prscd_bus_away_seconds", "Seconds away from home now.", where["away_s"])
    yield _counter("prscd_bus_away_seconds_total", "Seconds away from home in all.",
                   where["away_total_s"])
    yield _counter("prscd_bus_failbacks_total", "Moves back home.", where["failbacks"])
    yield _counter("prscd_bus_failback_aborts_total", "Moves home given up.",
                   where["failback_aborts"])


def _webhooks(stats: dict[str, int]) -> Iterator[Metric]:
    yield _gauge("prscd_webhook_queued", "Webhook events waiting to be sent.",
                 stats["queued"])
    yield _gauge("prscd_webhook_held", "Leaves held for the grace period.", stats["held"])
    for key, doc in (("batches_sent", "Batches the receiver accepted."),
                     ("events_sent", "Events in the accepted batches."),
                     ("batches_retried", "Attempts that failed and were tried again."),
                     ("batches_failed", "Batches given up.")):
        yield _counter(f"prscd_webhook_{key}_total", doc, stats[key])



class MetricsListener:
    """``GET /metrics`` on ``METRICS_PORT``, plain HTTP: one port per worker of
    ``prscd --workers N`` (node/workers.py gives worker n METRICS_PORT+n), where PORT is
    shared and a scrape there reaches one worker chosen by the kernel."""

    def __init__(self, metrics: NodeMetrics, host: str, port: int) -> None:
        self.metrics, self.host, self.port = metrics, host, port
        self._runner: web.ServerRunner | None = None

    async def start(self) -> list[tuple[str, int]]:
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host or None, self.port).start()
        addresses = [(str(a[0]), int(a[1])) for a in self._runner.addresses]
        log.info("metrics listening port=%d", addresses[0][1])
        return addresses

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.path != "/metrics":
            return web.Response(status=404, text="only /metrics here\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="use GET\n", headers={"Allow": "GET, HEAD"})
        return web.Response(body=self.metrics.text(),
                            headers={"Content-Type": METRICS_TYPE})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
