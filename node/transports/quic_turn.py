"""Sending on many QUIC connections once per event-loop turn (aioquic), and what a
connection does not need to keep once its handshake is done.

aioquic's protocol builds packets (``transmit()``) after every datagram it receives and
wherever the application asks. In a fan-out nearly every received datagram is an ACK
that asks for nothing, and every delivery asked for its own ``transmit()``: profiled,
two thirds of the node's CPU went to building packets, much of it building nothing
(docs/performance.md). Here:

* :class:`TurnFlusher`: a connection with something to send is marked; once per loop
  turn every marked connection is flushed, so the datagrams and ACKs of one turn share
  packets and one ``transmit()`` per connection.
* :func:`nothing_to_send`: whether ``datagrams_to_send()`` would build no packet, read
  from aioquic's state; a turn's flush then skips the packet builder.
* :func:`free_handshake_buffers`: the three 16 KiB crypto buffers that aioquic keeps for
  the connection's life; and :func:`crypto_buffer_size`: a server's are made only as
  large as its certificate chain needs (freed 16 KiB buffers of the handshakes in flight
  stayed in the heap: bench/wt_memory.py, ``steps``).
* :func:`slim_connection` and :func:`after_handshake`: the rest of what an idle
  connection kept for nothing (bench/wt_memory.py measures it; docs/performance.md):
  the frame-handler table built per connection, eight connection ids each way, the
  handshake's keys, packet spaces and crypto streams, a set of received packet numbers
  that grows to 256 entries, the TLS context, QPACK dynamic tables the node never needs,
  the unused half of each one-way stream, deques where lists do (:func:`slim_protocol`).

These read aioquic internals (``pyproject.toml`` pins the version range;
tests/test_quic_turn.py checks each assumption against real connections).
"""

from __future__ import annotations

import asyncio
from functools import partial
from types import MethodType
from typing import Any, Protocol

import pylsqpack
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import H3Event
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import CRYPTO_BUFFER_SIZE, QuicConnection
from aioquic.quic.crypto import CryptoPair, NoCallback
from aioquic.quic.events import QuicEvent, StreamDataReceived
from aioquic.quic.recovery import QuicPacketNumberWindow, QuicPacketSpace
from aioquic.quic.stream import QuicStream, QuicStreamReceiver, QuicStreamSender
from aioquic.tls import Epoch, State
from cryptography.hazmat.primitives.serialization import Encoding

#: What is left of a server's ONE_RTT crypto buffer once the handshake is confirmed.
POST_HANDSHAKE_CRYPTO_BUFFER = 256


class Flushable(Protocol):
    def flush(self) -> None: ...


