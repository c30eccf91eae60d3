"""Commands the client workers run (each in its own process, see ``bench.procs.Pool``).

Every command is ``async def cmd(state, **kwargs) -> picklable``. Peers live in
``WorkerState`` between commands so a benchmark can connect, then start a load,
then take snapshots while the load runs, then tear down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from bench.wsclient import WSPeer, client_frame
from testkit.net import insecure


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def join_frame(channel: str, client_id: str) -> bytes:
    return pack({"t": "control", "op": "channel_join", "c": channel,
                 "pl": pack({"id": client_id, "name": client_id})})


def control_frame(op: str, channel: str, pl: bytes | None = None) -> bytes:
    body: dict[str, Any] = {"t": "control", "op": op, "c": channel}
    if pl is not None:
        body["pl"] = pl
    return pack(body)


def data_frame(channel: str, size: int, event: str = "m", stamp: int | None = None) -> bytes:
    """A ``data`` message of exactly ``size`` bytes (padding in the JSON string)."""
    def build(pad: int) -> bytes:
        data = "x" * pad if stamp is None else f"{stamp:020d}" + "x" * pad
        return pack({"t": "data", "c": channel, "pl": pack({"event": event, "data": data})})

    frame = build(0)
    if len(frame) > size:
        return frame
    pad = size - len(frame)
    frame = build(pad)
    while len(frame) > size and pad > 0:  # msgpack length prefixes may grow by a byte
        pad -= 1
        frame = build(pad)
    return frame


class WorkerState:
    def __init__(self, index: int) -> None:
        self.index = index
        self.peers: list[WSPeer] = []
        self.sender: WSPeer | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.done_upto = 0
        self.reached: list[int] = [0]
        self.progress = asyncio.Event()
        self.sent = 0
        self.running = False
        self.latencies: list[int] = []
        self.extra: dict[str, Any] = {}

    async def shutdown(self) -> None:
        await close_all(self)


Command = Callable[..., Awaitable[Any]]
COMMANDS: dict[str, Command] = {}


def command(fn: Command) -> Command:
    COMMANDS[fn.__name__] = fn
    return fn


async def _open(state: WorkerState, port: int, ids: list[str], *, tls: bool,
                sources: list[str], concurrency: int, channel: str | None,
                channels: int = 0, host: str = "127.0.0.1") -> tuple[list[WSPeer], list[str]]:
    """Connect (and join ``channel``, waiting for the ack) ``ids``; returns peers and errors."""
    ctx = insecure() if tls else None
    sem = asyncio.Semaphore(concurrency)
    errors: list[str] = []
    peers: list[WSPeer | None] = [None] * len(ids)

    async def one(i: int, cid: str) -> None:
        async with sem:
            for attempt in range(3):
                try:
                    peer = await WSPeer.connect(host, port, WSPeer.v1_path(cid), cid,
                                                source=sources[i % len(sources)], ssl=ctx)
                    if channel is not None:
                        name = f"{channel}-{i % channels}" if channels else channel
                        peer.send(join_frame(name, cid))
                        await peer.wait_count(1)
                        peer.count = 0
                    peers[i] = peer
                    return
                except (OSError, TimeoutError, ConnectionError) as exc:
                    if attempt == 2:
                        errors.append(f"{cid}: {type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(one(i, cid) for i, cid in enumerate(ids)))
    opened = [p for p in peers if p is not None]
    state.peers.extend(opened)
    return opened, errors


@command
async def connect(state: WorkerState, port: int, ids: list[str], tls: bool = False,
                  sources: list[str] | None = None, concurrency: int = 50,
                  channel: str | None = "bench", channels: int = 0) -> dict[str, Any]:
    """Connect ``ids`` (joining ``channel``, or ``channel-<i % channels>``)."""
    t0 = time.monotonic()
    opened, errors = await _open(state, port, ids, tls=tls, sources=sources or ["127.0.0.1"],
                                 concurrency=concurrency, channel=channel, channels=channels)
    return {"opened": len(opened), "errors": errors[:5], "n_errors": len(errors),
            "seconds": time.monotonic() - t0}


@command
async def open_count(state: WorkerState) -> dict[str, Any]:
    codes = Counter(p.close_code for p in state.peers if not p.open)
    return {"open": sum(p.open for p in state.peers), "closed": sum(codes.values()),
            "codes": {str(k): v for k, v in codes.items()},
            "reasons": sorted({p.close_reason for p in state.peers if p.close_reason})[:5]}


@command
async def close_all(state: WorkerState) -> int:
    for task in state.tasks:
        task.cancel()
    for task in state.tasks:
        with contextlib.suppress(BaseException):
            await task
    state.tasks.clear()
    state.running = False
    peers = [*state.peers, *([state.sender] if state.sender else [])]
    for peer in peers:
        peer.close()
    state.peers.clear()
    state.sender = None
    await asyncio.sleep(0.05)
    return len(peers)


# -- fan-out ------------------------------------------------------------------------------


def _track(state: WorkerState, n_local: int) -> Callable[[int], None]:
    """Window bookkeeping: message k is done when all ``n_local`` receivers here have it."""
    reached = state.reached = [0]
    state.done_upto = 0
    state.sent = 0

    def on_count(count: int) -> None:
        if count >= len(reached):
            reached.append(0)
        reached[count] += 1
        if reached[count] == n_local:
            state.done_upto = count
            state.progress.set()

    return on_count


@command
async def fanout_receivers(state: WorkerState, port: int, ids: list[str], tls: bool = False,
                           sources: list[str] | None = None, channel: str = "bench",
                           sender_id: str | None = None, slow: int = 0) -> dict[str, Any]:
    """Connect and join receivers (and the sender, if ``sender_id``); ``slow`` never read."""
    info = await connect(state, port, ids, tls=tls, sources=sources, channel=channel)
    if info["opened"] != len(ids):
        raise RuntimeError(f"only {info['opened']}/{len(ids)} receivers connected: {info}")
    for peer in state.peers[:slow]:
        peer.stop_reading()
    if sender_id is not None:
        fast = state.peers[slow:]
        on_count = _track(state, len(fast))
        for peer in fast:
            peer.on_count = on_count
        opened, errors = await _open(state, port, [sender_id], tls=tls, sources=["127.0.0.1"],
                                     concurrency=1, channel=channel)
        if not opened:
            raise RuntimeError(f"sender did not connect: {errors}")
        state.peers.remove(opened[0])
        state.sender = opened[0]
    return info


@command
async def fanout_start(state: WorkerState, size: int = 64, window: int = 32,
                       channel: str = "bench") -> int:
    assert state.sender is not None
    raw = client_frame(data_frame(channel, size))
    sender = state.sender
    state.running = True

    async def loop() -> None:
        while state.running:
            while state.sent - state.done_upto < window:
                sender.send_raw(raw)
                state.sent += 1
            state.progress.clear()
            await state.progress.wait()

    state.tasks.append(asyncio.get_running_loop().create_task(loop()))
    return len(raw) - 6


@command
async def snapshot(state: WorkerState) -> dict[str, Any]:
    counts = [p.count for p in state.peers if not p.paused_reading]
    return {"t": time.monotonic(), "count": sum(counts), "sent": state.sent,
            "min": min(counts, default=0), "max": max(counts, default=0),
            "open": sum(p.open for p in state.peers)}


@command
async def fanout_stop(state: WorkerState) -> int:
    state.running = False
    state.progress.set()
    return state.sent


# -- join storm -----------------------------------------------------------------------------


@command
async def storm_connect(state: WorkerState, port: int, ids: list[str], tls: bool = False,
                        sources: list[str] | None = None) -> dict[str, Any]:
    return await connect(state, port, ids, tls=tls, sources=sources, channel=None)


@command
async def storm_go(state: WorkerState, total: int, channel: str = "storm",
                   start_at: float = 0.0, timeout: float = 900.0) -> dict[str, Any]:
    """Join like the real client: on ack send peer_online + peer_state; answer every
    peer_online with peer_state; a member is listed once its peer_state arrived."""
    loop = asyncio.get_running_loop()
    want = total - 1
    pending = len(state.peers)
    all_done = loop.create_future()
    done_at: list[float] = []
    frames = 0
    if pending == 0:
        return {"done_at": 0.0, "frames": 0}
    online = control_frame("peer_online", channel)

    def make(peer: WSPeer) -> Callable[[WSPeer, bytes], None]:
        members: set[str] = set()
        state_frame = client_frame(control_frame(
            "peer_state", channel, pack({"id": peer.client_id, "name": peer.client_id})))
        acked = False
        finished = False

        def on_message(p: WSPeer, payload: bytes) -> None:
            nonlocal acked, finished, pending, frames
            frames += 1
            msg = msgpack.unpackb(payload)
            op = msg.get("op")
            if op == "peer_state":
                members.add(msg["p"])
            elif op == "peer_online":
                p.send_raw(state_frame)
            elif op == "channel_join" and not acked:
                acked = True
                p.send(online)
                p.send_raw(state_frame)
            elif op == "peer_offline":
                members.discard(msg["p"])
            if not finished and len(members) >= want:
                finished = True
                p.storm_done = True  # type: ignore[attr-defined]
                done_at.append(time.monotonic())
                pending -= 1
                if pending == 0 and not all_done.done():
                    all_done.set_result(None)

        return on_message

    for peer in state.peers:
        peer.on_message = make(peer)
    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    join = {peer.client_id: join_frame(channel, peer.client_id) for peer in state.peers}
    for peer in state.peers:
        peer.send(join[peer.client_id])
    deadline = time.monotonic() + timeout
    while not all_done.done() and time.monotonic() < deadline:
        # Also stop once every unfinished peer was closed (e.g. as a slow reader).
        if all(not p.open for p in state.peers if not getattr(p, "storm_done", False)):
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(all_done), 0.25)
    return {"done_at": max(done_at, default=0.0), "finished": len(done_at),
            "peers": len(state.peers), "frames": frames,
            "closed": sum(not p.open for p in state.peers)}


# -- mesh latency -------------------------------------------------------------------------


@command
async def latency_receivers(state: WorkerState, port: int, ids: list[str],
                            channel: str = "lat") -> dict[str, Any]:
    def on_message(peer: WSPeer, payload: bytes) -> None:
        now = time.monotonic_ns()
        msg = msgpack.unpackb(payload)
        if msg.get("t") == "data":
            body = msgpack.unpackb(msg["pl"])
            state.latencies.append(now - int(body["data"][:20]))

    info = await connect(state, port, ids, channel=channel)
    for peer in state.peers:
        peer.on_message = on_message
    return info


@command
async def latency_send(state: WorkerState, port: int, count: int, interval: float,
                       channel: str = "lat", sender_id: str = "lat-sender") -> int:
    opened, errors = await _open(state, port, [sender_id], tls=False, sources=["127.0.0.1"],
                                 concurrency=1, channel=channel)
    if not opened:
        raise RuntimeError(f"sender did not connect: {errors}")
    sender = opened[0]
    state.peers.remove(sender)
    for _ in range(count):
        sender.send(data_frame(channel, 64, stamp=time.monotonic_ns()))
        await asyncio.sleep(interval)
    await asyncio.sleep(0.5)
    sender.close()
    return count


@command
async def latencies(state: WorkerState) -> list[int]:
    out, state.latencies = state.latencies, []
    return out


@command
async def nats_sub(state: WorkerState, url: str, subject: str) -> bool:
    import nats

    nc = await nats.connect(url)

    async def cb(msg: Any) -> None:
        state.latencies.append(time.monotonic_ns() - int(msg.data[:20]))

    await nc.subscribe(subject, cb=cb)
    await nc.flush()
    state.extra["nc"] = nc
    return True


@command
async def nats_pub(state: WorkerState, url: str, subject: str, count: int,
                   interval: float) -> int:
    import nats

    nc = await nats.connect(url)
    pad = b"x" * 44
    for _ in range(count):
        # No flush per message: like the node's bus, nats-py's flusher sends it.
        await nc.publish(subject, f"{time.monotonic_ns():020d}".encode() + pad)
        await asyncio.sleep(interval)
    await asyncio.sleep(0.5)
    await nc.close()
    return count


@command
async def nats_close(state: WorkerState) -> bool:
    nc = state.extra.pop("nc", None)
    if nc is not None:
        await nc.close()
    return True


# The WebTransport fan-out's commands live beside their client (registered on import).
# So are bench/keepalive.py's (keepalive_touch).
from bench import keepalive, wt_clients  # noqa: E402, F401
