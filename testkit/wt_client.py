"""A WebTransport client on aioquic, for tests and benchmarks (no browser needed).

It speaks what Chromium speaks (draft-02 extended CONNECT after the server's
SETTINGS) and can end a session every way a browser or a network can: close capsule,
FIN, stream reset, CONNECTION_CLOSE, or vanishing without a word.

Its framing (capsules, messages on reliable streams) is its own, on aioquic's varints
and msgpack's Unpacker, never the node's: a parser bug must not sit on both sides.

    async with wt_connect(port, "/v1?publickey=k&id=alice") as wt:
        assert wt.status == 200
        wt.send_datagram(join_frame("room", "alice"))
        ack = await wt.next_message()
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import msgpack
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, BufferReadError, encode_uint_var
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import (
    DatagramReceived,
    DataReceived,
    HeadersReceived,
    WebTransportStreamDataReceived,
)
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset

#: Capsule types on the CONNECT stream (WebTransport over HTTP/3, draft-02).
CLOSE_WEBTRANSPORT_SESSION = 0x2843
DRAIN_WEBTRANSPORT_SESSION = 0x78AE
#: ``close_capsule[0]`` when the server's close capsule could not be decoded.
MALFORMED = -1


def encode_capsule(capsule_type: int, payload: bytes) -> bytes:
    """Type and length as QUIC varints, then the payload (RFC 9297 capsule format)."""
    return encode_uint_var(capsule_type) + encode_uint_var(len(payload)) + payload


def encode_close_capsule(code: int, reason: str) -> bytes:
    """A 32-bit code and a UTF-8 reason. Not truncated: a test may send what a browser
    would refuse to."""
    return encode_capsule(CLOSE_WEBTRANSPORT_SESSION, code.to_bytes(4, "big") + reason.encode())


def decode_close_capsule(payload: bytes) -> tuple[int, str]:
    """Strict on purpose (no 32-bit code, or a reason not UTF-8: ValueError), so that a
    malformed capsule from the server shows in the test rather than being smoothed over."""
    if len(payload) < 4:
        raise ValueError(f"close capsule of {len(payload)} bytes: no 32-bit code")
    return int.from_bytes(payload[:4], "big"), payload[4:].decode()


def take_capsules(buf: bytearray) -> list[tuple[int, bytes]]:
    """Remove the complete capsules from the front of ``buf``; a partial one stays."""
    out: list[tuple[int, bytes]] = []
    while buf:
        reader = Buffer(data=bytes(buf[:16]))  # two varints take at most 16 bytes
        try:
            capsule_type = reader.pull_uint_var()
            length = reader.pull_uint_var()
        except BufferReadError:
            break
        end = reader.tell() + length
        if len(buf) < end:
            break
        out.append((capsule_type, bytes(buf[reader.tell():end])))
        del buf[:end]
    return out


class WTClient(QuicConnectionProtocol):
    """One QUIC connection with (at most) one WebTransport session."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic, stream_handler)
        self.h3 = H3Connection(quic, enable_webtransport=True)
        self.session_id: int | None = None
        #: The request was an extended CONNECT (its 200 opens a session).
        self.is_session = False
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        #: (via, message) with via "datagram" or "stream", in arrival order.
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.read = 0
        self.close_capsule: tuple[int, str] | None = None
        self.drained = False
        #: Every capsule the server sent on the CONNECT stream, GREASE included.
        self.capsules: list[tuple[int, bytes]] = []
        self.session_fin = False
        self.session_reset = False
        self.terminated: ConnectionTerminated | None = None
        self._capsules = bytearray()
        #: Reliable streams carry concatenated msgpack maps: one unpacker per stream.
        self._unpackers: dict[int, msgpack.Unpacker] = {}
        self._out_stream: int | None = None
        self._changed = asyncio.Event()
        self.vanished = False

    # -- waiting ---------------------------------------------------------------

    async def until(self, predicate: Callable[[], Any], timeout: float = 5.0,
                    what: str = "condition") -> Any:
        """Wait for ``predicate()`` to be truthy, re-checked after every QUIC event."""
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self._changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return result

    async def next_message(self, timeout: float = 5.0,
                           match: Callable[[dict[str, Any]], bool] | None = None
                           ) -> dict[str, Any]:
        """The next unread message (or the next one ``match`` accepts)."""
        def find() -> dict[str, Any] | None:
            while self.read < len(self.messages):
                message = self.messages[self.read][1]
                self.read += 1
                if match is None or match(message):
                    return message
            return None
        return await self.until(find, timeout, "a message")

    async def next_via(self, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        await self.until(lambda: self.read < len(self.messages), timeout, "a message")
        self.read += 1
        return self.messages[self.read - 1]

    # -- sending ---------------------------------------------------------------

    def connect_session(self, path: str, *, authority: str = "127.0.0.1",
                        protocol: bytes = b"webtransport", scheme: bytes = b"https",
                        method: bytes = b"CONNECT") -> int:
        stream_id = self._quic.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", scheme),
                   (b":authority", authority.encode()), (b":path", path.encode())]
        if method == b"CONNECT":
            headers.insert(1, (b":protocol", protocol))
            headers += [(b"sec-webtransport-http3-draft02", b"1"),
                        (b"origin", f"https://{authority}".encode())]
        self.h3.send_headers(stream_id, headers, end_stream=method != b"CONNECT")
        self.transmit()
        self.session_id = stream_id
        self.is_session = method == b"CONNECT"
        return stream_id

    def send_datagram(self, data: bytes) -> None:
        assert self.session_id is not None
        self.h3.send_datagram(self.session_id, data)
        self.transmit()

    def send_stream(self, data: bytes, *, end: bool = False, new: bool = False) -> int:
        """Write on our unidirectional stream (opened on first use, or anew)."""
        assert self.session_id is not None
        if self._out_stream is None or new:
            self._out_stream = self.h3.create_webtransport_stream(
                self.session_id, is_unidirectional=True)
        stream_id = self._out_stream
        self._quic.send_stream_data(stream_id, data, end_stream=end)
        self.transmit()
        return stream_id

    def reset_stream(self, stream_id: int, code: int = 0) -> None:
        self._quic.reset_stream(stream_id, code)
        self.transmit()

    def close_session(self, code: int = 0, reason: str = "") -> None:
        """What a page does on close: CLOSE_WEBTRANSPORT_SESSION capsule, then FIN."""
        assert self.session_id is not None
        self.h3.send_data(self.session_id, encode_close_capsule(code, reason), end_stream=True)
        self.transmit()

    def fin_session(self) -> None:
        assert self.session_id is not None
        self.h3.send_data(self.session_id, b"", end_stream=True)
        self.transmit()

    def reset_session(self, code: int = 0) -> None:
        assert self.session_id is not None
        self._quic.reset_stream(self.session_id, code)
        self.transmit()

    def vanish(self) -> None:
        """Stop dead, like a killed process: nothing more is sent, nothing read."""
        self.vanished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()

    # -- events ----------------------------------------------------------------

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
        if isinstance(event, StreamReset) and event.stream_id == self.session_id:
            self.session_reset = True
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived) and h3_event.stream_id == self.session_id:
                self.headers = dict(h3_event.headers)
                self.status = int(self.headers[b":status"])
                if h3_event.stream_ended:
                    self.session_fin = True
            elif isinstance(h3_event, DataReceived) and h3_event.stream_id == self.session_id:
                if self.status == 200 and self.is_session:
                    self._capsules += h3_event.data
                    for ctype, payload in take_capsules(self._capsules):
                        self.capsules.append((ctype, payload))
                        if ctype == CLOSE_WEBTRANSPORT_SESSION:
                            try:
                                self.close_capsule = decode_close_capsule(payload)
                            except ValueError as exc:
                                # Raising here would only stall the test until a timeout.
                                self.close_capsule = (MALFORMED, f"{exc}: {payload!r}")
                        elif ctype == DRAIN_WEBTRANSPORT_SESSION:
                            self.drained = True
                else:
                    self.body += h3_event.data
                if h3_event.stream_ended:
                    self.session_fin = True
            elif isinstance(h3_event, DatagramReceived):
                self.messages.append(("datagram", msgpack.unpackb(h3_event.data)))
            elif isinstance(h3_event, WebTransportStreamDataReceived):
                unpacker = self._unpackers.get(h3_event.stream_id)
                if unpacker is None:
                    unpacker = self._unpackers[h3_event.stream_id] = msgpack.Unpacker()
                unpacker.feed(h3_event.data)
                self.messages.extend(("stream", message) for message in unpacker)
                if h3_event.stream_ended:
                    del self._unpackers[h3_event.stream_id]
        self._changed.set()


