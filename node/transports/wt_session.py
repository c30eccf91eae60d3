"""One WebTransport session = one peer: datagrams, reliable streams, capsules, close.

The QUIC/HTTP-3 glue (:mod:`node.transports.webtransport`) routes each session's
events here and hands it the little I/O it needs (:class:`SessionIO`). A session is
also the node's :class:`~node.ports.Link` to its peer.

Delivery to the peer:

* datagram mode (the browser client): one msgpack message per datagram. aioquic
  neither splits nor rejects a datagram larger than a packet: it keeps it at the head
  of its queue forever and every later datagram waits behind it. So each message is
  sized against the connection's real payload room first, and a message that does
  not fit goes on a server-opened unidirectional stream instead. @yomo/presence in
  Chromium never reads those, so each is also counted as dropped (wt_too_big_for_datagram)
  and logged once per peer: messages over 1137 bytes with aioquic's defaults
  (tests/test_wt_fallback.py, docs/webtransport.md).
* reliable mode: once the peer writes on a stream (concatenated msgpack maps), it
  is answered the same way, on one server-opened unidirectional stream.

Server-opened *bidirectional* streams are never used: aioquic does not mark them as
WebTransport streams and the peer's reply kills the connection (H3_FRAME_ERROR).

Close codes (the 32-bit code of the CLOSE_WEBTRANSPORT_SESSION capsule) are the
WebSocket numbers of the one table, :class:`node.protocol.Fault`. What this session sees
(input that does not parse, a sender faster than the node, its send backlog) it reports
to the node (:class:`node.ports.Peers`), which decides and closes through :meth:`close`.

A slow reader is treated as on WebSocket: past ``WRITE_BUFFER_LIMIT`` bytes waiting
(datagrams queued in aioquic, or unacknowledged stream data) it is closed with 1008.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import msgpack
from aioquic.buffer import Buffer, BufferReadError, encode_uint_var

from node.protocol import Fault, MessageTooBig, ProtocolError

if TYPE_CHECKING:
    from node.ports import Peers
    from node.presence import Peer

log = logging.getLogger("prscd.wt")

CLOSE_WEBTRANSPORT_SESSION = 0x2843
DRAIN_WEBTRANSPORT_SESSION = 0x78AE

#: The close capsule's message is limited to 1024 bytes by the WebTransport drafts.
MAX_CLOSE_REASON = 1024
#: Frames received but not yet handled by the node, per session. aioquic grants
#: flow-control credit as it reads, so QUIC never pushes back on a fast sender for us:
#: past this, datagrams are dropped (unreliable by contract) and a stream writer is
#: closed with 1013.
MAX_INBOX = 1024
#: Once this many datagrams wait in aioquic (congestion-limited), the session reports
#: the connection's send backlog to the node every BACKLOG_CHECK more (a sum over the queue).
BACKLOG_FROM = 256
BACKLOG_CHECK = 64
#: Largest capsule accepted on the CONNECT stream (only close/drain/GREASE are expected).
MAX_CAPSULE_BYTES = 16 * 1024
#: Room left for an ACK frame in the same packet. aioquic writes a pending ACK first; by
#: its packet builder, a datagram that only fits an otherwise empty packet then stays
#: queued until a later transmit without a pending ACK. (Read from the code; not seen on
#: loopback, where 1169-byte payloads went through at once.)
ACK_ROOM = 32
#: The drop counter of a datagram peer's message sent on a stream instead (see send()).
TOO_BIG_FOR_DATAGRAM = "wt_too_big_for_datagram"


class SessionIO(Protocol):
    """What a session may do on its QUIC connection (one H3Protocol)."""

    terminated: bool

    def datagram_room(self, session_id: int) -> int:
        """The largest datagram payload that fits one packet of this connection."""
        ...

    def datagrams_pending(self) -> int: ...

    def bytes_pending(self, stream_id: int | None) -> int:
        """Bytes waiting to go out: queued datagrams and the stream's unacked data."""
        ...

    def send_datagram(self, session_id: int, data: bytes) -> None: ...

    def open_stream(self, session_id: int) -> int:
        """A new server-opened unidirectional WebTransport stream."""
        ...

    def send_stream(self, stream_id: int, data: bytes, end: bool = False) -> None: ...

    def reset_stream(self, stream_id: int) -> None: ...

    def send_connect(self, session_id: int, data: bytes, end: bool) -> None:
        """Data (capsules) on the session's CONNECT stream."""
        ...

    def schedule_transmit(self) -> None: ...

    def forget(self, session_id: int) -> None: ...

    def closed_by_node(self, session_id: int) -> None:
        """The node closed this session (its capsule is on its way): the connection
        reads no more for it and is closed soon after."""
        ...


