"""node/transports/quic_turn.py reads aioquic internals: each assumption checked on a real
client/server pair of aioquic connections exchanging packets in memory (sans-I/O)."""

from __future__ import annotations

import asyncio
import gc
import random
import ssl
import tracemalloc
from pathlib import Path

import pytest
from aioquic import tls
from aioquic.h3.connection import H3Connection, Setting
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import CRYPTO_BUFFER_SIZE, QuicConnection
from aioquic.quic.events import ProtocolNegotiated
from aioquic.quic.packet import QuicProtocolVersion
from aioquic.quic.recovery import QuicPacketNumberWindow
from aioquic.tls import Epoch

from node.tls import ensure_certificate
from node.transports import quic_turn
from node.transports.quic_turn import (
    ATTRIBUTES,
    HANDSHAKE_FLIGHT_ROOM,
    HOST_CONNECTION_IDS,
    PEER_CONNECTION_IDS,
    POST_HANDSHAKE_CRYPTO_BUFFER,
    SMALL_FLIGHT,
    UNUSED_RECEIVER,
    UNUSED_SENDER,
    BoundedFifo,
    Fifo,
    PacketWindow,
    ServerTlsDone,
    SlimH3Connection,
    after_handshake,
    crypto_buffer_size,
    free_handshake_buffers,
    nothing_to_send,
    slim_connection,
)
from node.transports.wt_session import Inbox

CLIENT = ("127.0.0.1", 40001)
SERVER = ("127.0.0.1", 40002)


class Pair:
    """A client and a server connection; every packet the server builds is checked."""

    def __init__(self, tmp: Path) -> None:
        cert = ensure_certificate("", "", tmp)
        server_config = QuicConfiguration(is_client=False, alpn_protocols=["h3"],
                                          max_datagram_frame_size=65536)
        server_config.load_cert_chain(cert.cert_file, cert.key_file)
        client_config = QuicConfiguration(is_client=True, alpn_protocols=["h3"],
                                          max_datagram_frame_size=65536,
                                          server_name="localhost")
        client_config.verify_mode = ssl.CERT_NONE
        self.now = 1.0
        self.client = QuicConnection(configuration=client_config)
        self.server = QuicConnection(configuration=server_config,
                                     original_destination_connection_id=
                                     self.client.original_destination_connection_id)
        self.client.connect(SERVER, now=self.now)
        #: How often the server was idle (nothing_to_send), and how often it built packets.
        self.idle = 0
        self.busy = 0

    def server_send(self) -> list[bytes]:
        idle = nothing_to_send(self.server)
        out = [data for data, _ in self.server.datagrams_to_send(now=self.now)]
        if idle:
            assert out == [], "nothing_to_send() said idle but aioquic built a packet"
            self.idle += 1
        else:
            self.busy += 1
        return out

    def exchange(self, steps: int = 20) -> None:
        """Packets both ways until quiet, time moving on so that delayed ACKs go too."""
        for _ in range(steps):
            moved = False
            for data, _ in self.client.datagrams_to_send(now=self.now):
                self.server.receive_datagram(data, CLIENT, now=self.now)
                moved = True
            self.server_received()
            for data in self.server_send():
                self.client.receive_datagram(data, SERVER, now=self.now)
                moved = True
            self.client_received()
            self.now += 0.005
            if not moved:
                self.server_send()  # idle now: must agree with aioquic
                return
        raise AssertionError("the pair never went quiet")

    def server_received(self) -> None:
        """What the server's application does with its events (none here)."""

    def client_received(self) -> None:
        """What the client's application does with its events (none here)."""


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    p = Pair(tmp_path)
    p.exchange()
    assert p.server._handshake_confirmed and p.client._handshake_confirmed
    return p


def test_every_internal_read_exists(pair: Pair) -> None:
    for name in ATTRIBUTES:
        assert hasattr(pair.server, name), name


def test_idle_only_when_aioquic_would_build_nothing(pair: Pair) -> None:
    server, client = pair.server, pair.client
    # Datagrams both ways, a stream both ways, a ping, a reset: after each, the server's
    # packets are built (or not) with the check in Pair.server_send.
    for i in range(30):
        client.send_datagram_frame(b"c%d" % i)
        server.send_datagram_frame(b"s%d" % i)
        assert not nothing_to_send(server)
        pair.exchange()
    stream = client.get_next_available_stream_id()
    client.send_stream_data(stream, b"x" * 50_000)
    pair.exchange()
    server.send_stream_data(stream, b"y" * 50_000, end_stream=True)
    assert not nothing_to_send(server)
    pair.exchange()
    server.send_ping(7)
    assert not nothing_to_send(server)
    pair.exchange()
    uni = server.get_next_available_stream_id(is_unidirectional=True)
    server.send_stream_data(uni, b"z" * 100)
    server.reset_stream(uni, 0)
    assert not nothing_to_send(server)
    pair.exchange()
    assert pair.idle > 10 and pair.busy > 10  # both answers were exercised