class TurnFlusher:
    """Flush each marked connection once, at the end of the current loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._marked: list[Flushable] = []

    def mark(self, conn: Flushable) -> None:
        """The caller keeps its own "already marked" flag (cheaper than a set lookup)."""
        if not self._marked:
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._flush)
        self._marked.append(conn)

    def _flush(self) -> None:
        marked, self._marked = self._marked, []
        for conn in marked:
            conn.flush()


def nothing_to_send(quic: QuicConnection) -> bool:
    """True when ``quic.datagrams_to_send()`` would build no packet now.

    Conservative: anything it does not recognise (a handshake in progress, a second
    network path, a close, a probe) answers False, and the caller transmits as usual.
    It mirrors what aioquic 1.7's ``_write_application`` writes: ACK, HANDSHAKE_DONE,
    path validation, connection ids, STREAMS_BLOCKED, MAX_DATA / MAX_STREAMS,
    MAX_STREAM_DATA, PING, CRYPTO, DATAGRAM, STOP_SENDING, RESET_STREAM, STREAM.
    """
    if (quic._datagrams_pending or quic._close_pending or quic._ping_pending
            or quic._probe_pending or not quic._handshake_confirmed
            or quic._handshake_done_pending or quic._retire_connection_ids
            or quic._streams_blocked_pending or len(quic._network_paths) != 1):
        return False
    if quic._spaces[Epoch.ONE_RTT].ack_at is not None:
        return False
    path = quic._network_paths[0]
    if path.remote_challenges or not path.is_validated:
        return False
    if any(not cid.was_sent for cid in quic._host_cids):
        return False
    max_data = quic._local_max_data
    if max_data.used * 2 > max_data.value:
        return False
    for limit in (max_data, quic._local_max_streams_bidi, quic._local_max_streams_uni):
        if limit.value != limit.sent:
            return False
    if not quic._crypto_streams[Epoch.ONE_RTT].sender.buffer_is_empty:
        return False
    for stream in quic._streams.values():
        sender = stream.sender
        if not sender.buffer_is_empty or sender.reset_pending or stream.receiver.stop_pending:
            return False
        local = stream.max_stream_data_local
        if local != stream.max_stream_data_local_sent or (
                local and stream.receiver.highest_offset * 2 > local):
            return False
    return True


def free_handshake_buffers(quic: QuicConnection) -> bool:
    """Drop the INITIAL and HANDSHAKE crypto buffers once the handshake is confirmed
    (their packet number spaces are discarded then: RFC 9001 section 4.9), and shrink a
    server's ONE_RTT one: aioquic's TLS server answers any message after the handshake
    with an alert before writing (tls.py, SERVER_POST_HANDSHAKE; session tickets are
    written with its Finished). Returns whether it did (once per connection)."""
    buffers = quic._crypto_buffers
    if not quic._handshake_confirmed or len(buffers) <= 1:
        return False
    for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE):
        buffer = buffers.get(epoch)
        if buffer is not None and buffer.tell() == 0:
            del buffers[epoch]
    one_rtt = buffers.get(Epoch.ONE_RTT)
    if (one_rtt is not None and one_rtt.tell() == 0
            and quic.tls.state == State.SERVER_POST_HANDSHAKE):
        buffers[Epoch.ONE_RTT] = Buffer(capacity=POST_HANDSHAKE_CRYPTO_BUFFER)
    return True


#: What a server's TLS writes in its HANDSHAKE flight besides its certificates, at most:
#: EncryptedExtensions with the transport parameters and ALPN, the Certificate message's
#: framing, a CertificateVerify (a 512-byte signature for RSA 4096) and Finished. About
#: 1.5 KiB; twice that.
HANDSHAKE_FLIGHT_ROOM = 4096
#: And in its INITIAL and ONE_RTT ones: a ServerHello or HelloRetryRequest (under 256
#: bytes: aioquic 1.7 has no post-quantum key share), a NewSessionTicket (~100 bytes).
SMALL_FLIGHT = 1024


def crypto_buffer_size(configuration: QuicConfiguration, epoch: Epoch) -> int:
    """Capacity of a server connection's crypto buffer for ``epoch``: what one flight of
    its TLS writes there, with room. aioquic makes each 16 KiB, whatever the chain; they
    live through the handshake, and with 32 handshakes in flight the freed buffers left
    ~1.4 MiB of holes in the heap that 100 idle peers never filled (bench/wt_memory.py).
    aioquic's size when there is no certificate to measure."""
    if configuration.certificate is None:
        return CRYPTO_BUFFER_SIZE
    if epoch != Epoch.HANDSHAKE:
        return SMALL_FLIGHT
    chain = [configuration.certificate, *configuration.certificate_chain]
    return sum(len(cert.public_bytes(Encoding.DER)) for cert in chain) + HANDSHAKE_FLIGHT_ROOM


_AIOQUIC_INITIALIZE = QuicConnection._initialize


def _initialize(self: QuicConnection, peer_cid: bytes) -> None:
    """aioquic's ``_initialize`` (a server's, on its first packet; nothing written to the
    buffers yet), then a server's crypto buffers made as :func:`crypto_buffer_size` says.
    On the class, not the instance: an 86th attribute doubles the connection's dict."""
    _AIOQUIC_INITIALIZE(self, peer_cid)
    if not self._is_client:
        config = self._configuration
        self._crypto_buffers = {epoch: Buffer(capacity=crypto_buffer_size(config, epoch))
                                for epoch in self._crypto_buffers}


QuicConnection._initialize = _initialize  # type: ignore[method-assign]


#: Connection ids the node issues to a peer: the one of the handshake and one spare, so
#: that a peer can move to a new one (RFC 9000 section 5.1.1 asks for at least 2).
HOST_CONNECTION_IDS = 2
#: And how many of the peer's the node keeps (the transport parameter's least value).
PEER_CONNECTION_IDS = 2


