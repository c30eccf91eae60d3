"""The node: carries out what the rules return, for local peers and for the mesh.

Transports reach it through :class:`node.ports.Peers` (admit, open, receive, fault,
backlog, closed); the endpoints through :class:`node.ports.Status`. Everything a frame
causes comes back from the rules (:mod:`node.protocol`, :mod:`node.limits`,
:mod:`node.presence`) as actions, carried out in one pass by :meth:`Node._execute`:
deliver bytes to local peers' links, publish to the mesh, change bus interest, close a
peer. The node keeps the sid -> link map; the rules never see a transport. Tracing wraps
this path (:mod:`node.hops`); it does not fork it. :mod:`node.app` builds and wires it.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import resource
import time
from collections import Counter
from http import HTTPStatus
from time import perf_counter
from typing import TYPE_CHECKING, Any

from mesh.bridge import TAG_BACKEND, TAG_PEER, MeshEvent, Source, StreamFunction
from mesh.bus import Bus
from mesh.liveness import Liveness
from mesh.tracing import Tracing
from node import __version__, answers, protocol
from node.auth import Auth, AuthError, AuthUnavailable
from node.config import Settings
from node.grace import Grace
from node.hops import Hops
from node.limits import Guard
from node.metrics import FRAME_SAMPLE, NodeMetrics, close_code
from node.ports import Admission, Link
from node.presence import (
    Action,
    Close,
    Deliver,
    Hold,
    Interest,
    Member,
    Peer,
    Presence,
    Publish,
    Returned,
)
from node.protocol import Fault, ProtocolError, Signalling
from node.silence import Silence
from node.tls import CertInfo

if TYPE_CHECKING:
    from mesh.query import MeshQuery
    from node.admin import AdminView
    from node.webhooks import Webhooks

log = logging.getLogger("prscd.node")


class Node:
    def __init__(self, settings: Settings, *, node_id: str, bus: Bus, tracing: Tracing,
                 auth: Auth, cert: CertInfo | None = None) -> None:
        self.settings = settings
        self.cert = cert
        self.node_id = node_id
        self.bus = bus
        self.tracing = tracing
        self.auth = auth
        self.hops = Hops(tracing, bus_kind=bus.kind, mesh_id=settings.mesh_id, node_id=node_id,
                         data_ratio=settings.trace_data_ratio)
        self.presence = Presence(settings.mesh_id, dedupe_state=settings.dedupe_peer_state)
        self.guard = Guard(settings, self.presence)
        #: Connections in their handshake, per transport (counted toward MAX_CONNECTIONS).
        self.handshakes: Counter[str] = Counter()
        #: sid -> the transport's link to that peer; a peer is open while it is here.
        self.links: dict[str, Link] = {}
        self.source = Source(bus, settings.mesh_id, node_id, settings.sndr_name)
        self.stream_function = StreamFunction(bus, node_id, settings.rcvr_name,
                                              self._on_mesh_event)
        self.liveness = Liveness(
            bus, node_id, settings.mesh_id,
            interval=settings.heartbeat_interval, timeout=settings.node_timeout,
            public_url=settings.public_url,
            stats=lambda: {"peers": len(self.links),
                           "channels": self.presence.channel_count(),
                           "ready": self.readiness()[0], "version": __version__},
            on_down=self._on_node_down, on_resync=self._schedule_resync,
        )
        self._resync: asyncio.TimerHandle | None = None
        #: The mesh-wide questions (mesh/query.py), set by answer_queries.
        self.query: MeshQuery | None = None
        self._checks: set[asyncio.Task[None]] = set()
        #: (sid, channel) -> a vanished peer held there until PRESENCE_GRACE ends (the
        #: same mechanism as the webhooks' hold: node/grace.py).
        self.grace: Grace[tuple[str, str], Peer] = Grace(settings.presence_grace,
                                                         self._grace_over)
        self.grace_counts = {"held": 0, "returned": 0, "released": 0,
                             "silent": 0, "heard": 0, "rejoined": 0}
        #: Peers past the soft keepalive timeout, connection still open (node/silence.py).
        self.silence = Silence(self)
        self._sids = itertools.count(1)
        #: Offline events of peers closed from a callback (a backlog, a fault).
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_at = time.monotonic()
        self.draining = False
        #: Set whenever the last local peer is gone: a drain need not wait its full time.
        self._no_peers = asyncio.Event()
        self.delivered = 0
        #: Membership webhooks (node/webhooks.py), set by node/app.py when WEBHOOK_URL is.
        self.webhooks: Webhooks | None = None
        #: The operations page's data (node/admin.py), set by node/app.py.
        self.admin: AdminView | None = None
        #: /metrics (node/metrics.py): read at scrape time; histograms unless METRICS=false.
        self.metrics = NodeMetrics(self, histograms=settings.metrics)
        # Timed on a real bus only: the embedded bus's publish is a local function call.
        if self.metrics.publish is not None and bus.kind != "embedded":
            self.source.timer, self.source.sample = self.metrics.publish.observe, FRAME_SAMPLE
        self._timed = settings.metrics  # frames go through the histograms
        self._tick = 0

    @property
    def mesh_id(self) -> str:
        return self.settings.mesh_id

    # -- Peers: what transports call ------------------------------------------

    async def admit(self, query: str, transport: str) -> Admission:
        params = protocol.parse_query(query)
        publickey, raw_id = params.get("publickey", ""), params.get("id", "")
        if not publickey:
            return Admission(HTTPStatus.UNAUTHORIZED, "missing publickey")
        if not raw_id:
            return Admission(HTTPStatus.UNAUTHORIZED, "missing id")
        try:
            client_id = protocol.check_client_id(raw_id)
        except ProtocolError as exc:
            return Admission(HTTPStatus.BAD_REQUEST, f"bad id: {exc}")
        if not publickey.isascii() and not protocol.is_utf8(publickey):
            return Admission(HTTPStatus.BAD_REQUEST, "publickey is not valid UTF-8")
        if self.draining:
            return Admission(HTTPStatus.SERVICE_UNAVAILABLE, "node is draining")
        # Peers only: half-open connections are bounded at their accept, the oldest closed
        # for a newcomer (node/transports/handshakes.py), so they never keep a peer out.
        if full := self.guard.admit():
            self.count_drop("connection_limit")
            return Admission(HTTPStatus.SERVICE_UNAVAILABLE, full)
        try:
            grant = await self.auth.grant(publickey, client_id)
        except AuthError as exc:  # 403, or 401 for an expired token (AuthExpired)
            self.metrics.auth["expired" if exc.status == HTTPStatus.UNAUTHORIZED
                              else "denied"] += 1
            log.info("rejected transport=%s id=%s status=%d reason=%s", transport, client_id,
                     exc.status, exc)
            return Admission(exc.status, exc.answer)
        except AuthUnavailable as exc:
            self.count_drop("auth_unavailable")
            self.metrics.auth["unavailable"] += 1
            return Admission(HTTPStatus.SERVICE_UNAVAILABLE, exc.answer)
        self.metrics.auth["ok"] += 1
        return Admission(HTTPStatus.SWITCHING_PROTOCOLS, "", client_id, grant.app,
                         grant.channels)

    def open(self, admission: Admission, transport: str, link: Link) -> Peer:
        peer = Peer(sid=f"{next(self._sids):x}", client_id=admission.client_id,
                    app=admission.app, transport=transport,
                    allowed_channels=admission.channels)
        self.links[peer.sid] = link
        self.metrics.opened[transport] += 1
        self.presence.connect(peer)
        self.guard.opened(peer, time.monotonic())
        log.info("peer open sid=%s id=%s app=%s transport=%s",
                 peer.sid, peer.client_id, peer.app, transport)
        return peer

    async def receive(self, peer: Peer, frame: bytes) -> None:
        # Metrics on: one frame in FRAME_SAMPLE is timed, and every join (node/metrics.py).
        self._tick = tick = (self._tick + 1) % FRAME_SAMPLE
        started = perf_counter() if self._timed and not tick else 0.0
        if peer.sid not in self.links:
            self.count_drop("after_close")  # closed already; the connection is closing
            return
        if peer.silent:  # any frame: it is back (node/silence.py)
            await self.silence.heard(peer)
        # The cost model (SECURITY.md): the head (t, op, c) is read at a bounded cost, the
        # rate is charged, a frame for a channel not joined is dropped, and only then is
        # the payload decoded (itself bounded by protocol.MAX_PAYLOAD_ITEMS).
        try:
            sig = protocol.decode_head(frame)
        except ProtocolError as exc:
            await self._execute([Close(peer, exc.fault, str(exc))])
            return
        verdict = self.guard.check(peer, sig, time.monotonic())
        if verdict:
            if isinstance(verdict, Close):
                await self._execute([verdict])
            else:
                self.count_drop("rate_limited")
            return
        if sig.op != protocol.CHANNEL_JOIN and sig.c not in peer.channels:
            self.count_drop("not_joined")
            return
        try:
            protocol.check_payload(sig)
        except ProtocolError as exc:
            await self._execute([Close(peer, exc.fault, str(exc))])
            return
        if self.settings.debug:
            log.debug("frame sid=%s id=%s t=%s op=%s c=%r bytes=%d",
                      peer.sid, peer.client_id, sig.t, sig.op, sig.c, len(frame))
        if self._timed and not started and sig.op == protocol.CHANNEL_JOIN:
            started = perf_counter()  # join-to-ack, from the head read
        with self.hops.receive(peer, sig, len(frame)):
            await self._execute(self.hops.handle(self.presence.handle, peer, sig))
        if started:
            self.metrics.handled(sig, perf_counter() - started, sampled=not tick)

    def fault(self, peer: Peer, fault: Fault, reason: str) -> None:
        self._close_soon(Close(peer, fault, reason))

    def backlog(self, peer: Peer, queued: int) -> None:
        close = self.guard.backlog(peer, queued)
        if close is not None:
            self._close_soon(close)

    async def closed(self, peer: Peer, why: str, *, vanished: bool = False,
                     code: int | None = None) -> None:
        if self.links.pop(peer.sid, None) is not None:  # else closed by the node already
            self.metrics.closed[peer.transport, close_code(code)] += 1
            if not self.links:
                self._no_peers.set()
            await self._offline(peer, self._leave(peer, why, vanished=vanished))

    def count_drop(self, reason: str, n: int = 1) -> None:
        self.presence.dropped[reason] += n

    def count_http(self, status: int) -> None:
        self.metrics.http[status] += 1

    def handshaking(self, transport: str, delta: int) -> None:
        self.handshakes[transport] += delta

    def connections(self) -> int:
        return len(self.presence.peers) + sum(self.handshakes.values())

    def ping_rtt(self, peer: Peer, seconds: float) -> None:
        self.metrics.ping_rtt(peer.transport, seconds)

    def silent(self, peer: Peer) -> None:
        self._spawn(self.silence.silent(peer))

    def heard(self, peer: Peer) -> None:
        if peer.silent:
            self._spawn(self.silence.heard(peer))

    # -- the server API (node/api.py) ------------------------------------------

    def answer_queries(self, query: MeshQuery) -> None:
        """Answer the mesh-wide questions of the server API about our local peers; ask
        them of the others when a channel is new here (:meth:`_check_new_channel`)."""
        answers.register(query, self.presence, self.mesh_id)
        self.query = query

    async def _check_new_channel(self, app: str, name: str) -> None:
        """A channel new on this node: after a heartbeat's time, ask the other nodes who
        is in it; if one lists a member we never heard of, ask our peers there to
        re-announce (once). Why: the answers to our first peer's ``peer_online`` can be
        dropped by another region's NATS server that has not yet heard of our new
        subscription (it travels on the other gateway connection of the pair, and can be
        overtaken: docs/geo.md); nothing in the protocol would ever ask again."""
        await asyncio.sleep(self.settings.heartbeat_interval)
        realm = self.presence.realms.get(app)
        channel = realm.channels.get(name) if realm else None
        if channel is None or not channel.peers or self.query is None or self.draining:
            return
        try:
            gathered = await self.query.ask(answers.MEMBERS, {"app": app, "channel": name})
        except Exception as exc:  # QueryBusy, the bus down: the check is best effort
            self.count_drop("channel_check_skipped")
            log.debug("new channel check skipped app=%s channel=%r: %s", app, name, exc)
            return
        known = set(channel.remote.values())
        missing = {cid for node, answer in answers.usable(gathered) if node != self.node_id
                   for cid in answer.get("ids", ()) if cid not in known}
        assert realm is not None  # the channel was found in it
        if not missing or name not in realm.channels:
            return
        self.count_drop("mesh_answers_missed")
        # INFO, not WARNING: repaired here, and expected under churn (a member that joined
        # elsewhere a moment ago is listed before its peer_online arrives); a rate that
        # keeps rising shows in prscd_dropped_total{reason="mesh_answers_missed"}.
        log.info("new channel app=%s channel=%r: %d member(s) on other nodes never reached "
                    "us (their answers raced our subscription): asking %d local peer(s) to "
                    "re-announce", app, name, len(missing), len(channel.peers))
        ack = protocol.encode_join_ack(name, self.mesh_id)
        for peer in list(channel.peers.values()):
            if (link := self.links.get(peer.sid)) is not None:
                self.guard.asked_announce(peer)
                link.send(ack)

    async def push(self, sig: Signalling) -> int:
        """Backend data (tag 0x21, see mesh/backend.py) into a channel: our peers get it
        here, the other nodes through the Source. Our StreamFunction drops our own node
        id's messages, so nobody gets it twice. Returns the local deliveries."""
        sent = 0
        realm = self.presence.realms.get(sig.app or "")
        if realm is not None and sig.c in realm.channels:
            sent = await self._execute(self.presence.dispatch_remote(sig, self.node_id))
        await self.source.publish(sig, TAG_BACKEND)
        return sent

    # -- carrying out actions ------------------------------------------------

    async def _execute(self, actions: list[Action]) -> int:
        """Carry out the rules' actions in order; returns how many deliveries went out."""
        sent = 0
        for action in actions:
            if isinstance(action, Deliver):
                sent += self._deliver(action)
            elif isinstance(action, Publish):
                with self.hops.publish(action.sig) as headers:
                    await self.source.publish(action.sig, headers=headers)
            elif isinstance(action, Interest):
                self.stream_function.interest(action.app, action.channel, action.active)
                if self.webhooks is not None:
                    self.webhooks.channel(action.app, action.channel, action.active)
                if action.active:
                    # Our server has our interest before the joiner gets its ack, so the
                    # answers to its peer_online cannot miss us there; other regions'
                    # servers may still: checked once a heartbeat later.
                    await self.stream_function.settled()
                    if self.query is not None and self.liveness.nodes:
                        check = asyncio.get_running_loop().create_task(
                            self._check_new_channel(action.app, action.channel))
                        self._checks.add(check)  # cancelled at stop, never waited for
                        check.add_done_callback(self._checks.discard)
            elif isinstance(action, Member):
                if self.webhooks is not None:  # queued: never awaits
                    self.webhooks.member(action)
            elif isinstance(action, Hold):
                self._hold(action.peer)
            elif isinstance(action, Returned):
                if self.grace.cancel((action.peer.sid, action.channel)):
                    self.grace_counts["returned"] += 1
                    log.info("peer back within the grace period sid=%s id=%s channel=%r: "
                             "no offline", action.peer.sid, action.peer.client_id,
                             action.channel)
            elif isinstance(action, Close) and (offline := self._shut(action)) is not None:
                await self._offline(action.peer, offline)
        return sent

    def _deliver(self, action: Deliver) -> int:
        frame, links = action.frame, self.links
        sent = 0
        for peer in action.peers:
            link = links.get(peer.sid)
            if link is not None and link.send(frame):
                sent += 1
        self.delivered += sent
        if sent != len(action.peers):
            self.count_drop("undeliverable", len(action.peers) - sent)
        return sent

    def _shut(self, close: Close) -> list[Action] | None:
        """Count, log and close the link, and take the peer out of the rules' state, now;
        returns its offline events (None when the peer is closed already)."""
        peer = close.peer
        link = self.links.pop(peer.sid, None)
        if link is None:
            return None
        if not self.links:
            self._no_peers.set()
        self.count_drop(close.fault.counter)
        self.metrics.closed[peer.transport, str(close.fault.code)] += 1
        log.warning("closing sid=%s id=%s transport=%s code=%d reason=%s", peer.sid,
                    peer.client_id, peer.transport, close.fault.code, close.reason)
        link.close(close.fault.code, close.reason)
        return self._leave(peer, f"close code={close.fault.code} reason={close.reason!r}",
                           vanished=close.fault is Fault.PING_TIMEOUT)

    def _close_soon(self, close: Close) -> None:
        """From a transport callback: closed now, its offline events next."""
        if (offline := self._shut(close)) is not None:
            self._spawn(self._offline(close.peer, offline))

    def _leave(self, peer: Peer, why: str, *, vanished: bool = False) -> list[Action]:
        """The peer is out of every channel from now on; returns its offline events. A
        peer that ``vanished`` (no close, no FIN: a keepalive or idle timeout) is held in
        its channels for PRESENCE_GRACE instead: back in time, nobody saw it go."""
        self.guard.closed(peer)
        log.info("peer closed sid=%s id=%s channels=%d %s", peer.sid, peer.client_id,
                 len(peer.channels), why)
        if peer.silent:  # held already: its grace timers decide (node/silence.py)
            return self.silence.closed(peer)
        if vanished and self.grace.seconds > 0 and not self.draining:
            return self.presence.hold(peer)
        return self.presence.disconnect(peer)

    def _hold(self, peer: Peer) -> None:
        self.grace_counts["held"] += 1
        log.info("peer vanished sid=%s id=%s: held in %d channel(s) for %gs (PRESENCE_GRACE)",
                 peer.sid, peer.client_id, len(peer.channels), self.grace.seconds)
        for name in sorted(peer.channels):  # (a copy: PRESENCE_GRACE=0 releases at once)
            self.grace.hold((peer.sid, name), peer)

    def _grace_over(self, key: tuple[str, str], peer: Peer) -> None:
        actions = self.presence.release(peer, key[1])
        if actions:
            self.grace_counts["released"] += 1
            self._spawn(self._offline(peer, actions))

    async def _offline(self, peer: Peer, actions: list[Action]) -> None:
        with self.hops.disconnect(peer, actions):
            await self._execute(actions)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_mesh_event(self, event: MeshEvent) -> None:
        if event.tag == TAG_PEER:
            self.liveness.seen(event.node)
        sig = event.sig
        if sig.op == protocol.PEER_ONLINE:
            self.guard.online(sig.app, sig.c)
        with self.hops.dispatch(event) as span:
            sent = await self._execute(self.presence.dispatch_remote(sig, event.node))
            span.set_attribute("prscd.delivered", sent)
        self.metrics.mesh_delivered(sig.mesh or "backend", event.sent_at)

    def _on_node_down(self, node: str, why: str) -> None:
        """Another node died or left: its members go offline for our peers."""
        self._spawn(self._node_down(node, why))

    async def _node_down(self, node: str, why: str) -> None:
        with self.hops.node_down(node, why) as span:
            sent = await self._execute(self.presence.node_down(node))
            span.set_attribute("prscd.delivered", sent)

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
            link = self.links.get(peer.sid)
            if peer.channels and link is not None:
                self.guard.asked_announce(peer)
                n += int(link.send(protocol.encode_join_ack(min(peer.channels), self.mesh_id)))
        log.info("resync: %d peers asked to re-announce (%s)", n, why)

    # -- Status: what /health, /ready, /metrics and dumps read ----------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.bus.up:
            return False, f"bus {self.bus.state}"
        return True, "ok"

    def directory(self) -> list[dict[str, Any]]:
        return self.liveness.directory()

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
            "service": "prscd",
            "version": __version__,
            "mesh_id": self.mesh_id,
            "node_id": self.node_id,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "peers": len(self.links),
            "handshakes": dict(self.handshakes),
            "channels": self.presence.channel_count(),
            "realms": len(self.presence.realms),
            "bus": {"kind": self.bus.kind, "state": self.bus.state, **self.bus.where()},
            "mesh": self.liveness.summary(),
            "dropped": dict(self.presence.dropped),
            # Vanished and silent peers by outcome (docs/presence.md).
            "presence_grace": dict(self.grace_counts),
        }

    def stats(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "rss_kib": _rss_kib(),
            "max_rss_kib": usage.ru_maxrss,
            "gc_counts": gc.get_count(),
            "gc_collections": [g["collections"] for g in gc.get_stats()],
            "tasks": len(asyncio.all_tasks()),
            "connections": len(self.links),
            "handled": self.presence.handled,
            "delivered": self.delivered,
            "published": self.source.published,
            "publish_failed": self.source.failed,
            "mesh_received": self.stream_function.received,
            "dropped": dict(self.presence.dropped),
            **({"webhooks": self.webhooks.stats()} if self.webhooks is not None else {}),
        }

    def metrics_text(self) -> str:
        """The Prometheus text of this node's registry (node/metrics.py, docs/metrics.md)."""
        return self.metrics.text().decode()

    # -- lifecycle (node/app.py calls these in order) -------------------------

    async def start(self) -> None:
        """Join the mesh (the bus is connected): heartbeats and node liveness."""
        await self.liveness.start()

    def begin_drain(self) -> None:
        """Fail /ready and refuse new peers at once; existing peers are still served."""
        if not self.draining:
            self.draining = True
            log.info("draining peers=%d: /ready answers 503", len(self.links))

    async def no_peers_left(self) -> None:
        """Returns once no local peer is connected (at once when none is)."""
        while self.links:
            self._no_peers.clear()
            await self._no_peers.wait()

    async def stop(self) -> None:
        """After the listeners closed: the peers left go offline, then leave the mesh."""
        self.draining = True
        for peer in list(self.presence.peers.values()):
            await self.closed(peer, "node stopping")
        self.grace.flush()  # nobody comes back to a stopping node: offline now
        for check in list(self._checks):
            check.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.liveness.stop()
        await self.stream_function.close()


def _rss_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024
    except OSError:
        return 0