def test_handshake_buffers_freed_and_the_connection_goes_on(pair: Pair) -> None:
    server = pair.server
    assert set(server._crypto_buffers) == {Epoch.INITIAL, Epoch.HANDSHAKE, Epoch.ONE_RTT}
    assert free_handshake_buffers(server)
    assert set(server._crypto_buffers) == {Epoch.ONE_RTT}
    assert server._crypto_buffers[Epoch.ONE_RTT].capacity == POST_HANDSHAKE_CRYPTO_BUFFER
    assert not free_handshake_buffers(server)  # once
    pair.client.send_datagram_frame(b"after")
    server.send_datagram_frame(b"after")
    pair.exchange()
    assert pair.server._state.name == "CONNECTED"


def test_a_tls_message_after_the_handshake_is_an_alert_not_a_write(pair: Pair) -> None:
    """Why the small ONE_RTT buffer is enough: the TLS server refuses before writing."""
    server = pair.server
    free_handshake_buffers(server)
    with pytest.raises(tls.AlertUnexpectedMessage):
        server.tls.handle_message(b"\x04\x00\x00\x00", server._crypto_buffers)
    assert server._crypto_buffers[Epoch.ONE_RTT].tell() == 0


def test_not_freed_before_the_handshake_is_confirmed(tmp_path: Path) -> None:
    p = Pair(tmp_path)
    first_flight(p)
    assert len(p.server._crypto_buffers) == 3 and not p.server._handshake_confirmed
    assert not free_handshake_buffers(p.server)
    assert len(p.server._crypto_buffers) == 3


def first_flight(p: Pair) -> None:
    for data, _ in p.client.datagrams_to_send(now=p.now):  # the client's first flight only
        p.server.receive_datagram(data, CLIENT, now=p.now)


def test_a_servers_crypto_buffers_are_sized_to_its_certificate(tmp_path: Path) -> None:
    p = Pair(tmp_path)
    first_flight(p)
    config = p.server._configuration
    sizes = {e: crypto_buffer_size(config, e) for e in (Epoch.INITIAL, Epoch.HANDSHAKE,
                                                          Epoch.ONE_RTT)}
    assert sizes[Epoch.HANDSHAKE] < CRYPTO_BUFFER_SIZE / 2  # the node's certificate: small
    assert sizes[Epoch.INITIAL] == sizes[Epoch.ONE_RTT] == SMALL_FLIGHT
    # aioquic's _initialize made the three (nothing written yet) and only those.
    assert {e: b.capacity for e, b in p.server._crypto_buffers.items()} == sizes
    assert {b.capacity for b in p.client._crypto_buffers.values()} == {CRYPTO_BUFFER_SIZE}
    p.exchange()
    assert p.server._handshake_confirmed and p.client._handshake_confirmed


def test_each_flight_fits_its_buffer_with_room(tmp_path: Path) -> None:
    """Session tickets on (a NewSessionTicket in ONE_RTT): what the server wrote in each
    epoch (its crypto stream's length) is at most half its buffer."""
    p = Pair(tmp_path)
    tickets: list[tls.SessionTicket] = []
    p.client = QuicConnection(configuration=p.client._configuration,
                              session_ticket_handler=tickets.append)
    p.server = QuicConnection(configuration=p.server._configuration,
                              original_destination_connection_id=
                              p.client.original_destination_connection_id,
                              session_ticket_handler=tickets.append)
    p.client.connect(SERVER, now=p.now)
    p.exchange()
    assert len(tickets) == 2  # issued by the server, received by the client
    for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE, Epoch.ONE_RTT):
        written = p.server._crypto_streams[epoch].sender.highest_offset
        assert 0 < written * 2 <= crypto_buffer_size(p.server._configuration, epoch), epoch


def test_a_chain_longer_than_aioquics_buffer_still_fits(tmp_path: Path) -> None:
    """60 copies of the certificate in the chain: the HANDSHAKE flight is more than
    aioquic's 16 KiB (its own buffer would raise BufferWriteError), here it is sized."""
    p = Pair(tmp_path)
    config = p.server._configuration
    config.certificate_chain = [config.certificate] * 60
    assert crypto_buffer_size(config, Epoch.HANDSHAKE) > CRYPTO_BUFFER_SIZE + HANDSHAKE_FLIGHT_ROOM
    first_flight(p)
    assert p.server._crypto_streams[Epoch.HANDSHAKE].sender._buffer  # the flight, written
    p.exchange(steps=60)
    assert p.server._handshake_confirmed and p.client._handshake_confirmed
    assert len(p.client.tls._peer_certificate_chain) == 60