class FrameHandlers:
    """aioquic builds a dict of 33 (bound method, frozenset of epochs) per connection,
    ~12 KiB. This is the same mapping with one table shared by all connections: a
    lookup binds the handler (once per frame received)."""

    __slots__ = ("_quic",)
    _table: dict[int, tuple[Any, frozenset[Epoch]]] = {}

    def __init__(self, quic: QuicConnection) -> None:
        self._quic = quic
        if not FrameHandlers._table:
            interned: dict[frozenset[Epoch], frozenset[Epoch]] = {}
            FrameHandlers._table = {
                frame_type: (handler.__func__, interned.setdefault(epochs, epochs))
                for frame_type, (handler, epochs) in _frame_handlers(quic).items()}

    def __getitem__(self, frame_type: int) -> tuple[Any, frozenset[Epoch]]:
        function, epochs = self._table[frame_type]  # KeyError: an unknown frame type
        return MethodType(function, self._quic), epochs

    def __contains__(self, frame_type: object) -> bool:
        return frame_type in self._table


def _frame_handlers(quic: QuicConnection) -> Any:
    return quic._QuicConnection__frame_handlers  # type: ignore[attr-defined]


def slim_connection(quic: QuicConnection) -> None:
    """Before a server connection handles its first packet (H3Protocol.__init__)."""
    if not isinstance(_frame_handlers(quic), FrameHandlers):
        quic._QuicConnection__frame_handlers = FrameHandlers(quic)  # type: ignore[attr-defined]
    quic._local_active_connection_id_limit = PEER_CONNECTION_IDS
    if type(quic._events) is not Fifo:
        quic._events = Fifo(quic._events)  # type: ignore[assignment]
        quic._datagrams_pending = Fifo(quic._datagrams_pending)  # type: ignore[assignment]


class PacketWindow:
    """aioquic's QuicPacketNumberWindow (duplicate detection over the last 128 packet
    numbers) as bits of one int: aioquic's set grows to 256 numbers before it is pruned,
    ~9 KiB of a connection that lives long enough (a ping every WT_PING_INTERVAL)."""

    __slots__ = ("_bits", "_lower", "_size")

    def __init__(self, window: QuicPacketNumberWindow) -> None:
        self._lower: int = window._lower
        self._size: int = window._size
        self._bits = 0
        for number in window._received:
            if number >= self._lower:
                self._bits |= 1 << (number - self._lower)

    def add(self, packet_number: int) -> None:
        lower = self._lower
        if packet_number < lower:
            return
        slide = packet_number - self._size + 1 - lower
        if slide > 0:  # the packet number becomes the window's upper bound
            self._bits >>= slide
            self._lower = lower = lower + slide
        self._bits |= 1 << (packet_number - lower)

    def __contains__(self, packet_number: int) -> bool:
        offset = packet_number - self._lower
        return offset < 0 or (self._bits >> offset) & 1 == 1


#: What a discarded packet number space's keys and space are replaced with: never set
#: up (decrypting with it raises KeyUnavailableError, as aioquic's torn-down pair does),
#: never written (aioquic only reads a discarded space before the decryption fails).
_DISCARDED_CRYPTO = CryptoPair()
_DISCARDED_SPACE = QuicPacketSpace()
_DISCARDED_SPACE.discarded = True


def after_handshake(quic: QuicConnection) -> bool:
    """After each packet until it returns True: the connection ids issued to the peer
    capped at HOST_CONNECTION_IDS, the INITIAL keys of versions not negotiated dropped
    (:func:`drop_other_initial_keys`); once the handshake is confirmed and the INITIAL and
    HANDSHAKE spaces discarded (RFC 9001 section 4.9), what only the handshake used is
    dropped. Returns whether that was done (once per connection)."""
    # aioquic issues min(8, the peer's limit) ids once its handshake completes, each also
    # an entry of the server's routing table. The peer's limit is read from its
    # ClientHello, a flight before that: lowered here in between, and kept (aioquic
    # reads it nowhere else). Not with a subclass or an instance attribute: swapping
    # __class__ made aioquic's packet code ~10% slower per packet (its attribute lookups
    # seeing two types), and an 86th attribute doubles the connection's dict (+1.7 KB).
    if quic._remote_active_connection_id_limit > HOST_CONNECTION_IDS:
        quic._remote_active_connection_id_limit = HOST_CONNECTION_IDS
    drop_other_initial_keys(quic)
    spaces = quic._spaces
    if (not spaces or not quic._handshake_confirmed or spaces[Epoch.INITIAL] is _DISCARDED_SPACE
            or not all(spaces[epoch].discarded for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE))):
        return False
    free_handshake_buffers(quic)
    for epoch in (Epoch.INITIAL, Epoch.ZERO_RTT, Epoch.HANDSHAKE):
        quic._cryptos[epoch] = _DISCARDED_CRYPTO
        quic._crypto_streams.pop(epoch, None)
    spaces[Epoch.INITIAL] = spaces[Epoch.HANDSHAKE] = _DISCARDED_SPACE
    one_rtt = spaces[Epoch.ONE_RTT]
    quic._loss.spaces = [one_rtt]  # the discarded ones were emptied by aioquic
    if isinstance(one_rtt.received_packets, QuicPacketNumberWindow):
        one_rtt.received_packets = PacketWindow(one_rtt.received_packets)  # type: ignore[assignment]
    versions = tuple(quic._cryptos_initial)
    quic._cryptos_initial = _DISCARDED_INITIAL.setdefault(
        versions, dict.fromkeys(versions, _DISCARDED_CRYPTO))
    if quic.tls.state == State.SERVER_POST_HANDSHAKE:
        quic.tls = ServerTlsDone(quic.tls)  # type: ignore[assignment]
        # ServerTlsDone never writes: one empty output buffer for all (aioquic only
        # reads the dict, and each buffer's data, to push what TLS wrote).
        if set(quic._crypto_buffers) == {Epoch.ONE_RTT} and not quic._crypto_buffers[
                Epoch.ONE_RTT].tell():
            quic._crypto_buffers = _NO_TLS_OUTPUT
    return True


