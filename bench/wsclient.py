"""A minimal WebSocket client as an asyncio Protocol, for load generators.

The ``websockets`` client costs a task, a message queue and tens of KiB per
connection, and its per-message overhead would make the load generator, not the
server, the bottleneck. This one does the opening handshake by hand, answers pings,
counts binary frames and optionally hands their payloads to a callback. Frames it
sends are masked with the all-zero key (valid per RFC 6455 and free to apply).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl as _ssl
import struct
from collections.abc import Callable
from urllib.parse import quote

OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_ZERO_MASK = b"\0\0\0\0"


def client_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """One masked (zero key) final frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + _ZERO_MASK + payload


class WSPeer(asyncio.Protocol):
    """One connection. ``on_message(peer, payload)`` is called per binary frame if set."""

    def __init__(self, client_id: str, on_message: Callable[[WSPeer, bytes], None] | None = None,
                 on_count: Callable[[int], None] | None = None) -> None:
        self.client_id = client_id
        self.on_message = on_message
        self.on_count = on_count  # called with the new frame count (window bookkeeping)
        self.transport: asyncio.Transport | None = None
        self.count = 0
        self.bytes = 0
        self.open = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._request = b""
        self.paused_reading = False
        self._waiter: asyncio.Future[None] | None = None
        self._wait_for = 0

    # -- connect ---------------------------------------------------------------------

    @classmethod
    async def connect(cls, host: str, port: int, path: str, client_id: str, *,
                      source: str | None = None, ssl: _ssl.SSLContext | None = None,
                      timeout: float = 30.0, **kw: object) -> WSPeer:
        loop = asyncio.get_running_loop()
        peer = cls(client_id, **kw)  # type: ignore[arg-type]
        key = base64.b64encode(os.urandom(16)).decode()
        peer._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        await asyncio.wait_for(
            loop.create_connection(lambda: peer, host, port, ssl=ssl,
                                   server_hostname=host if ssl else None,
                                   local_addr=(source, 0) if source else None),
            timeout,
        )
        await asyncio.wait_for(peer._handshake, timeout)
        return peer

    @staticmethod
    def v1_path(client_id: str, publickey: str = "bench") -> str:
        return f"/v1?publickey={quote(publickey)}&id={quote(client_id)}"

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"closed ({self.close_code})"))
        if not self._handshake.done():
            self._handshake.set_exception(exc or ConnectionError("closed during handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._buf[:end], self._buf[end + 4:]
            self._buf = b""
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self._handshake.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.open = True
            self._handshake.set_result(None)
            if not data:
                return
        self.bytes += len(data)
        buf = self._buf + data if self._buf else data
        n = len(buf)
        i = 0
        on_message = self.on_message
        on_count = self.on_count
        while n - i >= 2:
            b1 = buf[i + 1] & 0x7F
            if b1 < 126:
                h = 2
            elif b1 == 126:
                if n - i < 4:
                    break
                b1 = (buf[i + 2] << 8) | buf[i + 3]
                h = 4
            else:
                if n - i < 10:
                    break
                b1 = int.from_bytes(buf[i + 2:i + 10], "big")
                h = 10
            end = i + h + b1
            if end > n:
                break
            op = buf[i] & 0x0F
            if op == OP_BINARY:
                self.count += 1
                if on_count is not None:
                    on_count(self.count)
                if on_message is not None:
                    on_message(self, buf[i + h:end])
            elif op == OP_PING:
                self._write(client_frame(buf[i + h:end], OP_PONG))
            elif op == OP_CLOSE:
                body = buf[i + h:end]
                self.close_code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
                self.close_reason = body[2:].decode(errors="replace")
                self._write(client_frame(body[:2], OP_CLOSE))
                assert self.transport is not None
                self.transport.close()
                self._buf = b""
                return
            i = end
        self._buf = buf[i:] if i < n else b""
        if self._waiter is not None and self.count >= self._wait_for:
            if not self._waiter.done():
                self._waiter.set_result(None)
            self._waiter = None

    async def wait_count(self, n: int, timeout: float = 30.0) -> None:
        """Until ``n`` binary frames have arrived in all."""
        if self.count >= n:
            return
        self._wait_for = n
        self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(asyncio.shield(self._waiter), timeout)

    # -- sending -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, payload: bytes) -> None:
        self._write(client_frame(payload))

    def send_raw(self, frame: bytes) -> None:
        """Write an already framed (``client_frame``) message."""
        self._write(frame)

    def stop_reading(self) -> None:
        """Never read again: the server's writes pile up (a slow reader)."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # a small window: the backlog piles up at the server
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            self.transport.pause_reading()
            self.paused_reading = True

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
