"""WebTransport adapter (aioquic HTTP/3): UDP on the WebSocket server's port number.

One QUIC connection (:class:`H3Protocol`) may carry several sessions; each session
(:mod:`node.transports.wt_session`) is one peer. This module is the glue: sockets,
QUIC configuration, the extended CONNECT (same admission as WebSocket), plain GETs
(a browser told ``--origin-to-force-quic-on`` fetches the demo pages over HTTP/3
too), keepalive pings, and routing QUIC/H3 events to sessions.

Traps handled here (docs/webtransport.md): without ``enable_webtransport`` Chromium
never sends the CONNECT, without ``max_datagram_frame_size`` datagrams silently
never arrive; the 200 is transmitted alone (Chromium dropped a datagram sharing its
packet); stream resets and connection loss produce no H3 event, so QUIC
``StreamReset``/``ConnectionTerminated`` are watched directly; Chromium never closes
an idle connection and a killed browser sends nothing, so the server pings (every
``WT_PING_INTERVAL``) and the idle timeout (``WT_IDLE_TIMEOUT``) ends the peer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import Counter
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import size_uint_var
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import (
    DatagramReceived,
    DataReceived,
    H3Event,
    HeadersReceived,
    WebTransportStreamDataReceived,
)
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    ProtocolNegotiated,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet_builder import PACKET_NUMBER_SEND_SIZE

from node import __version__, endpoints
from node.config import Settings
from node.ports import Peers, Status
from node.protocol import CLOSE_GOING_AWAY, split_target
from node.silence import after_reads, loop_lag
from node.tls import chromium_command, public_origin
from node.transports.h3frames import FrameLengths, UniStreams
from node.transports.handshakes import Handshakes
from node.transports.quic_turn import (
    SlimH3Connection,
    TurnFlusher,
    after_handshake,
    nothing_to_send,
    slim_connection,
    slim_protocol,
)
from node.transports.wt_session import WebTransportSession

if TYPE_CHECKING:
    from node.tls import CertInfo

log = logging.getLogger("prscd.wt")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})
#: How long close() waits for the close capsules to be acknowledged.
CLOSE_GRACE = 0.5
#: HTTP/3's "no error" application code, for connections the node ends on purpose.
H3_NO_ERROR = 0x100
#: Asked for the QUIC sockets' receive buffer (the kernel caps it at net.core.rmem_max).
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
#: AEAD tag of every 1-RTT packet (all QUIC v1 cipher suites use 16 bytes).
AEAD_TAG_SIZE = 16
#: How long a connection whose session the node closed (a fault) has for the close capsule
#: before its CONNECTION_CLOSE; meanwhile its packets are not read (as WebSocket's FLOOD_GRACE).
FAULT_GRACE = 2.0


def check_connect(headers: dict[bytes, bytes]) -> tuple[int, str, str]:
    """Validate an extended CONNECT (draft-02, as Chromium sends it).

    Returns (0, "", query) when it may go to admission, else (status, reason, "").
    """
    protocol = headers.get(b":protocol")
    if protocol != b"webtransport":
        shown = protocol.decode(errors="replace")[:40] if protocol else "none"
        return HTTPStatus.BAD_REQUEST, f"unsupported :protocol {shown!r}: use webtransport", ""
    scheme = headers.get(b":scheme", b"").decode(errors="replace")[:40]
    if scheme != "https":
        return HTTPStatus.BAD_REQUEST, f"unsupported :scheme {scheme!r}: use https", ""
    path, query = split_target(headers.get(b":path", b"").decode(errors="replace"))
    if path != "/v1":
        return HTTPStatus.NOT_FOUND, f"no WebTransport endpoint at {path[:100]}", ""
    return 0, "", query


def datagram_room(quic: QuicConnection, session_id: int) -> int:
    """The largest HTTP/3 datagram payload that fits one packet of this connection.

    The same arithmetic as aioquic's packet builder: its datagram size (1200 unless
    configured) minus the short header (1 byte, the peer's connection id, the packet
    number), the AEAD tag, the DATAGRAM frame's type and length, and the
    quarter-stream-id. With 8-byte connection ids that is 1169, the largest payload
    that reached Chromium (docs/webtransport.md). The peer's max_datagram_frame_size caps it.
    """
    overhead = 1 + len(quic._peer_cid.cid) + PACKET_NUMBER_SEND_SIZE + AEAD_TAG_SIZE + 1
    room = quic._max_datagram_size - overhead
    room -= size_uint_var(room)
    remote = quic._remote_max_datagram_frame_size
    if remote is not None:
        room = min(room, remote - 1 - size_uint_var(remote))
    return room - size_uint_var(session_id // 4)


class H3Protocol(QuicConnectionProtocol):
    """One QUIC connection: HTTP/3 requests, WebTransport sessions, keepalive; and the
    :class:`~node.transports.wt_session.SessionIO` of its sessions."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *,
                 server: WebTransportListener) -> None:
        super().__init__(quic, stream_handler)
        slim_connection(quic)  # before its first packet (node/transports/quic_turn.py)
        self.server = server
        self.settings = server.settings
        self.peers = server.peers
        self.quic = quic
        self.h3: H3Connection = None  # type: ignore[assignment]  # set on ProtocolNegotiated
        self.sessions: dict[int, WebTransportSession] = {}
        self.terminated = False
        self._ping_handle: asyncio.TimerHandle | None = None
        self._transmit_scheduled = False
        self._handshake_buffers = True  # aioquic's INITIAL/HANDSHAKE crypto buffers kept
        self._received_at = self._loop.time()  # the last packet from the peer
        #: Our last PING, and the first one the peer has not answered yet (<= _received_at:
        #: none outstanding); silent: none answered within WT_SILENT_TIMEOUT (node/silence.py).
        self._pinged_at = self._probe_at = 0.0
        self._silent = self._confirming = False
        self._room: tuple[int, int, int] = (-1, -1, 0)  # (cid length, datagram size, room)
        self._last_request = -1
        #: Handshake deadline: a connection that never opens a session (or stops
        #: asking for anything) within HANDSHAKE_TIMEOUT is closed.
        self._admitting = 0
        self._ever_session = False
        self._active_at = self._born = self._loop.time()
        self._deadline: asyncio.TimerHandle | None = self._loop.call_later(
            self.settings.handshake_timeout, self._handshake_deadline)
        server.connections.add(self)
        # Issue 15: frame lengths checked before aioquic buffers a frame; counted as a
        # handshake toward MAX_CONNECTIONS until it has a session (node/ports.py).
        self._frames = FrameLengths(min(self.settings.http_max_line
                                        * self.settings.http_max_headers, 64 * 1024))
        self._uni = UniStreams()  # control and QPACK encoder streams: the same, their limits
        # (Past MAX_HANDSHAKES, or past what MAX_CONNECTIONS leaves, the node's oldest
        # half-open connection is closed: node/transports/handshakes.py.)
        server.handshakes.began(self)
        server.handshakes.closable(self, self._evicted)

    # -- SessionIO: what sessions use --------------------------------------------

    def datagram_room(self, session_id: int) -> int:
        # Recomputed only when the peer's connection id length or the packet size changes.
        quic = self.quic
        cid_len, size, room = self._room
        if cid_len != len(quic._peer_cid.cid) or size != quic._max_datagram_size:
            room = datagram_room(quic, 0)
            self._room = (len(quic._peer_cid.cid), quic._max_datagram_size, room)
        return room + 1 - size_uint_var(session_id // 4)

    def datagrams_pending(self) -> int:
        return len(self.quic._datagrams_pending)

    def bytes_pending(self, stream_id: int | None) -> int:
        queued = sum(map(len, self.quic._datagrams_pending))
        return queued + (self.unacked(stream_id) if stream_id is not None else 0)

    def send_datagram(self, session_id: int, data: bytes) -> None:
        self.h3.send_datagram(session_id, data)

    def open_stream(self, session_id: int) -> int:
        # Unidirectional only: aioquic does not mark a server-opened bidirectional stream
        # as WebTransport, and the peer's reply then kills the connection.
        return self.h3.create_webtransport_stream(session_id, is_unidirectional=True)

    def send_stream(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.quic.send_stream_data(stream_id, data, end)

    def reset_stream(self, stream_id: int) -> None:
        self.quic.reset_stream(stream_id, 0)

    def send_connect(self, session_id: int, data: bytes, end: bool) -> None:
        self.h3.send_data(session_id, data, end)

    def schedule_transmit(self) -> None:
        """Coalesce the sends of one loop turn: the listener flushes each marked
        connection once, after every callback of the turn (node/transports/quic_turn.py)."""
        if not self._transmit_scheduled and not self.terminated:
            self._transmit_scheduled = True
            self.server.flusher.mark(self)

    def flush(self) -> None:
        self._transmit_scheduled = False
        if self.terminated:
            return
        if self._timer is not None and nothing_to_send(self.quic):
            self._rearm()  # mostly after an ACK: no packet to build
        else:
            self.transmit()

    def _rearm(self) -> None:
        """transmit()'s timer half. get_timer() must run: it refreshes the loss and idle
        deadlines that handle_timer() compares against. A timer armed earlier than needed
        is kept (firing early only re-checks); one needed earlier replaces it."""
        timer_at = self.quic.get_timer()
        if timer_at is None or self._timer_at is None or timer_at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if timer_at is not None:
                self._timer = self._loop.call_at(timer_at, self._handle_timer)
            self._timer_at = timer_at

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self._fault_close is not None and not self.sessions:
            return  # closed by the node for a fault: not read (closed_by_node)
        # aioquic's own transmits at once after every packet; here it waits for the end
        # of the loop turn and is skipped when there is nothing to send (an ACK).
        self._received_at = now = self._loop.time()
        if self._silent:
            self._heard()
        self.quic.receive_datagram(data, addr, now=now)  # type: ignore[arg-type]
        self._process_events()
        if self._handshake_buffers and after_handshake(self.quic):
            self._handshake_buffers = False
            slim_protocol(self)
        self.schedule_transmit()

    def unacked(self, stream_id: int) -> int:
        stream = self.quic._streams.get(stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    def finished(self, stream_id: int) -> bool:
        """Our half of the stream is done: FIN (or reset) acknowledged."""
        stream = self.quic._streams.get(stream_id)
        return stream is None or stream.sender.is_finished

    def forget(self, session_id: int) -> None:
        self.sessions.pop(session_id, None)

    #: The CONNECTION_CLOSE timer once the node closed one of its sessions. A class default:
    #: few connections ever get one, and every attribute costs each idle peer memory.
    _fault_close: asyncio.TimerHandle | None = None

    def closed_by_node(self, session_id: int) -> None:
        """A flooder went on costing the node after its capsule, its packets decrypted and
        parsed only to be dropped (2.7-3.0 s of CPU in 4 s), until an idle timeout that
        its own flood kept off. Now, once no session is left, its packets are dropped
        unread (datagram_received; a lost capsule is still sent again by aioquic's probe
        timer) and the connection is closed FAULT_GRACE later. (A stopping node reads on:
        close() waits for the capsules' acknowledgements.)"""
        if self._fault_close is None and not self.terminated and not self.server.stopping:
            self._fault_close = self._loop.call_later(FAULT_GRACE, self._close_faulted)

    def _close_faulted(self) -> None:
        """The whole connection goes, with any other session on it (one client: a browser
        opens a connection per session); its capsule had FAULT_GRACE to get there."""
        if self.terminated:
            return
        for session in list(self.sessions.values()):
            session.end("connection closed: the node closed another session on it",
                        reply="none", code=H3_NO_ERROR)
        log.debug("closing a QUIC connection %gs after the node closed its session",
                  FAULT_GRACE)
        self.quic.close(error_code=H3_NO_ERROR, reason_phrase="session closed by the node")
        self.transmit()

    # -- events ------------------------------------------------------------------

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN:
                self.h3 = SlimH3Connection(self.quic, enable_webtransport=True)
        elif isinstance(event, ConnectionTerminated):
            self._terminated(event)
            return
        if self.h3 is None:
            return
        if isinstance(event, StreamDataReceived):
            if event.stream_id % 4 == 0:
                if refused := self._frames.check(event.stream_id, event.data,
                                                 event.end_stream):
                    self._refuse_frame(refused)
                    return
            elif event.stream_id % 4 == 2:  # the client's control, QPACK and WT streams
                code, refused = self._uni.check(event.stream_id, event.data, event.end_stream)
                if code:
                    self._refuse_frame(refused, code, "h3_stream_too_large")
                    return
        for h3_event in self.h3.handle_event(event):
            try:
                self._h3_event(h3_event)
            except Exception:  # a bug here must not take the UDP socket's callback down
                log.exception("webtransport event failed: %r", type(h3_event).__name__)
        # Stream resets produce no H3 event.
        if isinstance(event, StreamReset):
            self._frames.forget(event.stream_id)
            self._uni.forget(event.stream_id)
            self._stream_reset(event.stream_id, event.error_code)
        elif isinstance(event, StopSendingReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                session.end(f"client stopped reading the session stream code={event.error_code}",
                            reply="reset", code=event.error_code)
            else:
                for session in list(self.sessions.values()):
                    session.on_stop_sending(event.stream_id)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, DatagramReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                session.on_datagram(event.data)
            else:
                self.peers.count_drop("wt_no_session")
        elif isinstance(event, WebTransportStreamDataReceived):
            session = self.sessions.get(event.session_id)
            if session is not None:
                session.on_stream_data(event.stream_id, event.data, event.stream_ended)
            elif event.data:
                self.peers.count_drop("wt_no_session")
        elif isinstance(event, DataReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                session.on_connect_data(event.data, event.stream_ended)
        elif isinstance(event, HeadersReceived) and event.stream_id > self._last_request:
            # Request streams are opened in order: a lower id is trailers or a stream
            # already answered (or a session already ended), never a new request.
            self._last_request = event.stream_id
            self._request(event.stream_id, dict(event.headers))

    def _stream_reset(self, stream_id: int, code: int) -> None:
        session = self.sessions.get(stream_id)
        if session is not None:
            session.end(f"client reset the session stream code={code}", reply="reset", code=code)
            return
        for session in list(self.sessions.values()):
            session.on_stream_reset(stream_id)

    def _terminated(self, event: ConnectionTerminated) -> None:
        self.terminated = True
        vanished = event.reason_phrase == "Idle timeout"
        code: int | None = None
        if vanished:
            why = f"idle timeout ({self.server.idle_timeout:g} s without a packet)"
        else:
            code = event.error_code
            why = f"connection closed code={code} reason={event.reason_phrase!r}"
        for session in list(self.sessions.values()):
            session.vanished = vanished
            session.end(why, reply="none", code=code)
        self.shutdown()

    def _handshake_over(self) -> None:
        self.server.handshakes.ended(self)

    def _evicted(self) -> None:
        """The oldest half-open connection, closed for a newer one (counted there)."""
        if not self.terminated:
            self.quic.close(error_code=H3_NO_ERROR,
                            reason_phrase="too many connections in their handshake")
            self.transmit()

    def _refuse_frame(self, reason: str, code: int = 0x107,  # H3_EXCESSIVE_LOAD
                      counter: str = "headers_too_large") -> None:
        """A frame declared over the limit: the connection is closed before it is buffered."""
        self.peers.count_drop(counter)
        log.info("closing a QUIC connection: %s", reason)
        self.quic.close(error_code=code, reason_phrase=reason[:100])
        self.transmit()

    def _handshake_deadline(self) -> None:
        self._deadline = None
        if self.terminated or self._ever_session:
            return
        timeout = self.settings.handshake_timeout
        idle = self._loop.time() - self._active_at
        # Busy, or served a request lately; but not for ever (a GET every second kept a
        # connection without a session open).
        young = self._loop.time() - self._born < 6 * timeout
        if self._admitting or (idle < timeout and young):
            self._deadline = self._loop.call_later(max(timeout - idle, 0.1),
                                                   self._handshake_deadline)
            return
        self.peers.count_drop("handshake_timeout")
        log.info("closing a QUIC connection without a WebTransport session after %gs",
                 timeout)
        self.quic.close(error_code=H3_NO_ERROR, reason_phrase="no WebTransport session")
        self.transmit()

    def shutdown(self) -> None:
        """Forget this connection: no more pings or timers (its socket may be closed)."""
        self.terminated = True
        self._handshake_over()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._fault_close is not None:
            self._fault_close.cancel()  # (kept: a closed connection reads nothing more)
        if self._ping_handle is not None:
            self._ping_handle.cancel()
            self._ping_handle = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.connections.discard(self)

    # -- keepalive ---------------------------------------------------------------

    def _arm_ping(self) -> None:
        interval = self.settings.wt_ping_interval
        if self._ping_handle is None and interval > 0 and not self.terminated:
            # Due one interval after the peer's last packet (or our last PING), not after
            # our last tick: a vanished peer is probed within WT_PING_INTERVAL and silent
            # WT_SILENT_TIMEOUT later (docs/presence.md), never a whole interval later still.
            when = max(self._received_at, self._pinged_at) + interval
            silent = self.settings.wt_silent_timeout
            if silent > 0 and not self._silent and self._probe_at > self._received_at:
                when = min(when, self._probe_at + silent)
            when = max(when, self._loop.time() + interval / 8)
            self._ping_handle = self._loop.call_at(when, self._ping)

    def _ping(self) -> None:
        """PING while sessions are open: a vanished peer then stops acking, goes silent
        after WT_SILENT_TIMEOUT and is closed by the idle timeout; a live one keeps the
        connection (and Chromium's side) alive."""
        self._ping_handle = None
        if self.terminated or not self.sessions:
            return
        now = self._loop.time()
        silent = self.settings.wt_silent_timeout
        if (silent > 0 and not self._silent and not self._confirming
                and self._probe_at > self._received_at and now >= self._probe_at + silent):
            self._confirming = True  # decided after the socket was read (node/silence.py)
            after_reads(self._confirm_silent, self._probe_at)
        # A packet from the peer within the interval (ACKs of a fan-out) proves it alive
        # and its own idle timer fresh: no PING needed (profiled at 6% of a fan-out).
        if now - max(self._received_at, self._pinged_at) >= self.settings.wt_ping_interval:
            self.quic.send_ping(0)
            self.transmit()
            self._pinged_at = now
            if self._probe_at <= self._received_at:
                self._probe_at = now
        self._arm_ping()
        rtt = self.quic._loss._rtt_smoothed  # QUIC's own estimate, shown in state dumps
        for session in self.sessions.values():
            if session.peer is not None and rtt:
                session.peer.rtt_ms = round(rtt * 1000, 3)
                self.peers.ping_rtt(session.peer, rtt)

    def _confirm_silent(self, probe_at: float) -> None:
        """No packet since the PING at ``probe_at``, WT_SILENT_TIMEOUT (plus the time the
        loop stalled since) ago: the sessions' peers are silent; their connection stays."""
        self._confirming = False
        if self.terminated or self._silent or self._received_at >= probe_at:
            return
        due = probe_at + self.settings.wt_silent_timeout + loop_lag().since(probe_at)
        if self._loop.time() < due:
            if self._ping_handle is not None:
                self._ping_handle.cancel()
            self._ping_handle = self._loop.call_at(due, self._ping)
            return
        self._silent = True
        for session in self.sessions.values():
            if session.peer is not None:
                self.peers.silent(session.peer)

    def _heard(self) -> None:
        self._silent = False
        for session in self.sessions.values():
            if session.peer is not None:
                self.peers.heard(session.peer)

    # -- requests ----------------------------------------------------------------

    def _respond(self, stream_id: int, status: int, body: bytes = b"",
                 content_type: str = "text/plain; charset=utf-8",
                 extra: dict[str, str] | None = None, *, head: bool = False) -> None:
        self.peers.count_http(int(status))
        headers = [
            (b":status", str(int(status)).encode()),
            (b"server", f"prscd/{__version__}".encode()),
            (b"x-prscd-meshid", self.settings.mesh_id.encode()),
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        for key, value in (extra or {}).items():
            headers.append((key.lower().encode(), value.encode()))
        send_body = bool(body) and not head
        self.h3.send_headers(stream_id, headers, end_stream=not send_body)
        if send_body:
            self.h3.send_data(stream_id, body, end_stream=True)
        self.transmit()

    def _request(self, stream_id: int, headers: dict[bytes, bytes]) -> None:
        self._active_at = self._loop.time()
        settings = self.settings
        if (len(headers) > settings.http_max_headers
                or any(len(k) + len(v) + 2 > settings.http_max_line for k, v in headers.items())):
            self.peers.count_drop("headers_too_large")
            self._respond(stream_id, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                          b"request header fields too large\n")
            return
        method = headers.get(b":method", b"")
        if method == b"CONNECT":
            self._connect(stream_id, headers)
        elif method in (b"GET", b"HEAD"):
            self.server.counters["http3_requests"] += 1
            path, _ = split_target(headers.get(b":path", b"/").decode(errors="replace"))
            reply = endpoints.route(self.server.status, path)
            self._respond(stream_id, reply.status, reply.body, reply.content_type,
                          reply.headers, head=method == b"HEAD")
        else:
            self._respond(stream_id, HTTPStatus.METHOD_NOT_ALLOWED,
                          b"use GET, or CONNECT with :protocol webtransport\n",
                          extra={"allow": "GET, HEAD, CONNECT"})

    def _connect(self, stream_id: int, headers: dict[bytes, bytes]) -> None:
        status, reason, query = check_connect(headers)
        if status:
            log.info("connect refused status=%d reason=%s", status, reason)
            self._respond(stream_id, status, reason.encode() + b"\n")
            return
        # Admission may wait (the auth webhook): in a task, the connection carries on.
        self._admitting += 1
        self.server.track(self._loop.create_task(self._admit(stream_id, query)))

    async def _admit(self, stream_id: int, query: str) -> None:
        try:
            admission = await self.peers.admit(query, "webtransport")
        finally:
            self._admitting -= 1
        if self.terminated:
            return
        if admission.status != HTTPStatus.SWITCHING_PROTOCOLS:
            log.info("connect refused status=%d reason=%s", admission.status, admission.reason)
            self._respond(stream_id, admission.status, admission.reason.encode() + b"\n")
            return
        self._ever_session = True
        self._handshake_over()
        session = WebTransportSession(self, stream_id, self.peers,
                                      self.settings.max_message_bytes, self.server.counters)
        self.sessions[stream_id] = session
        self.peers.count_http(HTTPStatus.OK)
        self.h3.send_headers(stream_id, [
            (b":status", b"200"),
            (b"sec-webtransport-http3-draft", b"draft02"),
            (b"server", f"prscd/{__version__}".encode()),
            (b"x-prscd-meshid", self.settings.mesh_id.encode()),
        ])
        self.transmit()  # alone in its packet: Chromium dropped a datagram sharing it
        peer = self.peers.open(admission, "webtransport", session)
        self.server.track(session.start(peer))
        self._arm_ping()


class WebTransportListener:
    """HTTP/3 listeners (IPv4 and IPv6) sharing the node's certificate and port."""

    def __init__(self, settings: Settings, peers: Peers, status: Status) -> None:
        self.settings = settings
        self.peers = peers
        self.status = status
        self.servers: list[QuicServer] = []
        self.connections: set[H3Protocol] = set()
        #: Connections without a session (node/transports/handshakes.py); one without
        #: a session may keep asking for 6 x HANDSHAKE_TIMEOUT (_handshake_deadline).
        self.handshakes = Handshakes(peers, "webtransport", settings.max_handshakes,
                                     settings.handshake_timeout, settings.max_connections,
                                     expire=6 * settings.handshake_timeout + 1.0)
        self.flusher = TurnFlusher()
        self.tasks: set[asyncio.Task[None]] = set()
        #: datagrams_in/out, stream_fallback (also dropped.wt_too_big_for_datagram),
        #: stream_messages_out, http3_requests.
        self.counters: Counter[str] = Counter()
        self.idle_timeout = settings.wt_idle_timeout
        self.stopping = False
        self.configuration: QuicConfiguration | None = None
        self.port = settings.port

    def use_certificate(self, cert: CertInfo) -> None:
        """A renewed pair (node/tls.py's watcher): QuicServer hands this configuration to
        every new connection, which copies the certificate when it starts (aioquic's
        QuicConnection._initialize); open connections keep theirs."""
        if self.configuration is not None:
            self.configuration.load_cert_chain(cert.cert_file, cert.key_file)

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _configuration(self, cert: CertInfo) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=False,
            alpn_protocols=H3_ALPN,
            max_datagram_frame_size=65536,
            idle_timeout=self.idle_timeout,
        )
        config.load_cert_chain(cert.cert_file, cert.key_file)
        return config

    async def start(self, port: int, cert: CertInfo) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        self.configuration = config = self._configuration(cert)
        addresses: list[tuple[str, int]] = []
        for family, address in _bind_addresses(self.settings.host):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # As the WebSocket server: several worker processes may share the port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                # Every peer's packets share this socket: 500 ACKs of one fan-out message
                # overflowed the default 208 KiB (kernel RcvbufErrors). Capped by rmem_max.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
                sock.bind((address, port))
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6 and addresses:
                    log.warning("webtransport: cannot bind [%s]:%d (%s); IPv4 only",
                                address, port, exc.strerror)
                    continue
                raise
            _, server = await loop.create_datagram_endpoint(
                lambda: QuicServer(configuration=config,
                                   create_protocol=partial(H3Protocol, server=self)),
                sock=sock,
            )
            self.servers.append(server)
            addresses.append(sock.getsockname()[:2])
        ping, idle = self.settings.wt_ping_interval, self.idle_timeout
        if ping > 0:
            loop_lag()  # watching the loop from now: its stalls extend the silent deadline
        if not 0 < ping < idle:
            log.warning("WT_PING_INTERVAL=%g with WT_IDLE_TIMEOUT=%g: quiet but live sessions "
                        "may be cut; keep the interval under the idle timeout", ping, idle)
        self.port = port
        self.log_browser_hints(cert)
        log.info("webtransport listening udp=%s idle_timeout=%gs ping_interval=%gs",
                 ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses),
                 self.idle_timeout, self.settings.wt_ping_interval)
        return addresses

    def log_browser_hints(self, cert: CertInfo) -> None:
        """What a developer needs to open the demo with the (self-signed) dev certificate."""
        settings = self.settings
        origin = public_origin(settings.public_url, settings.domain, settings.host, self.port)
        log.info("native WebTransport with this certificate: pin serverCertificateHashes "
                 "from https://%s/cert-hash, or start a Chromium that is not already "
                 "running with that profile (a fresh --user-data-dir): %s",
                 origin, chromium_command(cert, origin))

    async def close(self) -> None:
        """End every session, let the goodbyes go out, then close the sockets.

        ``WT_STOP_CLOSE=connection`` (default): CONNECTION_CLOSE with H3_NO_ERROR and the
        reason "node stopping". @yomo/presence in Chromium reconnects after that (10 s
        later, measured), landing on the next healthy region behind Anycast or Geo-DNS.
        ``capsule``: a CLOSE_WEBTRANSPORT_SESSION capsule (1001 "node stopping"): the
        cleanest goodbye, but Chromium then resolves ``closed`` and the real client never
        reconnects. Other clients read either.
        """
        self.stopping = True
        closing: list[tuple[H3Protocol, int]] = []
        by_capsule = self.settings.wt_stop_close == "capsule"
        for conn in list(self.connections):
            if by_capsule:
                for session in list(conn.sessions.values()):
                    session.close(CLOSE_GOING_AWAY, "node stopping")
                    closing.append((conn, session.session_id))
            elif conn.sessions:
                for session in list(conn.sessions.values()):
                    session.end("node stopping", reply="none")  # the connection goes instead
                conn.quic.close(error_code=H3_NO_ERROR, reason_phrase="node stopping")
            conn.transmit()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_GRACE
        # Until each capsule's FIN is acknowledged (or the connection is gone).
        while loop.time() < deadline and not all(
            conn.terminated or conn.finished(sid) for conn, sid in closing
        ):
            await asyncio.sleep(0.01)
        for server in self.servers:
            server.close()  # CONNECTION_CLOSE to every connection, then the socket
        for conn in list(self.connections):
            conn.shutdown()
        self.servers.clear()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def _bind_addresses(host: str) -> list[tuple[socket.AddressFamily, str]]:
    """Both IP families: Chromium tries ::1 first for ``localhost`` with no IPv4 fallback."""
    if not host:
        return [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    if host in LOOPBACK_NAMES:
        return [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        return list(dict.fromkeys((info[0], str(info[4][0])) for info in infos))
    return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, host)]
