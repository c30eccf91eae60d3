"""WebSocket adapter (``websockets``), which also answers the small HTTP endpoints.

One connection = one peer. Frames are handed to the node (:class:`node.ports.Peers`)
one at a time, in order, so a join is registered before the joiner's next frame. What
this adapter sees (a text frame, a ping timeout, its write backlog) it reports; the node
decides, and closes through :meth:`WebSocketLink.close` with a code from the one table
(:class:`node.protocol.Fault`). The library itself answers 1009 to a message over
``MAX_MESSAGE_SIZE``; a stopping server sends 1001.

Fan-out is the hot path, and on loopback its cost is almost all ``send()`` system
calls (one per peer per message, the way ``websockets.broadcast`` does it). So:

* a frame is framed once (server frames are unmasked and compression is off, so the
  bytes are the same for every peer) and the same bytes object is queued to each peer;
* queued frames are written once per event-loop turn, one ``write``/``writelines``
  per peer: when the node handles k messages in a turn, a peer costs one system call,
  not k. Nothing awaits per peer and no payload is copied in Python;
* the library's own writes (pings, pongs, close frames) go through
  ``ServerConnection.send_data``, which first writes what we queued, so the order
  on the wire stays the order of the calls. With compression negotiated, frames
  take the library's path (each connection has its own compressor).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from websockets import http11
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from node import __version__, endpoints
from node.config import Settings
from node.ports import Admission, Peers, Status
from node.protocol import Fault, split_target
from node.transports.handshakes import AcceptErrors, Handshakes, tls_protocol
from node.transports.ws_keepalive import Keepalive

if TYPE_CHECKING:
    from node.presence import Peer

log = logging.getLogger("prscd.ws")

OPEN = State.OPEN
#: How long a peer closed for a flood (1008) has to take its close frame before the abort.
FLOOD_GRACE = 2.0
#: Pings and pongs a client may send a second (browsers send none; libraries one per 20 s
#: or so). The library answers each ping before the node sees it: more closes 1008.
MAX_CONTROL_FRAMES = 50
#: How long a stopping node waits for its peers' closing handshakes before aborting.
STOP_GRACE = 1.0


def frame_header(length: int) -> bytes:
    """Header of an unmasked, final binary frame (what a server sends)."""
    if length < 126:
        return bytes((0x82, length))
    if length < 65536:
        return struct.pack("!BBH", 0x82, 126, length)
    return struct.pack("!BBQ", 0x82, 127, length)


class PeerConnection(ServerConnection):
    """A ``ServerConnection`` whose library writes go out after the node's queued frames.

    Every change of the protocol's state away from OPEN (a close frame received or
    sent, a protocol error) is followed by ``send_data``, or ends in
    ``connection_lost``: both tell the link, so its hot path checks one flag.
    """

    prscd_link: WebSocketLink | None = None
    #: Set on the listener's subclass: where refused requests are counted.
    prscd_peers: Peers | None = None
    #: The request head, held until complete and checked (None once handed on).
    prscd_head: bytearray | None = None
    #: Set on the listener's subclass: its connections in their handshake.
    prscd_handshakes: Handshakes | None = None
    #: Set on the listener's subclass when the node makes TLS: the loop's own TLS protocol
    #: is put under this one here, at the accept, so that a connection is counted from then
    #: and every end of its TLS handshake is seen (a server made with ``ssl=`` tells its
    #: protocol nothing of a failed one: it was counted only after TLS, issue 15).
    prscd_tls: ssl.SSLContext | None = None
    prscd_tls_timeout = 10.0
    prscd_accepted = False
    prscd_made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.prscd_accepted:
            self.prscd_accepted = True
            self._accepted(transport)
            if self.prscd_tls is not None:
                return  # the TLS layer calls again once its handshake is done
        self.prscd_made = True
        super().connection_made(transport)
        self.prscd_head = bytearray()

    def _accepted(self, raw: Any) -> None:
        """The TCP accept: counted (over a bound the oldest half-open connection of the node
        is closed) and TLS begun, with the handshake deadline."""
        handshakes = self.prscd_handshakes
        if handshakes is not None:
            handshakes.began(self)
            handshakes.closable(self, raw.abort)
        if self.prscd_tls is None:
            return
        waiter = self.loop.create_future()
        waiter.add_done_callback(self._tls_over)
        layer = tls_protocol(self.loop)(self.loop, self, self.prscd_tls, waiter,
                                        server_side=True,
                                        ssl_handshake_timeout=self.prscd_tls_timeout,
                                        # (what serve(ssl=...) passed: its close timeout)
                                        ssl_shutdown_timeout=self.close_timeout or 10.0)
        # Before the loop starts reading (it does after this returns): the ClientHello
        # goes to the TLS layer, as with create_server(ssl=...).
        raw.set_protocol(layer)
        layer.connection_made(raw)

    def _tls_over(self, waiter: asyncio.Future[None]) -> None:
        # Done, failed, timed out, or closed: only success made this a connection (its
        # connection_made comes first). (An abort ends it with no exception at all.)
        if not waiter.cancelled():
            waiter.exception()  # (retrieved: no "never retrieved" log line)
        if not self.prscd_made and self.prscd_handshakes is not None:
            self.prscd_handshakes.ended(self)

    def data_received(self, data: bytes) -> None:
        """Strict HTTP/1.1 before the library sees a byte (it served any method like GET,
        closed on a body without an answer, and logged a traceback for a request
        pipelined behind ``Content-Length: 0``): see :func:`head_problem`."""
        head = self.prscd_head
        if head is None:
            super().data_received(data)
            return
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > (http11.MAX_NUM_HEADERS + 1) * (http11.MAX_LINE_LENGTH + 2):
                self.prscd_head = None  # over the library's own limits: it answers 414/431
                super().data_received(bytes(head))
            return
        self.prscd_head = None
        problem = head_problem(bytes(head[:end]), extra=len(head) > end + 4)
        if problem is None:
            super().data_received(bytes(head))
            return
        status, reason = problem
        if self.prscd_peers is not None:
            self.prscd_peers.count_drop(f"http_{status}")
            self.prscd_peers.count_http(status)
        log.warning("http request refused status=%d reason=%s", status, reason)
        allow = "Allow: GET, HEAD\r\n" if status == HTTPStatus.METHOD_NOT_ALLOWED else ""
        body = reason.encode() + b"\n"
        self.transport.write(
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{allow}Content-Type: text/plain; "
            f"charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            f"\r\n".encode() + body)
        self.transport.close()

    prscd_control = 0
    prscd_control_at = 0.0

    def process_event(self, event: Any) -> None:
        opcode = getattr(event, "opcode", None)  # (the handshake's Request has none)
        if opcode is Opcode.PING or opcode is Opcode.PONG:
            now = self.loop.time()
            if now - self.prscd_control_at >= 1.0:
                self.prscd_control_at, self.prscd_control = now, 0
            self.prscd_control += 1
            link = self.prscd_link
            if (self.prscd_control > MAX_CONTROL_FRAMES and link is not None
                    and link.peer is not None and not link.closing):
                link.writer.peers.fault(link.peer, Fault.RATE_FLOOD, "more than "
                                        f"{MAX_CONTROL_FRAMES} pings or pongs a second")
        super().process_event(event)

    def send_data(self) -> None:
        link = self.prscd_link
        if link is not None:
            if link.pending is not None:
                link.flush()
            if self.protocol.state is not OPEN:
                link.closing = True
        super().send_data()
        if link is not None:
            link.library_wrote()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.prscd_handshakes is not None:
            self.prscd_handshakes.ended(self)
        if not self.prscd_made:  # (the TLS layer reports to us only once it is done)
            return
        link = self.prscd_link
        if link is not None:
            link.closing = True
            link.pending = None
        super().connection_lost(exc)
        # No byte reaches the protocol after this (its reader is at EOF), so its parser is
        # never stepped again. Its suspended generator frame holds the protocol, and the
        # parser's exception (an abort's EOFError) holds that frame in its traceback: two
        # cycles that kept every closed connection's protocol, reader and frames until a
        # full garbage collection, ~1,100 per node in a 5-minute soak (bench/soak.py).
        protocol = self.protocol
        protocol.parser.close()
        if protocol.parser_exc is not None:
            protocol.parser_exc.__traceback__ = None


def head_problem(head: bytes, *, extra: bool) -> tuple[int, str] | None:
    """Why a request head (up to its blank line) is refused, or None. One request per
    connection, GET or HEAD, no body: that is all a WebSocket upgrade or a status page
    needs, and each is answered, never just closed. ``extra``: bytes followed the head
    before our answer (a pipelined request, or a body)."""
    line, _, fields = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return HTTPStatus.BAD_REQUEST, "an HTTP/1.1 request line is expected"
    if parts[0] not in (b"GET", b"HEAD"):
        return HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD are served here"
    for field in fields.split(b"\r\n"):
        name, _, value = field.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" or (name == b"content-length"
                                           and value.strip() != b"0"):
            return HTTPStatus.BAD_REQUEST, "a request body is not accepted"
    if extra:
        return HTTPStatus.BAD_REQUEST, "one request per connection: nothing may follow it"
    return None


class Writer:
    """Frames each message once and writes each peer's queue once per loop turn."""

    def __init__(self, peers: Peers) -> None:
        self.peers = peers
        self._dirty: list[WebSocketLink] = []
        self._frame: bytes | None = None
        self._wire = b""
        #: A closing link with more than this queued is aborted (0: never): see
        #: WebSocketLink.library_wrote.
        self.abort_over = 0

    def wire(self, frame: bytes) -> bytes:
        """``frame`` with its WebSocket header; built once for all peers of a Deliver."""
        if frame is not self._frame:  # identity: every peer of one Deliver shares the object
            self._frame = frame
            self._wire = frame_header(len(frame)) + frame
        return self._wire

    def mark(self, link: WebSocketLink) -> None:
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self.flush_all)
        self._dirty.append(link)

    def flush_all(self) -> None:
        dirty, self._dirty = self._dirty, []
        for link in dirty:
            if link.pending is not None:
                link.flush()