V1, V2 = QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2


@pytest.mark.parametrize(("client_versions", "first", "version", "kept"), [
    ([V1, V2], V1, V1, {V1}),  # a browser: QUIC v1
    ([V2, V1], V2, V2, {V2}),  # v2 from the first packet
    ([V2, V1], V1, V2, {V1, V2}),  # moved from v1 to v2 (RFC 9368): v1 Initials may follow
])
def test_only_the_negotiated_versions_initial_keys_stay(
        tmp_path: Path, client_versions: list[int], first: int, version: int,
        kept: set[int]) -> None:
    p = Pair(tmp_path)
    config = p.client._configuration
    config.supported_versions, config.original_version = client_versions, first
    p.client = QuicConnection(configuration=config)
    p.server = QuicConnection(configuration=p.server._configuration,
                              original_destination_connection_id=
                              p.client.original_destination_connection_id)
    p.client.connect(SERVER, now=p.now)
    first_flight(p)
    assert set(p.server._cryptos_initial) == {V1, V2}  # aioquic: one pair per version
    assert not after_handshake(p.server)  # the handshake goes on
    pairs = p.server._cryptos_initial
    assert {v for v, pair in pairs.items() if pair is not quic_turn._DISCARDED_CRYPTO} == kept
    assert p.server._version == version and p.server._cryptos[Epoch.INITIAL] is pairs[version]
    p.exchange()
    assert p.server._handshake_confirmed and p.client._handshake_confirmed
    assert p.client._version == version


def test_an_initial_packet_of_a_dropped_version_is_dropped(tmp_path: Path) -> None:
    """A v2 Initial to the same connection ids once v1 is negotiated: not read, no error."""
    p = Pair(tmp_path)
    first_flight(p)
    after_handshake(p.server)
    config = p.client._configuration
    other = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=["h3"], server_name="localhost",
        supported_versions=[V2], verify_mode=ssl.CERT_NONE))
    other._peer_cid.cid = p.client._peer_cid.cid  # the keys a v2 Initial would use
    other._packet_number = 100  # not a duplicate of the client's (those are dropped anyway)
    other.connect(SERVER, now=p.now)
    received = p.server._spaces[Epoch.INITIAL].ack_queue.bounds()
    for data, _ in other.datagrams_to_send(now=p.now):
        p.server.receive_datagram(data, CLIENT, now=p.now)
    assert p.server._spaces[Epoch.INITIAL].ack_queue.bounds() == received
    assert config.supported_versions[0] == V1
    p.exchange()
    assert p.server._handshake_confirmed and p.client._handshake_confirmed


# -- what an idle connection keeps (slim_connection, after_handshake, SlimH3Connection) ----


