"""Worker commands for the WebTransport fan-out (``bench/wt_fanout.py``).

Receivers are aioquic WebTransport clients (``testkit.wt_client``) that join like the
real client (a datagram ``channel_join``) and then only count datagrams; they sit in
``WorkerState.peers`` beside WebSocket ones, so ``snapshot``, ``open_count`` and
``close_all`` of ``bench.clients`` work for both. The sender is one WebSocket peer.

Datagrams may be lost (the clients' socket buffers on a busy machine), so the sender's
window does not wait for a lost one forever: after ``STALL`` seconds without progress
the outstanding messages are given up and counted (``stalls``).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from aioquic.h3.events import DatagramReceived
from aioquic.quic.events import QuicEvent

from bench.clients import (
    WorkerState,
    _open,
    _track,
    command,
    fanout_start,
    join_frame,
)
from bench.wsclient import WSPeer
from testkit.wt_client import WTClient, close_client, open_client

#: A data message as the node encodes it (node/protocol.py encode_data), after the map's
#: one-byte header: the key "t" and the value "data".
DATA_HEAD = b"\xa1t\xa4data"
#: Seconds without any message completing before the window gives up on the outstanding ones.
STALL = 0.5


class WTReceiver(WTClient):
    """A WebTransport peer that counts data datagrams once joined (no decoding, no list)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_id = ""
        self.count = 0
        self.counting = False
        self.paused_reading = False
        self.on_count: Any = None
        self.close_code: int | None = None
        self.close_reason = ""

    @property
    def open(self) -> bool:
        return self.terminated is None and not self.vanished

    def quic_event_received(self, event: QuicEvent) -> None:
        if not self.counting:
            super().quic_event_received(event)
            return
        for h3_event in self.h3.handle_event(event):
            # Only data messages: presence datagrams in a phase (a peer found silent and
            # heard again re-announces, node/silence.py) made "lost" negative under load.
            if isinstance(h3_event, DatagramReceived) and \
                    h3_event.data.startswith(DATA_HEAD, 1):
                self.count += 1
                if self.on_count is not None:
                    self.on_count(self.count)
        if self.terminated is None and type(event).__name__ == "ConnectionTerminated":
            self.terminated = event  # type: ignore[assignment]
            self.close_code = event.error_code  # type: ignore[attr-defined]
            self.close_reason = event.reason_phrase  # type: ignore[attr-defined]

    def close(self) -> None:  # type: ignore[override]  # as WSPeer.close: no arguments
        if not self.vanished and self.terminated is None:
            super().close()
        self.vanish()


async def _open_wt(state: WorkerState, port: int, ids: list[str], channel: str,
                   concurrency: int, timeout: float) -> tuple[list[WTReceiver], list[str]]:
    sem = asyncio.Semaphore(concurrency)
    errors: list[str] = []
    peers: list[WTReceiver | None] = [None] * len(ids)

    async def one(i: int, cid: str) -> None:
        async with sem:
            for attempt in range(3):
                client: WTReceiver | None = None
                try:
                    client = await open_client(port, WSPeer.v1_path(cid), timeout=timeout,
                                               client_class=WTReceiver)  # type: ignore[assignment]
                    assert client is not None
                    if client.status != 200:
                        raise ConnectionError(f"status {client.status}")
                    client.client_id = cid
                    # Room for a burst while this process serves its other receivers: a loss
                    # here is the load generator's, not the node's.
                    sock = client._transport.get_extra_info("socket")  # type: ignore[union-attr]
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                    client.send_datagram(join_frame(channel, cid))
                    await client.next_message(20.0, match=lambda m: m.get("op") == "channel_join")
                    client.counting = True
                    peers[i] = client
                    return
                except (OSError, TimeoutError, ConnectionError, AssertionError) as exc:
                    if client is not None:
                        await close_client(client, 0.1)
                    if attempt == 2:
                        errors.append(f"{cid}: {type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(one(i, cid) for i, cid in enumerate(ids)))
    opened = [p for p in peers if p is not None]
    state.peers.extend(opened)  # type: ignore[arg-type]
    return opened, errors


@command
async def wt_fanout_receivers(state: WorkerState, port: int, ids: list[str],
                              transport: str = "webtransport", channel: str = "bench",
                              sender_id: str | None = None,
                              concurrency: int = 16, timeout: float = 10.0) -> dict[str, Any]:
    """Connect and join ``ids`` over ``transport`` (TLS), and the WebSocket sender if asked."""
    t0 = time.monotonic()
    if transport == "webtransport":
        opened, errors = await _open_wt(state, port, ids, channel, concurrency, timeout)
    else:
        opened, errors = await _open(state, port, ids, tls=True, sources=["127.0.0.1"],  # type: ignore[assignment]
                                     concurrency=concurrency * 3, channel=channel)
    if len(opened) != len(ids):
        raise RuntimeError(f"only {len(opened)}/{len(ids)} {transport} receivers: {errors[:3]}")
    if sender_id is not None:
        senders, errors = await _open(state, port, [sender_id], tls=True,
                                      sources=["127.0.0.1"], concurrency=1, channel=channel)
        if not senders:
            raise RuntimeError(f"sender did not connect: {errors}")
        state.peers.remove(senders[0])
        state.sender = senders[0]
    return {"opened": len(opened), "seconds": time.monotonic() - t0}


@command
async def wt_fanout_start(state: WorkerState, size: int = 64, window: int = 32,
                          channel: str = "bench") -> int:
    """Count from zero and send with ``window`` messages in flight (sender's worker only):
    ``bench.clients.fanout_start`` with a watchdog for lost datagrams."""
    for peer in state.peers:
        peer.count = 0
    on_count = _track(state, len(state.peers))
    for peer in state.peers:
        peer.on_count = on_count
    state.extra["stalls"] = 0

    async def watchdog() -> None:
        last = -1
        while state.running:
            await asyncio.sleep(STALL)
            if state.running and state.done_upto == last and state.sent > state.done_upto:
                state.extra["stalls"] += 1  # lost datagrams: give up on what is outstanding
                state.done_upto = state.sent
                state.progress.set()
            last = state.done_upto

    frame = await fanout_start(state, size=size, window=window, channel=channel)
    state.tasks.append(asyncio.get_running_loop().create_task(watchdog()))
    return frame


@command
async def wt_fanout_stop(state: WorkerState) -> dict[str, int]:
    state.running = False
    state.progress.set()
    for task in state.tasks:
        await task
    state.tasks.clear()
    return {"sent": state.sent, "stalls": state.extra.get("stalls", 0)}


@command
async def wt_reset_counts(state: WorkerState) -> int:
    """Zero every receiver's count (between phases); returns what they had."""
    total = sum(p.count for p in state.peers)
    for peer in state.peers:
        peer.count = 0
        peer.on_count = None
    return total
