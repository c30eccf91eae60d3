"""WebSocket adapter (``websockets``), which also answers the small HTTP endpoints.

One connection = one peer. Frames are handled one at a time, in order, so a join
is registered before the joiner's next frame. Close codes say what went wrong:
1003 text frame, 1007 invalid message (with the reason), 1009 too big, 1011 ping
timeout, 1001 server going away.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from node import __version__, http
from node.protocol import ProtocolError

if TYPE_CHECKING:
    from node.presence import Peer
    from node.server import Admission, Node

log = logging.getLogger("prscd.ws")

CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID = 1007
CLOSE_PING_TIMEOUT = 1011


class WebSocketLink:
    """What the node uses to send to one WebSocket peer: never blocks, never waits."""

    __slots__ = ("limit", "ws")
    transport = "websocket"

    def __init__(self, ws: ServerConnection, limit: int) -> None:
        self.ws = ws
        self.limit = limit

    def send(self, frame: bytes) -> bool:
        """Queue one binary frame; False when dropped (closed, or a reader too slow)."""
        ws = self.ws
        if ws.protocol.state is not State.OPEN:
            return False
        transport = ws.transport
        if transport is not None and transport.get_write_buffer_size() > self.limit:
            return False
        # What websockets.broadcast() does for one connection, without a list.
        ws.protocol.send_binary(frame)
        ws.send_data()
        return True

    def close(self, code: int, reason: str) -> None:
        asyncio.get_running_loop().create_task(self.ws.close(code, reason[:120]))


def _reply(status: int, body: bytes, content_type: str, extra: dict[str, str]) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "close"
    for key, value in extra.items():
        headers[key] = value
    return Response(status, HTTPStatus(status).phrase, headers, body)


class WebSocketTransport:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.server: Server | None = None

    def _headers(self) -> dict[str, str]:
        return {"X-Prscd-MeshID": self.node.settings.mesh_id, "X-Prscd-Version": __version__}

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if url.path != "/v1":
            if upgrade:
                why = f"no WebSocket endpoint at {url.path}"
                reply = http.text_reply(HTTPStatus.NOT_FOUND, why)
            else:
                reply = http.route(self.node, url.path)
            return _reply(reply.status, reply.body, reply.content_type,
                          {**reply.headers, **self._headers()})
        admission = self.node.admit(url.query, "websocket")
        if admission.status != HTTPStatus.SWITCHING_PROTOCOLS:
            return _reply(admission.status, admission.reason.encode() + b"\n",
                          "text/plain; charset=utf-8", self._headers())
        if not upgrade:
            return _reply(HTTPStatus.UPGRADE_REQUIRED, b"use WebSocket or WebTransport\n",
                          "text/plain; charset=utf-8", self._headers())
        conn.prscd_admission = admission  # type: ignore[attr-defined]
        return None

    def _process_response(self, conn: ServerConnection, request: Request,
                          response: Response) -> None:
        # Also called for replies made in _process_request, which carry these already.
        for key, value in self._headers().items():
            if key not in response.headers:
                response.headers[key] = value

    async def start(self, host: str | None, port: int, ssl: Any) -> list[tuple[str, int]]:
        settings = self.node.settings
        self.server = await serve(
            self._handler,
            host or None,
            port,
            ssl=ssl,
            process_request=self._process_request,
            process_response=self._process_response,
            compression="deflate" if settings.ws_compression else None,
            max_size=settings.max_message_bytes,
            ping_interval=None,  # our own keepalive sends the timestamp ping
            server_header=f"prscd/{__version__}",
            reuse_port=True,
        )
        return [s.getsockname()[:2] for s in self.server.sockets]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close(close_connections=True)
            await self.server.wait_closed()

    async def _keepalive(self, ws: ServerConnection, peer: Peer) -> None:
        settings = self.node.settings
        if not settings.ping_interval:
            return
        while True:
            await asyncio.sleep(settings.ping_interval)
            stamp = struct.pack(">Q", int(time.time() * 1000))
            try:
                pong = await ws.ping(stamp)
            except ConnectionClosed:
                return
            try:
                latency = await asyncio.wait_for(pong, settings.ping_timeout)
            except TimeoutError:
                log.info("ping timeout sid=%s id=%s", peer.sid, peer.client_id)
                await ws.close(CLOSE_PING_TIMEOUT, "ping timeout")
                return
            except ConnectionClosed:
                return
            peer.rtt_ms = round(latency * 1000, 3)

    async def _handler(self, ws: ServerConnection) -> None:
        admission: Admission = ws.prscd_admission  # type: ignore[attr-defined]
        link = WebSocketLink(ws, self.node.settings.write_buffer_limit)
        peer = self.node.open_peer(admission, "websocket", link)
        keepalive = asyncio.get_running_loop().create_task(self._keepalive(ws, peer))
        try:
            async for message in ws:
                if isinstance(message, str):
                    self.node.count_drop("text_frame")
                    await ws.close(CLOSE_UNSUPPORTED, "binary frames only")
                    break
                try:
                    await self.node.receive(peer, message)
                except ProtocolError as exc:
                    self.node.count_drop("invalid")
                    log.info("invalid message sid=%s id=%s reason=%s",
                             peer.sid, peer.client_id, exc)
                    await ws.close(CLOSE_INVALID, str(exc)[:120])
                    break
        except ConnectionClosed:
            pass
        finally:
            keepalive.cancel()
            # The handshake may still be in flight: read the frames, not close_code.
            sent, rcvd = ws.protocol.close_sent, ws.protocol.close_rcvd
            if sent is not None and sent.code == 1009:
                self.node.count_drop("too_big")
            # Who closed first: the peer (rcvd then sent) or us.
            first = rcvd if ws.protocol.close_rcvd_then_sent else (sent or rcvd)
            why = f"close code={first.code} reason={first.reason!r}" if first else "close code=1006"
            await self.node.close_peer(peer, why)