class SlimPair(Pair):
    """A Pair whose server is slimmed as H3Protocol does it, with HTTP/3 on both sides."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        slim_connection(self.server)
        self.client_h3 = H3Connection(self.client, enable_webtransport=True)
        self.server_h3: SlimH3Connection | None = None
        self.requests: list[tuple[int, dict[bytes, bytes]]] = []
        self.responses: list[dict[bytes, bytes]] = []
        self.slimmed = False

    def client_received(self) -> None:
        while (event := self.client.next_event()) is not None:
            for h3_event in self.client_h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived):
                    self.responses.append(dict(h3_event.headers))

    def server_received(self) -> None:
        while (event := self.server.next_event()) is not None:
            if isinstance(event, ProtocolNegotiated):
                self.server_h3 = SlimH3Connection(self.server, enable_webtransport=True)
            if self.server_h3 is not None:
                for h3_event in self.server_h3.handle_event(event):
                    if isinstance(h3_event, HeadersReceived):
                        self.requests.append((h3_event.stream_id, dict(h3_event.headers)))
        if not self.slimmed:
            self.slimmed = after_handshake(self.server)

    def request(self, path: bytes) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client_h3.send_headers(stream_id, [
            (b":method", b"CONNECT"), (b":protocol", b"webtransport"), (b":scheme", b"https"),
            (b":authority", b"localhost"), (b":path", path)])
        self.exchange()
        return stream_id

    def respond(self, stream_id: int) -> None:
        assert self.server_h3 is not None
        self.server_h3.send_headers(stream_id, [
            (b":status", b"200"), (b"sec-webtransport-http3-draft", b"draft02"),
            (b"server", b"prscd/test"), (b"x-prscd-meshid", b"test")])
        self.exchange()


@pytest.fixture
def slim(tmp_path: Path) -> SlimPair:
    p = SlimPair(tmp_path)
    p.exchange()
    assert p.slimmed and p.server._handshake_confirmed
    return p


def test_slim_connection_serves_requests_datagrams_streams_pings(slim: SlimPair) -> None:
    server, client = slim.server, slim.client
    for i in range(3):
        stream_id = slim.request(b"/v1?id=%d" % i)
        assert slim.requests[-1] == (stream_id, {
            b":method": b"CONNECT", b":protocol": b"webtransport", b":scheme": b"https",
            b":authority": b"localhost", b":path": b"/v1?id=%d" % i})
        slim.respond(stream_id)
        assert slim.responses[-1][b":status"] == b"200"
    for i in range(300):  # past aioquic's 256-number window: the bit window slides
        client.send_datagram_frame(b"c%d" % i)
        server.send_datagram_frame(b"s%d" % i)
        if i % 50 == 0:
            server.send_ping(i)
        slim.exchange()
    # A WebTransport stream (its signal value and session id first) of 50 kB.
    stream = client.get_next_available_stream_id(is_unidirectional=True)
    client.send_stream_data(stream, b"\x40\x54\x00" + b"x" * 50_000, end_stream=True)
    slim.exchange()
    reset = client.get_next_available_stream_id(is_unidirectional=True)
    client.send_stream_data(reset, b"\x40\x54\x00" + b"y" * 3000)
    client.reset_stream(reset, 0)  # a one-way stream of the client's, reset
    slim.exchange()
    client.request_key_update()  # the ONE_RTT keys' callbacks were replaced
    client.send_datagram_frame(b"after the key update")
    slim.exchange()
    shared = [(sid, s) for sid, s in server._streams.items() if sid % 4 in (2, 3)]
    assert {sid % 4 for sid, s in shared if s.sender is UNUSED_SENDER} == {2}
    assert {sid % 4 for sid, s in shared if s.receiver is UNUSED_RECEIVER} == {3}
    assert len(shared) >= 6
    for half in (UNUSED_SENDER, UNUSED_RECEIVER):  # read, never written
        assert half.is_finished and half.highest_offset == 0 and not half._buffer
    assert UNUSED_SENDER.buffer_is_empty and not UNUSED_SENDER.reset_pending
    assert not list(UNUSED_SENDER._acked) and not list(UNUSED_SENDER._pending)
    assert not UNUSED_RECEIVER.stop_pending and not list(UNUSED_RECEIVER._ranges)
    assert server._state.name == "CONNECTED", server._close_event
    assert client._state.name == "CONNECTED", client._close_event
    assert slim.idle > 10 and slim.busy > 10


def test_slim_connection_keeps_less(slim: SlimPair, pair: Pair) -> None:
    server = slim.server
    # No attribute added: aioquic's connection has 85, one more doubles its dict (+1.7 KB).
    assert set(vars(server)) == set(vars(pair.server))
    assert len(server._host_cids) == HOST_CONNECTION_IDS
    assert len(slim.client._host_cids) == PEER_CONNECTION_IDS  # what the node allowed it
    assert set(server._crypto_streams) == {Epoch.ONE_RTT}
    assert server._loss.spaces == [server._spaces[Epoch.ONE_RTT]]
    assert isinstance(server._spaces[Epoch.ONE_RTT].received_packets, PacketWindow)
    assert isinstance(server.tls, ServerTlsDone)
    with pytest.raises(tls.AlertUnexpectedMessage):  # as aioquic's context after its handshake
        server.tls.handle_message(b"\x04\x00", server._crypto_buffers)  # (partial: kept)
        server.tls.handle_message(b"\x00\x00", server._crypto_buffers)
    assert server._crypto_buffers[Epoch.ONE_RTT].tell() == 0
    stream_id = slim.request(b"/v1")
    slim.respond(stream_id)
    assert slim.server_h3 is not None
    assert slim.server_h3._sent_settings is not None
    assert slim.server_h3._sent_settings[Setting.QPACK_MAX_TABLE_CAPACITY] == 0
    assert slim.server_h3._decoder._decoder is None  # made for the CONNECT, then dropped
    assert not after_handshake(server)  # once


def test_a_late_handshake_packet_and_a_close_after_slimming(tmp_path: Path) -> None:
    p = SlimPair(tmp_path)
    first = [data for data, _ in p.client.datagrams_to_send(now=p.now)]
    for data in first:
        p.server.receive_datagram(data, CLIENT, now=p.now)
    p.exchange()
    assert p.slimmed
    for data in first:  # INITIAL packets again: their keys are gone, they are dropped
        p.server.receive_datagram(data, CLIENT, now=p.now)
    p.client.send_datagram_frame(b"still here")
    p.exchange()
    assert p.server._state.name == "CONNECTED"
    p.server.close(error_code=0x100, reason_phrase="bye")
    p.exchange()
    p.now += 10
    p.server.handle_timer(now=p.now)  # the end of closing: every space discarded
    assert p.server._state.name == "TERMINATED"


def test_frame_handlers_are_aioquics(tmp_path: Path) -> None:
    plain = Pair(tmp_path).server
    table = plain._QuicConnection__frame_handlers  # type: ignore[attr-defined]
    slimmed = Pair(tmp_path).server
    slim_connection(slimmed)
    handlers = slimmed._QuicConnection__frame_handlers  # type: ignore[attr-defined]
    for frame_type, (method, epochs) in table.items():
        bound, slim_epochs = handlers[frame_type]
        assert bound.__func__ is method.__func__ and bound.__self__ is slimmed
        assert slim_epochs == epochs
    with pytest.raises(KeyError):
        handlers[0x99]


@pytest.mark.parametrize("seed", range(20))
def test_packet_window_answers_as_aioquics(seed: int) -> None:
    rng = random.Random(seed)
    theirs = QuicPacketNumberWindow()
    ours = PacketWindow(QuicPacketNumberWindow())
    number = 0
    for _ in range(3000):
        step = rng.choice([1, 1, 1, 2, 5, -3, -40, -130, 0, 200, 1000])
        number = max(0, number + step)
        for probe in range(number - 300, number + 300, 7):
            assert (probe in ours) == (probe in theirs), (seed, number, probe)
        if number not in theirs:
            theirs.add(number)
            ours.add(number)
    copied = PacketWindow(theirs)
    for probe in range(number - 300, number + 300):
        assert (probe in copied) == (probe in theirs)


def test_fifo_is_the_deque_aioquic_uses() -> None:
    queue = Fifo()
    with pytest.raises(IndexError):  # what next_event() catches when there is none
        queue.popleft()
    queue.append(1)
    queue.append(2)
    assert queue[0] == 1 and queue.popleft() == 1 and len(queue) == 1
    bounded = BoundedFifo(maxlen=3)
    for i in range(5):
        bounded.append(i)
    assert list(bounded) == [2, 3, 4] and 3 in bounded
    bounded.clear()
    assert not bounded


def test_slim_server_connection_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    """What one idle server connection with a session keeps (Python objects), slimmed
    and not (aioquic's own _initialize: 16 KiB crypto buffers); measured 56.7 KB and
    27.3 KB with aioquic 1.7 (bench/wt_memory.py)."""

    def kept(pair_type: type[Pair]) -> int:
        with monkeypatch.context() as patch:
            if pair_type is Pair:
                patch.setattr(QuicConnection, "_initialize", quic_turn._AIOQUIC_INITIALIZE)
            pair = pair_type(tmp_path)
            pair.exchange()  # the server's _initialize: on its first packet
        if isinstance(pair, SlimPair):
            pair.respond(pair.request(b"/v1"))
        gc.collect()
        before = tracemalloc.take_snapshot()
        pair.server = None  # type: ignore[assignment]
        if isinstance(pair, SlimPair):
            pair.server_h3 = None
        gc.collect()
        after = tracemalloc.take_snapshot()
        return sum(s.size_diff for s in before.compare_to(after, "filename"))

    tracemalloc.start()
    try:
        plain, slimmed = kept(Pair), kept(SlimPair)
    finally:
        tracemalloc.stop()
    assert plain > 40_000, plain
    assert slimmed < 30_000, slimmed


async def test_session_inbox_is_a_queue_for_one_reader() -> None:
    inbox = Inbox()
    inbox.put_nowait(b"a")
    inbox.put_nowait(b"b")
    assert inbox.qsize() == 2
    assert await inbox.get() == b"a" and await inbox.get() == b"b" and inbox.qsize() == 0
    reader = asyncio.get_running_loop().create_task(inbox.get())
    await asyncio.sleep(0)
    assert not reader.done()  # waits for the next frame
    inbox.put_nowait(None)  # the end of a session
    assert await asyncio.wait_for(reader, 1) is None
    cancelled = asyncio.get_running_loop().create_task(inbox.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    inbox.put_nowait(b"c")  # no waiter left behind
    assert await inbox.get() == b"c"