_NO_TLS_OUTPUT: dict[Epoch, Buffer] = {Epoch.ONE_RTT: Buffer(capacity=0)}


def drop_other_initial_keys(quic: QuicConnection) -> None:
    """A server sets up INITIAL keys for every version it supports (QUIC v1 and v2, ~5.6
    KiB of OpenSSL contexts each) and keeps them until the handshake is confirmed. Once
    the version is negotiated (the ClientHello read), only the connection's version and
    the one its client's packets carried (they differ if the server moved the client to
    another version, RFC 9368) can be used: the others answer as discarded keys do (an
    INITIAL packet of another version is dropped: KeyUnavailableError)."""
    initial = quic._cryptos_initial
    if not quic._version_negotiated_compatible or len(initial) < 2:
        return
    keep = (quic._version, quic._crypto_packet_version)
    for version, pair in initial.items():
        if version not in keep and pair is not _DISCARDED_CRYPTO:
            initial[version] = _DISCARDED_CRYPTO


#: Shared ``_cryptos_initial`` per tuple of versions: only read after the handshake (an
#: INITIAL packet's keys, which fail), never written.
_DISCARDED_INITIAL: dict[tuple[int, ...], dict[int, CryptoPair]] = {}


class ServerTlsDone:
    """What aioquic reads of a server's TLS context once its handshake is done, in place
    of the context (~4.5 KB with its key exchange keys, transcript, extensions, lists and
    logger). aioquic's server context answers any complete message after its handshake
    with AlertUnexpectedMessage (tls.py, SERVER_POST_HANDSHAKE) and buffers a partial
    one: so does this."""

    __slots__ = ("_receive_buffer", "alpn_negotiated", "client_random",
                 "early_data_accepted", "session_resumed", "state")

    def __init__(self, context: tls.Context) -> None:
        self.state = context.state
        self.alpn_negotiated = context.alpn_negotiated
        self.early_data_accepted = context.early_data_accepted
        self.session_resumed = context.session_resumed
        self.client_random = context.client_random
        self._receive_buffer: bytes = context._receive_buffer

    def handle_message(self, input_data: bytes, output_buf: dict[Epoch, Buffer]) -> None:
        buf = self._receive_buffer = self._receive_buffer + input_data
        if len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[1:4], byteorder="big"):
            raise tls.AlertUnexpectedMessage


class _NoTableEncoder:
    """pylsqpack's Encoder that never uses a dynamic table, whatever the peer allows: an
    encoder may use less than the peer's capacity (RFC 9204 section 3.2.3). With the
    4096 bytes an aioquic client allows it took 4.5 KiB per connection for the few
    response headers the node sends (112 bytes with none)."""

    __slots__ = ("_encoder",)

    def __init__(self, encoder: pylsqpack.Encoder) -> None:
        self._encoder = encoder

    def apply_settings(self, max_table_capacity: int, blocked_streams: int) -> bytes:
        return self._encoder.apply_settings(max_table_capacity=0, blocked_streams=0)

    def encode(self, stream_id: int, headers: Any) -> tuple[bytes, bytes]:
        return self._encoder.encode(stream_id, headers)

    def feed_decoder(self, data: bytes) -> None:
        self._encoder.feed_decoder(data)


