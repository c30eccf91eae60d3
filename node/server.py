"""The node: wires transports, the presence rules and the mesh; start, drain, stop.

Transports call four methods: :meth:`Node.admit` (may this URL connect?),
:meth:`Node.open_peer`, :meth:`Node.receive` (one frame) and :meth:`Node.close_peer`.
Everything a frame causes comes back from :mod:`node.presence` as actions, carried
out here: deliver bytes to local peers, publish to the mesh, change bus interest.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import resource
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

from mesh.bridge import TAG_PEER, MeshEvent, Source, StreamFunction, event_subject, new_node_id
from mesh.bus import Bus, EmbeddedBus
from mesh.liveness import Liveness
from mesh.tracing import CONSUMER, PRODUCER, SERVER, Tracing, make_tracing
from node import __version__, protocol
from node.auth import Auth, AuthError, AuthUnavailable
from node.config import Settings
from node.limits import Guard, Refusal
from node.presence import Deliver, Interest, Peer, Presence, Publish
from node.tls import CertInfo

log = logging.getLogger("prscd.node")


class Link(Protocol):
    transport: str

    def send(self, frame: bytes) -> bool: ...

    def close(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict on a connection URL: 101 with an identity, or an HTTP error."""

    status: int
    reason: str = ""
    client_id: str = ""
    app: str = ""


def make_bus(settings: Settings) -> Bus:
    if settings.nats_url:
        from mesh.nats import NatsBus  # imported only when the mesh is configured

        return NatsBus(settings)
    return EmbeddedBus()