def encode_capsule(capsule_type: int, payload: bytes) -> bytes:
    return encode_uint_var(capsule_type) + encode_uint_var(len(payload)) + payload


def encode_close_capsule(code: int, reason: str) -> bytes:
    message = reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore").encode()
    return encode_capsule(CLOSE_WEBTRANSPORT_SESSION, code.to_bytes(4, "big") + message)


def decode_close_capsule(payload: bytes) -> tuple[int, str]:
    code = int.from_bytes(payload[:4], "big") if len(payload) >= 4 else 0
    return code, payload[4:].decode(errors="replace")


def parse_capsules(buf: bytearray) -> list[tuple[int, bytes]]:
    """Remove the complete capsules from the front of ``buf``; leave a partial one."""
    out: list[tuple[int, bytes]] = []
    while buf:
        reader = Buffer(data=bytes(buf[:16]))
        try:
            capsule_type = reader.pull_uint_var()
            length = reader.pull_uint_var()
        except BufferReadError:
            break
        start = reader.tell()
        if length > MAX_CAPSULE_BYTES:
            raise ProtocolError(f"capsule of {length} bytes on the session stream")
        if len(buf) < start + length:
            break
        out.append((capsule_type, bytes(buf[start:start + length])))
        del buf[:start + length]
    return out


#: msgpack header byte -> (header bytes, width of its length field, least bytes per item)
#: for the types that declare a length: bin, str, ext, array, map.
_SIZED = {0xC4: (2, 1, 1), 0xC5: (3, 2, 1), 0xC6: (5, 4, 1),
          0xD9: (2, 1, 1), 0xDA: (3, 2, 1), 0xDB: (5, 4, 1),
          0xC7: (3, 1, 1), 0xC8: (4, 2, 1), 0xC9: (6, 4, 1),
          0xDC: (3, 2, 1), 0xDD: (5, 4, 1), 0xDE: (3, 2, 2), 0xDF: (5, 4, 2)}


def declared_size(buf: bytes | bytearray) -> int:
    """The least size the msgpack value at the start of ``buf`` declares in its header:
    0 when its type declares none, -1 when the header is not complete yet."""
    if not buf:
        return -1
    spec = _SIZED.get(buf[0])
    if spec is None:
        return 0
    header, width, per_item = spec
    if len(buf) < 1 + width:
        return -1
    return header + int.from_bytes(buf[1:1 + width], "big") * per_item


class FrameSplitter:
    """Cut a stream of concatenated msgpack values into the raw bytes of each value.

    Raw bytes rather than decoded objects: ``node.receive`` validates a frame itself,
    exactly as for a WebSocket message or a datagram. ``Unpacker.skip`` walks a value
    without building it (and applies no length limit); ``tell()`` gives where it ended.
    A message over ``max_message`` is refused as soon as its header says so, or as soon
    as that many bytes of it have arrived.
    """

    CHUNK = 4096

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._unpacker = msgpack.Unpacker(max_buffer_size=max_message + self.CHUNK)
        self._buf = bytearray()  # fed, not yet returned as frames
        self._pos = 0  # the unpacker's offset at the start of _buf
        self._checked = False  # the header of the message at _buf[0] was checked

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        frames: list[bytes] = []
        for i in range(0, len(data), self.CHUNK):
            chunk = data[i:i + self.CHUNK]
            try:
                self._unpacker.feed(chunk)
            except msgpack.BufferFull:
                raise MessageTooBig(f"message larger than {self.max_message} bytes") from None
            self._buf += chunk
            while True:
                if not self._checked:
                    declared = declared_size(self._buf)
                    if declared > self.max_message:
                        raise MessageTooBig(f"message of {declared} bytes or more: larger "
                                            f"than {self.max_message} bytes")
                    self._checked = declared >= 0
                try:
                    self._unpacker.skip()
                except msgpack.OutOfData:
                    break
                except (ValueError, msgpack.UnpackException) as exc:
                    if "exceeds max" in str(exc):
                        raise MessageTooBig(
                            f"message larger than {self.max_message} bytes") from None
                    raise ProtocolError(
                        f"stream: not valid msgpack ({type(exc).__name__})") from None
                end = self._unpacker.tell()
                size = end - self._pos
                if size > self.max_message:
                    raise MessageTooBig(f"message larger than {self.max_message} bytes")
                self._checked = False
                frames.append(bytes(self._buf[:size]))
                del self._buf[:size]
                self._pos = end
            if len(self._buf) > self.max_message:
                raise MessageTooBig(f"message larger than {self.max_message} bytes")
        return frames