class _LazyDecoder:
    """pylsqpack's Decoder holds a 4 KiB buffer inline (4.4 KiB per object). With no
    dynamic table (QPACK_MAX_TABLE_CAPACITY 0, no blocked streams) it keeps nothing
    between header blocks, so one is made for each block (a CONNECT or a GET: rare);
    a peer that writes on its encoder stream gets one for the connection's life."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder: pylsqpack.Decoder | None = None

    def feed_header(self, stream_id: int, data: bytes) -> tuple[bytes, Any]:
        return (self._decoder or pylsqpack.Decoder(0, 0)).feed_header(stream_id, data)

    def feed_encoder(self, data: bytes) -> list[int]:
        if not data and self._decoder is None:
            return []
        if self._decoder is None:
            self._decoder = pylsqpack.Decoder(0, 0)
        return self._decoder.feed_encoder(data)

    def resume_header(self, stream_id: int) -> tuple[bytes, Any]:
        # Only for a stream feed_encoder unblocked: never without a decoder.
        assert self._decoder is not None
        return self._decoder.resume_header(stream_id)

    def cancel_stream(self, stream_id: int) -> bytes:
        # Nothing to cancel without a table (RFC 9204 section 4.4.2; lsqpack writes none).
        return self._decoder.cancel_stream(stream_id) if self._decoder else b""


class SlimH3Connection(H3Connection):
    """H3 without QPACK dynamic tables (SETTINGS QPACK_MAX_TABLE_CAPACITY 0 and
    QPACK_BLOCKED_STREAMS 0, RFC 9204 section 3.2.3; our encoder uses none either): the
    node reads one CONNECT (or a few GETs) per connection, and each table and pylsqpack
    object stayed for the connection's life (~9 KiB, plus what a browser inserts)."""

    def _init_connection(self) -> None:  # called at the end of H3Connection.__init__
        self._max_table_capacity = self._blocked_streams = 0
        self._decoder = _LazyDecoder()  # type: ignore[assignment]
        self._encoder = _NoTableEncoder(self._encoder)  # type: ignore[assignment]
        super()._init_connection()
        self._sent_settings = _shared_settings(self._sent_settings)

    def _handle_control_frame(self, frame_type: int, frame_data: bytes) -> None:
        super()._handle_control_frame(frame_type, frame_data)
        if self._received_settings is not None:
            self._received_settings = _shared_settings(self._received_settings)

    def _create_uni_stream(self, stream_type: int, push_id: int | None = None) -> int:
        stream_id = super()._create_uni_stream(stream_type, push_id)
        stream = self._quic._streams.get(stream_id)
        if stream is not None:
            share_unused_half(stream)
        return stream_id

    def handle_event(self, event: QuicEvent) -> list[H3Event]:
        events = super().handle_event(event)
        if isinstance(event, StreamDataReceived) and event.stream_id % 4 == 2:
            stream = self._quic._streams.get(event.stream_id)  # the client's, one-way
            if stream is not None and stream.sender is not UNUSED_SENDER:
                share_unused_half(stream)
        return events


#: The half a unidirectional stream never uses (~300-400 bytes each: the object, its
#: range sets and buffer), one for all: the server's own uni streams never receive, the
#: client's never send. aioquic checks the direction before it would touch one
#: (``_assert_stream_can_send``/``_can_receive``, ``_get_or_create_stream_for_send``)
#: and otherwise only reads them (is_finished, buffer_is_empty, reset_pending,
#: stop_pending, highest_offset): tests/test_quic_turn.py checks both never change.
UNUSED_SENDER = QuicStreamSender(stream_id=None, writable=False)
UNUSED_RECEIVER = QuicStreamReceiver(stream_id=None, readable=False)


def share_unused_half(stream: QuicStream) -> None:
    """Replace a unidirectional stream's unused half, if untouched, by the shared one."""
    sender, receiver = stream.sender, stream.receiver
    if (sender is not UNUSED_SENDER and sender.is_finished and sender.buffer_is_empty
            and not sender.reset_pending and sender.highest_offset == 0
            and not sender._buffer and sender._buffer_fin is None):
        stream.sender = UNUSED_SENDER
    elif (receiver is not UNUSED_RECEIVER and receiver.is_finished
          and not receiver.stop_pending and receiver.highest_offset == 0
          and not receiver._buffer and receiver._final_size is None):
        stream.receiver = UNUSED_RECEIVER