class Node:
    def __init__(self, settings: Settings, cert: CertInfo | None = None,
                 bus: Bus | None = None, span_exporter: Any = None) -> None:
        self.settings = settings
        self.cert = cert
        self.node_id = new_node_id(settings.mesh_id)
        #: ``tracing.enabled`` False (no endpoint) = one attribute check per frame, no spans.
        self.tracing: Tracing = make_tracing(settings, self.node_id, span_exporter)
        self.presence = Presence(settings.mesh_id, dedupe_state=settings.dedupe_peer_state)
        self.auth = Auth.from_settings(settings)
        self.guard = Guard(settings, self.presence)
        self.bus = bus or make_bus(settings)
        self.source = Source(self.bus, settings.mesh_id, self.node_id, settings.sndr_name)
        self.stream_function = StreamFunction(
            self.bus, self.node_id, settings.rcvr_name, self._on_mesh_event
        )
        self.liveness = Liveness(
            self.bus, self.node_id, settings.mesh_id,
            interval=settings.heartbeat_interval, timeout=settings.node_timeout,
            public_url=settings.public_url,
            stats=lambda: {"peers": len(self.presence.peers),
                           "channels": self.presence.channel_count(),
                           "ready": self.readiness()[0], "version": __version__},
            on_down=self._on_node_down, on_resync=self._schedule_resync,
        )
        self._resync: asyncio.TimerHandle | None = None
        self._sids = itertools.count(1)
        self.started_at = time.monotonic()
        self.draining = False
        self.transports: list[Any] = []
        self.addresses: list[tuple[str, int]] = []
        self.port = settings.port
        self.delivered = 0

    # -- what transports call ------------------------------------------------

    async def admit(self, query: str, transport: str) -> Admission:
        params = protocol.parse_query(query)
        publickey, raw_id = params.get("publickey", ""), params.get("id", "")
        if not publickey:
            return Admission(HTTPStatus.UNAUTHORIZED, "missing publickey")
        if not raw_id:
            return Admission(HTTPStatus.UNAUTHORIZED, "missing id")
        try:
            client_id = protocol.check_client_id(raw_id)
        except protocol.ProtocolError as exc:
            return Admission(HTTPStatus.BAD_REQUEST, f"bad id: {exc}")
        if self.draining:
            return Admission(HTTPStatus.SERVICE_UNAVAILABLE, "node is draining")
        if full := self.guard.admit():
            self.count_drop("connection_limit")
            return Admission(HTTPStatus.SERVICE_UNAVAILABLE, full)
        try:
            app = await self.auth.resolve(publickey, client_id)
        except AuthError as exc:
            log.info("rejected transport=%s id=%s reason=%s", transport, client_id, exc)
            return Admission(HTTPStatus.FORBIDDEN, "publickey rejected")
        except AuthUnavailable:
            self.count_drop("auth_unavailable")
            return Admission(HTTPStatus.SERVICE_UNAVAILABLE, "cannot check the publickey now")
        return Admission(HTTPStatus.SWITCHING_PROTOCOLS, "", client_id, app)

    def open_peer(self, admission: Admission, transport: str, link: Link) -> Peer:
        peer = Peer(
            sid=f"{next(self._sids):x}",
            client_id=admission.client_id,
            app=admission.app,
            transport=transport,
            link=link,
        )
        self.presence.connect(peer)
        self.guard.opened(peer, time.monotonic())
        log.info("peer open sid=%s id=%s app=%s transport=%s",
                 peer.sid, peer.client_id, peer.app, transport)
        return peer

    async def receive(self, peer: Peer, frame: bytes) -> None:
        """Handle one frame; raises ProtocolError for the transport to close on."""
        if peer.sid not in self.presence.peers:
            self.count_drop("after_close")  # closed by a limit; the socket is closing
            return
        sig = protocol.decode(frame)
        verdict = self.guard.check(peer, sig, time.monotonic())
        if verdict:
            if isinstance(verdict, Refusal):
                await self.refuse(peer, verdict)
            else:
                self.count_drop("rate_limited")
            return
        if self.settings.debug:
            log.debug("frame sid=%s id=%s t=%s op=%s c=%r bytes=%d",
                      peer.sid, peer.client_id, sig.t, sig.op, sig.c, len(frame))
        if self.tracing.enabled:
            await self._receive_traced(peer, sig, len(frame))
            return
        await self._execute(self.presence.handle(peer, sig))

    async def refuse(self, peer: Peer, refusal: Refusal) -> None:
        """Close a peer over a limit now: others hear its offline at once."""
        self.count_drop(refusal.counter)
        log.warning("limit sid=%s id=%s code=%d reason=%s", peer.sid, peer.client_id,
                    refusal.code, refusal.reason)
        peer.link.close(refusal.code, refusal.reason)
        await self.close_peer(peer, f"close code={refusal.code} reason={refusal.reason!r}")

    async def close_peer(self, peer: Peer, why: str = "") -> None:
        if peer.sid not in self.presence.peers:
            return
        self.guard.closed(peer)
        channels = len(peer.channels)
        if self.tracing.enabled:
            with self.tracing.span("prscd.disconnect", SERVER, self._peer_attrs(peer)):
                await self._execute(self.presence.disconnect(peer))
        else:
            await self._execute(self.presence.disconnect(peer))
        log.info("peer closed sid=%s id=%s channels=%d %s", peer.sid, peer.client_id, channels, why)

    def count_drop(self, reason: str, n: int = 1) -> None:
        self.presence.dropped[reason] += n

    # -- carrying out actions ------------------------------------------------

    def _deliver(self, action: Deliver) -> None:
        frame = action.frame
        sent = 0
        for peer in action.peers:
            if peer.link.send(frame):
                sent += 1
        self.delivered += sent
        if sent != len(action.peers):
            self.count_drop("undeliverable", len(action.peers) - sent)

    async def _execute(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Deliver):
                self._deliver(action)
            elif isinstance(action, Publish):
                if self.tracing.enabled:
                    await self._publish_traced(action)
                else:
                    await self.source.publish(action.sig)
            elif isinstance(action, Interest):
                self.stream_function.interest(action.app, action.channel, action.active)
                if action.active:
                    # The bus has our interest before the joiner gets its ack, so the
                    # answers to its peer_online from other nodes cannot miss us.
                    await self.stream_function.settled()

    def _on_mesh_event(self, event: MeshEvent) -> None:
        if event.tag == TAG_PEER:
            self.liveness.seen(event.node)
        if event.sig.op == protocol.PEER_ONLINE:
            self.guard.online(event.sig.app, event.sig.c)
        if self.tracing.enabled:
            self._dispatch_traced(event)
            return
        for action in self.presence.dispatch_remote(event.sig, event.node):
            if isinstance(action, Deliver):
                self._deliver(action)

    def _on_node_down(self, node: str, why: str) -> None:
        """Another node died or left: its members go offline for our peers."""
        with self.tracing.span("liveness.node_down", attributes={
                "prscd.dead_node_id": node, "prscd.reason": why}) as span:
            actions = self.presence.node_down(node)
            for action in actions:
                if isinstance(action, Deliver):
                    self._deliver(action)
            span.set_attribute("prscd.delivered", _count(actions))

    # -- tracing: one trace per message, across nodes (mesh/tracing.py) ------

    # The hop's identity (transport, peer, app, channel, op) is on the root span of each
    # node; children carry only what is theirs: every attribute costs at 100% sampling.

    def _peer_attrs(self, peer: Peer) -> dict[str, Any]:
        return {"prscd.transport": peer.transport, "prscd.peer.id": peer.client_id,
                "prscd.app": peer.app}

    async def _receive_traced(self, peer: Peer, sig: protocol.Signalling, size: int) -> None:
        attrs = {"prscd.transport": peer.transport, "prscd.peer.id": peer.client_id,
                 "prscd.app": peer.app, "prscd.channel": sig.c,
                 "prscd.op": sig.op or sig.t, "prscd.bytes": size}
        with self.tracing.span("prscd.receive", SERVER, attrs):
            with self.tracing.span("presence.handle") as span:
                actions = self.presence.handle(peer, sig)
                span.set_attribute("prscd.delivered", _count(actions))
            await self._execute(actions)

    async def _publish_traced(self, action: Publish) -> None:
        sig = action.sig
        subject = event_subject(sig.app or "", sig.c, TAG_PEER, self.settings.mesh_id,
                                self.node_id)
        attrs = {"messaging.system": self.bus.kind, "messaging.operation": "publish",
                 "messaging.destination.name": subject}
        with self.tracing.span("source.publish", PRODUCER, attrs):
            await self.source.publish(sig, headers=self.tracing.inject())

    def _dispatch_traced(self, event: MeshEvent) -> None:
        sig = event.sig
        attrs = {"messaging.system": self.bus.kind, "messaging.operation": "receive",
                 "messaging.destination.name": event.message.subject,
                 "prscd.origin.mesh_id": sig.mesh or "", "prscd.origin.node_id": event.node,
                 "prscd.tag": event.tag, "prscd.app": sig.app or "", "prscd.channel": sig.c,
                 "prscd.op": sig.op or sig.t, "prscd.peer.id": sig.p or ""}
        parent = self.tracing.extract(event.message.headers)
        with (self.tracing.span("stream_function.receive", CONSUMER, attrs, parent=parent),
              self.tracing.span("presence.dispatch") as span):
            actions = self.presence.dispatch_remote(sig, event.node)
            for action in actions:
                if isinstance(action, Deliver):
                    self._deliver(action)
            span.set_attribute("prscd.delivered", _count(actions))

    def _schedule_resync(self, why: str) -> None:
        if self._resync is None:
            self._resync = asyncio.get_running_loop().call_later(0.1, self.resync_peers, why)

    def resync_peers(self, why: str = "") -> None:
        """Ask every local peer to re-announce itself on all its channels.

        A join ack makes the real client send ``peer_online`` + ``peer_state`` for every
        channel it has on that connection, and the peers that hear it answer with their
        ``peer_state``: membership is rebuilt across nodes by the normal handshake.
        """
        self._resync = None
        n = 0
        for peer in list(self.presence.peers.values()):
            if peer.channels:
                self.guard.asked_announce(peer)
                ack = protocol.encode_join_ack(min(peer.channels), self.settings.mesh_id)
                n += int(peer.link.send(ack))
        log.info("resync: %d peers asked to re-announce (%s)", n, why)

    # -- state for /health, /ready, /metrics and dumps -----------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.bus.up:
            return False, f"bus {self.bus.state}"
        return True, "ok"

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
            "service": "prscd",
            "version": __version__,
            "mesh_id": self.settings.mesh_id,
            "node_id": self.node_id,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "peers": len(self.presence.peers),
            "channels": self.presence.channel_count(),
            "realms": len(self.presence.realms),
            "bus": {"kind": self.bus.kind, "state": self.bus.state},
            "mesh": self.liveness.summary(),
            "dropped": dict(self.presence.dropped),
        }

    def stats(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "rss_kib": _rss_kib(),
            "max_rss_kib": usage.ru_maxrss,
            "gc_counts": gc.get_count(),
            "gc_collections": [g["collections"] for g in gc.get_stats()],
            "tasks": len(asyncio.all_tasks()),
            "connections": len(self.presence.peers),
            "handled": self.presence.handled,
            "delivered": self.delivered,
            "published": self.source.published,
            "publish_failed": self.source.failed,
            "mesh_received": self.stream_function.received,
            "dropped": dict(self.presence.dropped),
        }

    def metrics_text(self) -> str:
        lines = [
            f"prscd_peers {len(self.presence.peers)}",
            f"prscd_channels {self.presence.channel_count()}",
            f"prscd_frames_handled_total {self.presence.handled}",
            f"prscd_frames_delivered_total {self.delivered}",
            f"prscd_mesh_published_total {self.source.published}",
            f"prscd_mesh_publish_failed_total {self.source.failed}",
            f"prscd_mesh_received_total {self.stream_function.received}",
            f"prscd_bus_up {int(self.bus.up)}",
        ]
        lines += [f'prscd_dropped_total{{reason="{r}"}} {n}'
                  for r, n in sorted(self.presence.dropped.items())]
        return "\n".join(lines) + "\n"

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        from node.tls import server_context
        from node.transports.websocket import WebSocketTransport

        await self.bus.connect()
        await self.liveness.start()
        ssl = server_context(self.cert) if (self.settings.tls and self.cert) else None
        ws = WebSocketTransport(self)
        self.addresses = await ws.start(self.settings.host, self.settings.port, ssl)
        self.transports.append(ws)
        self.port = self.addresses[0][1]
        if self.settings.webtransport and ssl is not None and self.cert is not None:
            # HTTP/3 needs TLS; it shares the port number (UDP) with the WebSocket server.
            from node.transports.webtransport import WebTransportTransport

            wt = WebTransportTransport(self)
            self.addresses += await wt.start(self.settings.host, self.port, self.cert)
            self.transports.append(wt)
        log.info("node ready node_id=%s mesh_id=%s port=%d tls=%s bus=%s",
                 self.node_id, self.settings.mesh_id, self.port, ssl is not None, self.bus.kind)

    def begin_drain(self) -> None:
        """Fail /ready and refuse new peers at once; existing peers are still served."""
        if not self.draining:
            self.draining = True
            log.info("draining peers=%d: /ready answers 503", len(self.presence.peers))

    async def stop(self) -> None:
        """Stop accepting, close peers with 1001 (their offline events go out), leave the bus."""
        self.draining = True
        for transport in self.transports:
            await transport.close()
        for peer in list(self.presence.peers.values()):
            await self.close_peer(peer, "node stopping")
        await self.liveness.stop()
        await self.stream_function.close()
        await self.bus.close()
        await self.tracing.aclose()
        log.info("node stopped node_id=%s", self.node_id)


def _count(actions: list[Any]) -> int:
    """Peers the actions deliver to (a span attribute)."""
    return sum(len(a.peers) for a in actions if isinstance(a, Deliver))


def _rss_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024
    except OSError:
        return 0