class WebSocketLink:
    """What the node uses to send to one WebSocket peer: never blocks, never waits."""

    __slots__ = ("abort_handle", "closing", "gone", "keepalive_entry", "peer", "pending",
                 "ping_sent", "pinged_at", "pong", "silent", "writer", "ws")
    transport = "websocket"

    def __init__(self, ws: ServerConnection, writer: Writer) -> None:
        self.ws = ws
        self.writer = writer
        self.peer: Peer | None = None
        #: Frames queued this loop turn (None: nothing queued, not in the dirty list).
        self.pending: list[bytes] | None = None
        self.closing = False
        self.gone = False
        #: When the last ping went out, and whether its pong is still awaited.
        self.pinged_at = 0.0
        self.ping_sent: float | None = None
        #: The library's future for that pong (done once it came; read on the next tick).
        self.pong: asyncio.Future[float] | None = None
        #: Past the soft keepalive deadline: reported silent, not closed (node/silence.py).
        self.silent = False
        self.abort_handle: asyncio.TimerHandle | None = None
        #: This link's entry in the keepalive heap (cleared when the connection ends).
        self.keepalive_entry: list[Any] | None = None

    def send(self, frame: bytes) -> bool:
        """Queue one binary frame; False when not sent (closing or closed)."""
        if self.closing:
            return False
        writer = self.writer
        wire = writer._wire if frame is writer._frame else writer.wire(frame)
        pending = self.pending
        if pending is None:
            self.pending = [wire]
            writer.mark(self)
        else:
            pending.append(wire)
        return True

    def flush(self) -> None:
        # Frames are only queued while OPEN, and whatever ends OPEN goes through
        # send_data, which flushes them first, ahead of the close frame.
        pending, self.pending = self.pending, None
        transport = self.ws.transport
        if not pending or transport.is_closing():
            return
        if len(pending) == 1:
            transport.write(pending[0])
        else:
            transport.writelines(pending)
        self._check(transport.get_write_buffer_size())

    def _check(self, queued: int) -> None:
        # What the kernel would not take; the node decides when it is too much.
        if queued and not self.closing and self.peer is not None:
            self.writer.peers.backlog(self.peer, queued)

    def library_wrote(self) -> None:
        """The library wrote its own frames: pongs to the client's pings, close frames.

        They count toward the backlog like ours: a client that pings without reading made
        the node queue 55 MB of pongs (400,000 pings), held until the ping timeout. Now it
        is a slow reader (1008) past WRITE_BUFFER_LIMIT, and aborted if it goes on pinging
        past twice that while its close is under way (pongs are still owed while closing).
        """
        queued = self.ws.transport.get_write_buffer_size()
        if not queued:
            return
        if not self.closing:
            self._check(queued)
        elif self.writer.abort_over and queued > self.writer.abort_over:
            self.ws.transport.abort()

    def close(self, code: int, reason: str) -> None:
        """Close without waiting for the write buffer to drain (``ws.close()`` would).

        The close frame goes behind what is queued, so a slow but live reader still
        sees the code; a peer that never reads is aborted after the close timeout.
        """
        if self.closing:
            return
        self.closing = True
        ws = self.ws
        if ws.protocol.state is OPEN:
            # A close frame's reason holds at most 123 bytes of UTF-8.
            ws.protocol.send_close(code, reason.encode()[:123].decode(errors="ignore"))
            ws.send_data()
        loop = asyncio.get_running_loop()
        grace = ws.close_timeout if ws.close_timeout is not None else 10.0
        if code == Fault.RATE_FLOOD.code:
            # A flood (or a slow reader): nothing more is read from it (its frames would
            # only be parsed to be dropped: 1.8 s of CPU in 2 s for a re-join flood), and it
            # is cut off soon; its close frame is already on its way.
            ws.transport.pause_reading()
            grace = min(grace, FLOOD_GRACE)
        self.abort_handle = loop.call_later(grace, ws.transport.abort)