class Inbox:
    """Frames waiting for the node, in order, for one reader: what the session used of
    asyncio.Queue (put_nowait, qsize, get) in ~150 bytes; an idle Queue took ~3.3 KB
    (three deques and an Event's), 7% of an idle peer (bench/wt_memory.py)."""

    __slots__ = ("_head", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[bytes | None] = []
        self._head = 0
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items) - self._head

    def put_nowait(self, item: bytes | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> bytes | None:
        while self._head == len(self._items):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items[self._head]
        self._head += 1
        if self._head == len(self._items):
            self._items.clear()
            self._head = 0
        return item

    def drop(self) -> int:
        """Forget the frames waiting; returns how many."""
        waiting = self.qsize()
        self._items.clear()
        self._head = 0
        return waiting


class WebTransportSession:
    """One session on one QUIC connection, and the node's Link to its peer.

    Frames are handed to the node one at a time, in order, by one task per session
    (as the WebSocket handler does), so a join is registered before the next frame.
    """

    transport = "webtransport"

    def __init__(self, io: SessionIO, session_id: int, peers: Peers, max_message: int,
                 counters: Counter[str]) -> None:
        self.io = io
        self.session_id = session_id
        self.peers = peers
        self.max_message = max_message
        self.counters = counters
        self.peer: Peer | None = None
        #: Set once the peer writes on a stream: it is then answered on a stream.
        self.reliable = False
        self.closed = False
        self.why = ""
        #: The close code sent or received (None: ended without one), for /metrics.
        self.code: int | None = None
        #: Ended by the QUIC idle timeout: the peer vanished (offline after PRESENCE_GRACE).
        self.vanished = False
        self.task: asyncio.Task[None] | None = None
        self._out_stream: int | None = None
        self._splitters: dict[int, FrameSplitter] = {}
        self._capsules = bytearray()
        self._inbox = Inbox()
        self._connect_stream_done = False
        self._fallback_logged = False

    def start(self, peer: Peer) -> asyncio.Task[None]:
        self.peer = peer
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self.task

    # -- Link ------------------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        """Queue one message; False when the session is closed."""
        io = self.io
        if self.closed or io.terminated:
            return False
        if not self.reliable:
            if len(frame) <= io.datagram_room(self.session_id) - ACK_ROOM:
                io.send_datagram(self.session_id, frame)
                io.schedule_transmit()
                self.counters["datagrams_out"] += 1
                waiting = io.datagrams_pending()
                if waiting >= BACKLOG_FROM and waiting % BACKLOG_CHECK == 0:
                    self._backlog()
                return True
            self._too_big_for_datagram(len(frame))
        return self._send_on_stream(frame)

    def close(self, code: int, reason: str) -> None:
        """Server-side close: CLOSE_WEBTRANSPORT_SESSION capsule + FIN, then the peer ends."""
        if self.closed:
            return
        capsule = encode_close_capsule(code, reason)
        self._end_connect_stream(capsule)
        self.io.schedule_transmit()
        # As on WebSocket: what it sent that the node has not handled yet is dropped, not
        # handed to the node one by one (up to MAX_INBOX frames of a flood).
        if waiting := self._inbox.drop():
            self.peers.count_drop("after_close", waiting)
        self.end(f"closed by server code={code} reason={reason[:120]!r}", code=code)
        self.io.closed_by_node(self.session_id)

    # -- events from the connection -----------------------------------------

    def on_datagram(self, data: bytes) -> None:
        if not self.closed:
            self.counters["datagrams_in"] += 1
            self._enqueue(data, reliable=False)

    def on_stream_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        if self.closed:
            return
        self.reliable = True
        splitter = self._splitters.get(stream_id)
        if splitter is None:
            splitter = self._splitters[stream_id] = FrameSplitter(self.max_message)
        try:
            frames = splitter.feed(data)
        except ProtocolError as exc:
            self._refuse(exc)
            return
        for frame in frames:
            if not self._enqueue(frame, reliable=True):
                return
        if ended:
            del self._splitters[stream_id]
            if splitter.pending:
                self._refuse(ProtocolError("stream ended inside a message"))

    def on_stream_reset(self, stream_id: int) -> None:
        """The peer abandoned one of its streams: what it held of a message is lost."""
        splitter = self._splitters.pop(stream_id, None)
        if splitter is not None and splitter.pending:
            self.peers.count_drop("wt_stream_reset")

    def on_stop_sending(self, stream_id: int) -> None:
        """The peer no longer reads our stream (aioquic has reset it): open a new one."""
        if stream_id == self._out_stream:
            self._out_stream = None

    def on_connect_data(self, data: bytes, ended: bool) -> None:
        """Capsules on the CONNECT stream; its FIN ends the session."""
        if self.closed:
            return
        self._capsules += data
        try:
            capsules = parse_capsules(self._capsules)
        except ProtocolError as exc:
            self._refuse(exc)
            return
        for capsule_type, payload in capsules:
            if capsule_type == CLOSE_WEBTRANSPORT_SESSION:
                code, reason = decode_close_capsule(payload)
                self.end(f"closed by client code={code} reason={reason[:120]!r}", code=code)
                return
            if capsule_type == DRAIN_WEBTRANSPORT_SESSION:
                log.debug("drain capsule sid=%s", self.peer.sid if self.peer else "-")
            # Anything else (Chromium sends a GREASE capsule right after the 200) is ignored.
        if ended:
            self.end("client ended the session stream (FIN)")

    def end(self, why: str, *, reply: str = "fin", code: int | None = None) -> None:
        """The session is over: stop sending, answer the CONNECT stream, end the peer.

        ``reply`` is how our half of the CONNECT stream ends: "fin", "reset" (the peer
        reset its half) or "none" (the connection is gone).
        """
        if self.closed:
            return
        self.closed = True
        self.why, self.code = why, code
        if reply == "fin":
            self._end_connect_stream(b"")
        elif reply == "reset" and not self._connect_stream_done:
            self._connect_stream_done = True
            self._best_effort(lambda: self.io.reset_stream(self.session_id))
        if reply != "none" and self._out_stream is not None:
            out = self._out_stream
            self._best_effort(lambda: self.io.send_stream(out, b"", True))
        self._splitters.clear()
        self.io.forget(self.session_id)
        self._inbox.put_nowait(None)
        if reply != "none":
            self.io.schedule_transmit()

    # -- internals -------------------------------------------------------------

    def _too_big_for_datagram(self, size: int) -> None:
        """A datagram peer gets this message on a stream, which @yomo/presence in Chromium
        never reads (docs/client.md): for it the message is lost. Counted as a drop, logged
        once per peer (a big-state channel would otherwise log every message)."""
        self.counters["stream_fallback"] += 1
        self.peers.count_drop(TOO_BIG_FOR_DATAGRAM)
        if not self._fallback_logged:
            self._fallback_logged = True
            peer = self.peer
            log.warning("message of %d bytes over the datagram room of %d sid=%s id=%s: sent "
                        "on a unidirectional stream, which @yomo/presence in Chromium never "
                        "reads; later ones to this peer are only counted (dropped.%s)", size,
                        self.io.datagram_room(self.session_id) - ACK_ROOM,
                        peer.sid if peer else "-", peer.client_id if peer else "-",
                        TOO_BIG_FOR_DATAGRAM)

    def _send_on_stream(self, frame: bytes) -> bool:
        io = self.io
        if self._out_stream is None:
            self._out_stream = io.open_stream(self.session_id)
        try:
            io.send_stream(self._out_stream, frame)
        except (RuntimeError, ValueError):
            # Reset under us (STOP_SENDING): the next message opens a new stream.
            self._out_stream = None
            return False
        io.schedule_transmit()
        self.counters["stream_messages_out"] += 1
        self._backlog()
        return True

    def _backlog(self) -> None:
        queued = self.io.bytes_pending(self._out_stream)
        if queued and self.peer is not None:
            self.peers.backlog(self.peer, queued)

    def _enqueue(self, frame: bytes, *, reliable: bool) -> bool:
        if self._inbox.qsize() >= MAX_INBOX:
            if reliable:
                self._fault(Fault.OVERLOADED, "too many messages waiting: slow down")
                return False
            self.peers.count_drop(Fault.OVERLOADED.counter)  # unreliable by contract
            return True
        self._inbox.put_nowait(frame)
        return True

    def _refuse(self, exc: ProtocolError) -> None:
        """Bad input closes this session only, with the reason in the capsule."""
        self._fault(exc.fault, str(exc))

    def _fault(self, fault: Fault, reason: str) -> None:
        if self.peer is not None:
            self.peers.fault(self.peer, fault, reason)
        else:
            self.close(fault.code, reason)

    def _end_connect_stream(self, data: bytes) -> None:
        if self._connect_stream_done:
            return
        self._connect_stream_done = True
        self._best_effort(lambda: self.io.send_connect(self.session_id, data, True))

    def _best_effort(self, write: Callable[[], object]) -> None:
        """Writes while tearing down may meet a stream the peer already reset."""
        if self.io.terminated:
            return
        try:
            write()
        except Exception as exc:  # aioquic raises several types here; none matters
            log.debug("session teardown write failed: %r", exc)

    async def _run(self) -> None:
        peers, peer = self.peers, self.peer
        assert peer is not None
        try:
            while (frame := await self._inbox.get()) is not None:
                try:
                    await peers.receive(peer, frame)
                except Exception:
                    log.exception("frame handling failed sid=%s", peer.sid)
                    peers.fault(peer, Fault.INTERNAL, "internal error")
                    break
        finally:
            await peers.closed(peer, self.why or "session task ended", vanished=self.vanished,
                               code=self.code)
            self.peer = None  # break the session <-> peer cycle: freed at once, not by the GC