def client_configuration() -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                               max_datagram_frame_size=65536, server_name="localhost")
    config.verify_mode = ssl.CERT_NONE
    return config


async def open_client(port: int, path: str | None = None, *, host: str = "127.0.0.1",
                      timeout: float = 5.0, client_class: type[WTClient] = WTClient,
                      **connect_kw: Any) -> WTClient:
    """Open a QUIC connection, wait for the server's SETTINGS, then CONNECT to ``path``
    (none with ``path=None``). The caller ends it (:func:`close_client`)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    connection = QuicConnection(configuration=client_configuration())
    _, made = await loop.create_datagram_endpoint(lambda: client_class(connection), sock=sock)
    client: WTClient = made  # type: ignore[assignment]
    try:
        # aioquic matches the network path by address tuple: IPv6 ones have four items.
        client.connect((host, port, 0, 0) if family == socket.AF_INET6 else (host, port))
        await asyncio.wait_for(client.wait_connected(), timeout)
        await client.until(lambda: client.h3.received_settings is not None, timeout,
                           "the server's SETTINGS")
        if path is not None:
            client.connect_session(path, **connect_kw)
            await client.until(lambda: client.status is not None, timeout, "the response")
    except BaseException:
        client.vanish()
        raise
    return client


async def close_client(client: WTClient, wait: float = 1.0) -> None:
    """CONNECTION_CLOSE (unless the client vanished or was closed already), then the socket."""
    if not client.vanished and client.terminated is None:
        client.close()
        with suppress(TimeoutError):
            await asyncio.wait_for(client.wait_closed(), wait)
    client.vanish()


@asynccontextmanager
async def wt_connect(port: int, path: str | None = None, *, host: str = "127.0.0.1",
                     timeout: float = 5.0, **connect_kw: Any) -> AsyncIterator[WTClient]:
    """Open a QUIC connection, wait for the server's SETTINGS, then CONNECT to ``path``.

    With ``path=None`` no session is opened. Leaving the block closes the connection
    (CONNECTION_CLOSE) unless the client vanished or was closed already.
    """
    client = await open_client(port, path, host=host, timeout=timeout, **connect_kw)
    try:
        yield client
    finally:
        await close_client(client)


class ReplayingClient(WTClient):
    """A client that can flood on past its close, as an attacker ignoring it would: it
    keeps its last short-header (1-RTT) packets and sends them again raw, with no
    congestion control and no regard for a CONNECTION_CLOSE (tests/test_hostile_wt.py,
    bench/wt_after_close.py)."""

    KEPT = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packets = 0  # sent, by aioquic or again
        self._recent: list[bytes] = []
        self._addr: Any = None
        self._send_raw: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        send_raw = self._send_raw = transport.sendto

        def sendto(data: bytes, addr: Any = None) -> None:
            self.packets += 1
            self._addr = addr
            if not data[0] & 0x80:
                self._recent.append(data)
                del self._recent[:-self.KEPT]
            send_raw(data, addr)

        transport.sendto = sendto

    def replay(self, count: int, *, connection_id: bytes | None = None) -> int:
        """Send the last ``count`` kept packets again (with another destination connection
        id of the same length when given); returns how many were sent."""
        packets = self._recent[-count:]
        for packet in packets:
            if connection_id is not None:
                packet = packet[:1] + connection_id + packet[1 + len(connection_id):]
            self._send_raw(packet, self._addr)
        self.packets += len(packets)
        return len(packets)
