"""The Source (sender) / StreamFunction (receiver) pair that links a node to the mesh.

Subjects::

    prscd.<app>.<channel>.<tag>.<mesh id>.<node id>

so an operator can watch one region with ``nats sub 'prscd.*.*.*.eu-west.>'`` and a
node listens to a channel with ``prscd.<app>.<channel>.>``. ``<app>`` and
``<channel>`` are client input: anything outside ``[A-Za-z0-9_-]`` is encoded
(``~`` + base32) so ``.``, ``*``, ``>`` or spaces can never widen a subscription.

Tags follow the seed: 0x20 = an event from a peer on another node, 0x21 = data a
backend service pushed into a channel.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgpack

from mesh.bus import Bus, BusMessage, Subscription
from node.protocol import ProtocolError, Signalling

log = logging.getLogger("prscd.mesh")

TAG_PEER = 0x20
TAG_BACKEND = 0x21
PREFIX = "prscd"
_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def new_node_id(mesh_id: str) -> str:
    """Unique per process start: several nodes may share one MESH_ID."""
    return f"{mesh_id}-{secrets.token_hex(4)}"


def token(name: str) -> str:
    """A subject token for client-chosen text; distinct names give distinct tokens."""
    if _SAFE.fullmatch(name):
        return name
    encoded = base64.b32encode(name.encode()).decode().rstrip("=").lower()
    return "~" + encoded


def channel_subject(app: str, channel: str) -> str:
    return f"{PREFIX}.{token(app)}.{token(channel)}.>"


def event_subject(app: str, channel: str, tag: int, mesh_id: str, node_id: str) -> str:
    return f"{PREFIX}.{token(app)}.{token(channel)}.{tag:x}.{mesh_id}.{node_id}"


@dataclass(frozen=True, slots=True)
class MeshEvent:
    """One event as it crossed the bus."""

    sig: Signalling
    node: str
    tag: int
    message: BusMessage
    #: The origin's wall clock at publish (0.0 from a node that does not stamp it).
    sent_at: float = 0.0


def pack(sig: Signalling, node_id: str, tag: int) -> bytes:
    # "ts": the sender's wall clock, for the mesh delivery latency (docs/metrics.md);
    # nodes that do not know the key ignore it.
    body = {
        "t": sig.t, "c": sig.c, "op": sig.op, "p": sig.p, "pl": sig.pl,
        "sid": sig.sid, "app": sig.app, "mesh": sig.mesh, "node": node_id, "tag": tag,
        "ts": time.time(),
    }
    return msgpack.packb(body, use_bin_type=True)


def unpack(data: bytes) -> tuple[Signalling, str, int]:
    sig, node, tag, _ = unpack_event(data)
    return sig, node, tag


def unpack_event(data: bytes) -> tuple[Signalling, str, int, float]:
    """:func:`unpack`, and the origin's publish time (0.0 when not stamped)."""
    try:
        body = msgpack.unpackb(data, raw=False)
        sig = Signalling(
            t=body["t"], c=body["c"], op=body.get("op"), p=body.get("p"), pl=body.get("pl"),
            sid=body.get("sid"), app=body["app"], mesh=body.get("mesh"),
        )
        node, tag, sent_at = str(body["node"]), int(body["tag"]), float(body.get("ts", 0.0))
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"bad mesh message: {type(exc).__name__}") from None
    if not isinstance(sig.c, str) or not isinstance(sig.app, str):
        raise ProtocolError("bad mesh message: channel and app must be strings")
    return sig, node, tag, sent_at


class Source:
    """Publishes what local peers send (tag 0x20) and backend data (tag 0x21)."""

    def __init__(self, bus: Bus, mesh_id: str, node_id: str, name: str) -> None:
        self.bus, self.mesh_id, self.node_id, self.name = bus, mesh_id, node_id, name
        self.published = 0
        self.failed = 0
        self._logged_at = 0
        #: Observes a publish call's seconds, one call in ``sample`` (node/metrics.py);
        #: None = not timed.
        self.timer: Callable[[float], None] | None = None
        self.sample = 1
        self._tick = 0

    async def publish(self, sig: Signalling, tag: int = TAG_PEER,
                      headers: dict[str, str] | None = None) -> None:
        assert sig.app is not None
        subject = event_subject(sig.app, sig.c, tag, self.mesh_id, self.node_id)
        timer = self.timer
        if timer is not None:  # one publish in `sample` is timed (node/metrics.py)
            self._tick = (self._tick + 1) % self.sample
            if self._tick:
                timer = None
        started = time.perf_counter() if timer is not None else 0.0
        try:
            await self.bus.publish(subject, pack(sig, self.node_id, tag), headers)
            self.published += 1
            if timer is not None:
                timer(time.perf_counter() - started)
        except Exception as exc:  # the bus is down: local presence carries on
            self.failed += 1
            # The first failure and every 1000th: not one line per message while away.
            if self.failed == 1 or self.failed - self._logged_at >= 1000:
                self._logged_at = self.failed
                log.warning("source publish failed subject=%s error=%s failed_total=%d",
                            subject, exc, self.failed)


class StreamFunction:
    """Receives other nodes' events for the channels this node has peers in."""

    def __init__(self, bus: Bus, node_id: str, name: str,
                 on_event: Callable[[MeshEvent], Awaitable[None]]) -> None:
        self.bus, self.node_id, self.name = bus, node_id, name
        self.on_event = on_event
        self.received = 0
        self.echoes = 0
        self.malformed = 0
        self._subs: dict[tuple[str, str], Subscription] = {}
        self._changes: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def interest(self, app: str, channel: str, active: bool) -> None:
        """Queue a subscribe/unsubscribe; applied in order by one worker."""
        self._changes.put_nowait((app, channel, active))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._apply())

    async def settled(self) -> None:
        """Wait until every queued interest change is applied (tests, shutdown)."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    @property
    def channels(self) -> int:
        return len(self._subs)

    async def _apply(self) -> None:
        while not self._changes.empty():
            app, channel, active = self._changes.get_nowait()
            key = (app, channel)
            try:
                if active and key not in self._subs:
                    self._subs[key] = await self.bus.subscribe(
                        channel_subject(app, channel), self._receive
                    )
                elif not active and key in self._subs:
                    await self._subs.pop(key).unsubscribe()
            except Exception as exc:
                log.warning("interest change failed app=%s active=%s error=%s", app, active, exc)

    async def _receive(self, message: BusMessage) -> None:
        try:
            sig, node, tag, sent_at = unpack_event(message.data)
        except ProtocolError as exc:
            self.malformed += 1
            log.warning("stream function dropped subject=%s reason=%s", message.subject, exc)
            return
        if node == self.node_id:
            # Echo suppression by node id: the origin already delivered locally.
            self.echoes += 1
            return
        self.received += 1
        await self.on_event(MeshEvent(sig, node, tag, message, sent_at))

    async def close(self) -> None:
        await self.settled()
        for sub in self._subs.values():
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe on close failed: %s", exc)
        self._subs.clear()