class CompressedLink(WebSocketLink):
    """permessage-deflate: each connection has its own compressor, so no shared bytes."""

    __slots__ = ()

    def send(self, frame: bytes) -> bool:
        if self.closing:
            return False
        ws = self.ws
        ws.protocol.send_binary(frame)
        ws.send_data()  # (writes what is queued first)
        self._check(ws.transport.get_write_buffer_size())
        return True


def _reply(status: int, body: bytes, content_type: str, extra: dict[str, str]) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "close"
    for key, value in extra.items():
        headers[key] = value
    return Response(status, HTTPStatus(status).phrase, headers, body)


class WebSocketListener:
    """The WebSocket server on TCP ``PORT``; its request hook also answers the GET pages."""

    def __init__(self, settings: Settings, peers: Peers, status: Status) -> None:
        self.settings = settings
        self.peers = peers
        self.status = status
        self.server: Server | None = None
        self.writer = Writer(peers)
        self.writer.abort_over = 2 * settings.write_buffer_limit
        self.keepalive = Keepalive(peers, settings.ping_interval, settings.ping_timeout,
                                   settings.ping_silent_timeout)
        self.handshakes = Handshakes(peers, "websocket", settings.max_handshakes,
                                     settings.handshake_timeout, settings.max_connections)
        self.accept_errors = AcceptErrors(peers, self.handshakes)

    def _headers(self) -> dict[str, str]:
        return {"X-Prscd-MeshID": self.settings.mesh_id, "X-Prscd-Version": __version__}

    async def _process_request(self, conn: ServerConnection,
                               request: Request) -> Response | None:
        path, query = split_target(request.path)
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if path != "/v1":
            if upgrade:
                why = f"no WebSocket endpoint at {path[:100]}"
                reply = endpoints.text_reply(HTTPStatus.NOT_FOUND, why)
            else:
                local = endpoints.is_local(conn.remote_address, request.headers)
                reply = endpoints.route(self.status, path, local=local)
            return _reply(reply.status, reply.body, reply.content_type,
                          {**reply.headers, **self._headers()})
        if not upgrade or request.method != "GET":
            # Before admission: only a real upgrade may cost an auth webhook call.
            return _reply(HTTPStatus.UPGRADE_REQUIRED, b"use WebSocket or WebTransport\n",
                          "text/plain; charset=utf-8", self._headers())
        admission = await self.peers.admit(query, "websocket")
        if admission.status != HTTPStatus.SWITCHING_PROTOCOLS:
            return _reply(admission.status, admission.reason.encode() + b"\n",
                          "text/plain; charset=utf-8", self._headers())
        conn.prscd_admission = admission  # type: ignore[attr-defined]
        return None

    def _process_response(self, conn: ServerConnection, request: Request,
                          response: Response) -> None:
        # Also called for replies made in _process_request, which carry these already.
        self.peers.count_http(response.status_code)
        for key, value in self._headers().items():
            if key not in response.headers:
                response.headers[key] = value
        if request.method == "HEAD":  # the headers of a GET (Content-Length too), no body
            response.body = b""

    async def start(self, ssl: Any) -> list[tuple[str, int]]:
        settings = self.settings
        # Request line and header limits (process-wide in websockets): a longer line
        # answers 414 or 431, more headers 431.
        http11.MAX_LINE_LENGTH = settings.http_max_line
        http11.MAX_NUM_HEADERS = settings.http_max_headers
        self.server = await serve(
            self._handler,
            settings.host or None,
            settings.port,
            ssl=None,  # TLS is made by each connection, from its accept (PeerConnection)
            process_request=self._process_request,
            process_response=self._process_response,
            compression="deflate" if settings.ws_compression else None,
            max_size=settings.max_message_bytes,
            ping_interval=None,  # our own keepalive sends the timestamp ping
            # TLS handshake, then the HTTP upgrade, each within this (else the TCP
            # connection is dropped).
            open_timeout=settings.handshake_timeout,
            server_header=f"prscd/{__version__}",
            # Given once: else each connection looks its logger up by name (a lock).
            logger=logging.getLogger("websockets.server"),
            reuse_port=True,
            # (A subclass per listener: several nodes may share a process.)
            create_connection=type("PeerConnection", (PeerConnection,),
                                   {"prscd_peers": self.peers,
                                    "prscd_handshakes": self.handshakes,
                                    "prscd_tls": ssl or None,
                                    "prscd_tls_timeout": settings.handshake_timeout}),
        )
        self.accept_errors.install(self.server.sockets)
        return [s.getsockname()[:2] for s in self.server.sockets]

    async def close(self) -> None:
        """Every peer gets 1001; one that has not closed within ``STOP_GRACE`` is aborted.

        The library's close waits for the write buffer to drain, with no timeout: a peer
        that stopped reading would hold the node's stop (tests/test_stop.py). Aborting it
        ends its handler, which reports it closed, so its offline events still go out.
        """
        self.keepalive.stop()
        self.accept_errors.uninstall()
        server = self.server
        if server is None:
            return
        # Connections before their upgrade are not the library's yet (TLS is ours).
        self.handshakes.shed(len(self.handshakes))
        server.close(close_connections=True)
        try:
            await asyncio.wait_for(asyncio.shield(server.wait_closed()), STOP_GRACE)
        except TimeoutError:
            stuck = list(server.all_connections)
            log.warning("stop: aborting %d connections not closed within %.1fs (not reading "
                        "or not answering the close)", len(stuck), STOP_GRACE)
            for ws in stuck:
                ws.transport.abort()
            await server.wait_closed()

    async def _handler(self, ws: ServerConnection) -> None:
        admission: Admission = ws.prscd_admission  # type: ignore[attr-defined]
        self.handshakes.ended(ws)
        link = (CompressedLink if ws.protocol.extensions else WebSocketLink)(ws, self.writer)
        ws.prscd_link = link  # type: ignore[attr-defined]
        peers = self.peers
        peer = link.peer = peers.open(admission, "websocket", link)
        self.keepalive.add(link)
        try:
            async for message in ws:
                if link.closing:  # closed by the node: already offline, the close under way
                    sent = ws.protocol.close_sent
                    if sent is not None and sent.code == Fault.RATE_FLOOD.code:
                        # Closed for a flood: take no more, or websockets resumes reading
                        # as its queue drains, undoing WebSocketLink.close's pause (a
                        # re-join flood kept the node busy until its abort: 1.6 s of CPU).
                        await ws.wait_closed()
                        break
                    continue
                if isinstance(message, str):
                    peers.fault(peer, Fault.TEXT_FRAME, "binary frames only")
                else:
                    await peers.receive(peer, message)
        except ConnectionClosed:
            pass
        finally:
            link.gone = True
            if link.abort_handle is not None:
                link.abort_handle.cancel()
            # The handshake may still be in flight: read the frames, not close_code.
            sent, rcvd = ws.protocol.close_sent, ws.protocol.close_rcvd
            if sent is not None and sent.code == Fault.TOO_BIG.code:
                peers.count_drop(Fault.TOO_BIG.counter)  # the library's own close
            # Who closed first: the peer (rcvd then sent) or us.
            first = rcvd if ws.protocol.close_rcvd_then_sent else (sent or rcvd)
            code = first.code if first else 1006  # 1006: no close frame either way
            why = f"close code={code} reason={first.reason if first else ''!r}"
            await peers.closed(peer, why, code=code)
            # Break the ws <-> link cycle and leave the keepalive heap: a closed connection
            # and its TLS buffers are freed now, not at the next full garbage collection
            # (under connection churn that grew the node by ~40 KiB per connection; found
            # by bench/soak.py).
            self.keepalive.forget(link)
            ws.prscd_link = None  # type: ignore[attr-defined]
            link.peer = None
