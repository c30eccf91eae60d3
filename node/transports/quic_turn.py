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
  the connection's life.

These read aioquic internals (``pyproject.toml`` pins the version range;
tests/test_quic_turn.py checks each assumption against real connections).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.tls import Epoch, State

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


#: For tests: every aioquic attribute read above, so a version that renames one fails
#: tests/test_quic_turn.py at once rather than silently sending less.
ATTRIBUTES: tuple[str, ...] = (
    "_datagrams_pending", "_close_pending", "_ping_pending", "_probe_pending",
    "_handshake_confirmed", "_handshake_done_pending", "_retire_connection_ids",
    "_streams_blocked_pending", "_network_paths", "_spaces", "_host_cids",
    "_local_max_data", "_local_max_streams_bidi", "_local_max_streams_uni",
    "_crypto_streams", "_streams", "_crypto_buffers", "tls",
)
