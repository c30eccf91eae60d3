"""node/transports/quic_turn.py reads aioquic internals: each assumption checked on a real
client/server pair of aioquic connections exchanging packets in memory (sans-I/O)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import Epoch

from node.tls import ensure_certificate
from node.transports.quic_turn import (
    ATTRIBUTES,
    POST_HANDSHAKE_CRYPTO_BUFFER,
    free_handshake_buffers,
    nothing_to_send,
)

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
            for data in self.server_send():
                self.client.receive_datagram(data, SERVER, now=self.now)
                moved = True
            self.now += 0.005
            if not moved:
                self.server_send()  # idle now: must agree with aioquic
                return
        raise AssertionError("the pair never went quiet")


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
    for data, _ in p.client.datagrams_to_send(now=p.now):  # the client's first flight only
        p.server.receive_datagram(data, CLIENT, now=p.now)
    assert len(p.server._crypto_buffers) == 3 and not p.server._handshake_confirmed
    assert not free_handshake_buffers(p.server)
    assert len(p.server._crypto_buffers) == 3