#: SETTINGS dicts (only read once received or sent) shared by the connections that have
#: the same ones: a browser's are all alike. Bounded: others keep their own.
_SETTINGS: dict[tuple[tuple[int, int], ...], dict[int, int]] = {}
_SETTINGS_KINDS = 64


def _shared_settings(settings: dict[int, int] | None) -> dict[int, int] | None:
    if settings is None:
        return None
    key = tuple(sorted(settings.items()))
    shared = _SETTINGS.get(key)
    if shared is None and len(_SETTINGS) < _SETTINGS_KINDS:
        shared = _SETTINGS[key] = settings
    return shared if shared is not None else settings


class Fifo(list):  # type: ignore[type-arg]
    """The part of deque aioquic uses for its event and datagram queues, on a list: an
    empty deque takes ~700 bytes, an empty list 56, and these hold a few items at a time
    (popleft is O(n): a datagram queue is bounded by WRITE_BUFFER_LIMIT)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class BoundedFifo(Fifo):
    """Fifo with deque's ``maxlen``: the oldest item goes when a new one is one too many."""

    __slots__ = ("maxlen",)

    def __init__(self, items: Any = (), maxlen: int | None = None) -> None:
        super().__init__(items)
        self.maxlen = maxlen

    def append(self, item: Any) -> None:
        super().append(item)
        if self.maxlen is not None and len(self) > self.maxlen:
            del self[0]


class _ServerCall:
    """What aioquic's QuicServer registers per connection, ``partial(method,
    protocol=protocol)`` (~330 bytes with its keywords dict), in 56 bytes."""

    __slots__ = ("_function", "_protocol", "_server")

    def __init__(self, server: Any, function: Any, protocol: Any) -> None:
        self._server, self._function, self._protocol = server, function, protocol

    def __call__(self, *args: Any) -> None:
        self._function(self._server, *args, protocol=self._protocol)


_SERVER_HANDLERS = ("_connection_id_issued_handler", "_connection_id_retired_handler",
                    "_connection_terminated_handler")


def slim_protocol(protocol: Any) -> None:
    """The protocol's share (QuicConnectionProtocol made by QuicServer): its handlers as
    :class:`_ServerCall`, its never-awaited ``_closed`` event's waiters on a list, the
    path's challenge queues and the ONE_RTT keys' logging callbacks (no quic logger)."""
    for name in _SERVER_HANDLERS:
        handler = getattr(protocol, name, None)
        if (isinstance(handler, partial) and handler.keywords == {"protocol": protocol}
                and hasattr(handler.func, "__func__")):
            setattr(protocol, name, _ServerCall(handler.func.__self__,
                                                handler.func.__func__, protocol))
    closed = getattr(protocol, "_closed", None)
    if isinstance(closed, asyncio.Event) and not closed._waiters:
        closed._waiters = []  # type: ignore[assignment]  # append, remove, iterate only
    quic = protocol._quic
    for path in quic._network_paths:
        if not isinstance(path.remote_challenges, Fifo):
            path.remote_challenges = Fifo(path.remote_challenges)
            path.local_challenges = BoundedFifo(path.local_challenges,
                                                path.local_challenges.maxlen)
    if quic._quic_logger is None:
        pair = quic._cryptos[Epoch.ONE_RTT]
        for context in (pair.recv, pair.send):
            context._setup_cb = context._teardown_cb = NoCallback


#: For tests: every aioquic attribute read above, so a version that renames one fails
#: tests/test_quic_turn.py at once rather than silently sending less.
ATTRIBUTES: tuple[str, ...] = (
    "_datagrams_pending", "_close_pending", "_ping_pending", "_probe_pending",
    "_handshake_confirmed", "_handshake_done_pending", "_retire_connection_ids",
    "_streams_blocked_pending", "_network_paths", "_spaces", "_host_cids",
    "_local_max_data", "_local_max_streams_bidi", "_local_max_streams_uni",
    "_crypto_streams", "_streams", "_crypto_buffers", "tls", "_cryptos", "_cryptos_initial",
    "_loss", "_local_active_connection_id_limit", "_remote_active_connection_id_limit",
    "_QuicConnection__frame_handlers", "_events", "_datagrams_pending", "_quic_logger",
    "_initialize", "_is_client", "_configuration", "_version", "_crypto_packet_version",
    "_version_negotiated_compatible",
)
