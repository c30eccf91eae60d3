"""Node heartbeats: a node that goes silent is dead, and its peers go offline everywhere.

Every node publishes a small JSON heartbeat every ``HEARTBEAT_INTERVAL`` seconds on::

    prscd-sys.nodes.<mesh id>.<node id>

(a root of its own: client-chosen app and channel names live under ``prscd.`` and can
never produce a subject here) and listens to ``prscd-sys.nodes.>``. A remote node not
heard from (heartbeat or event) for ``NODE_TIMEOUT`` seconds is declared dead: the
members we learned from it go offline for our local peers (``Presence.node_down``). A
stopping node publishes ``"state": "bye"`` on the same subject after its peers' own
``peer_offline`` events, and is dropped at once.

Our own outages must not kill others. A node hears its own heartbeat come back through
the bus; while the bus is down, or our own heartbeat has not come back for two
intervals (a silent dead link, a stalled event loop), nobody is declared dead by us.
When the link returns, every node we knew gets a fresh ``NODE_TIMEOUT`` to be heard
from: the ones still alive stay (with their members), the ones that vanished meanwhile
go offline. A new process is a new node id, so a restarted node never revives stale
members: its old id times out or said goodbye.

Resync: if our link was gone long enough for others to declare us dead, or a node we
declared dead turns out to be alive (a healed partition), or the bus was down at some
point before our first link while local peers were joining (their events could not go
out), our local peers are asked to
re-announce themselves (``on_resync``: the node sends each a join ack, which makes the
client send ``peer_online`` + ``peer_state`` for every channel, and remote clients
answer with their ``peer_state``). That rebuilds membership both ways with the normal
client handshake. A node whose bus was up from the start has lost nothing before its
first heartbeat comes back: a peer joining in that first second gets one join ack.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.bus import UP_STATES, Bus, BusMessage, Subscription

log = logging.getLogger("prscd.mesh.liveness")

ROOT = "prscd-sys"
ALL_NODES = f"{ROOT}.nodes.>"
ALIVE = "alive"
BYE = "bye"
#: How long a dead node id is remembered (to tell a goodbye from a healed partition).
DEAD_MEMORY_S = 600.0


def heartbeat_subject(mesh_id: str, node_id: str) -> str:
    return f"{ROOT}.nodes.{mesh_id}.{node_id}"


@dataclass(slots=True)
class NodeInfo:
    node: str
    last_seen: float
    mesh: str = ""
    url: str = ""
    peers: int = 0
    channels: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class Liveness:
    """Heartbeats out, heartbeats in, the dead-node check. One per node."""

    def __init__(
        self,
        bus: Bus,
        node_id: str,
        mesh_id: str,
        *,
        interval: float = 1.0,
        timeout: float = 3.0,
        public_url: str = "",
        stats: Callable[[], dict[str, Any]] = dict,
        on_down: Callable[[str, str], None] = lambda node, why: None,
        on_resync: Callable[[str], None] = lambda why: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus, self.node_id, self.mesh_id = bus, node_id, mesh_id
        self.interval, self.timeout, self.public_url = interval, timeout, public_url
        self.stats, self.on_down, self.on_resync, self.clock = stats, on_down, on_resync, clock
        #: Our own heartbeat may be this late before we distrust our link.
        self.link_grace = min(2 * interval, max(interval, timeout - interval / 2))
        self.nodes: dict[str, NodeInfo] = {}
        self.dead: dict[str, tuple[str, float]] = {}
        self.seq = 0
        self.own_echo_at: float | None = None
        self.link_ok = False
        self.link_lost_at: float | None = None
        self.declared_dead = 0
        self.sent = 0
        self.send_failed = 0
        self.malformed = 0
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_beat = 0.0
        self._stopping = False
        self._ever_linked = False
        #: The bus was down at some point before our first link: what local peers
        #: published meanwhile may be lost (mesh/nats.py: a publish before the first
        #: connect fails; across a reconnect it is at most once).
        self._bus_was_down = not bus.up
        bus.on_state(self._on_bus_state)

    # -- lifecycle -------------------------------------------------------------

    def _on_bus_state(self, state: str) -> None:
        if state not in UP_STATES:
            self._bus_was_down = True

    async def start(self) -> None:
        now = self.clock()
        self.link_lost_at = now  # not proven yet: no resync owed for the start itself
        self._bus_was_down = not self.bus.up  # (no peer could join before this)
        self._sub = await self.bus.subscribe(ALL_NODES, self._receive)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Say goodbye (after the node's peers already went offline) and stop."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._publish(BYE)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe failed: %s", exc)

    async def _run(self) -> None:
        tick = min(0.25, self.interval / 4)
        while True:
            now = self.clock()
            if now >= self._next_beat:
                self._next_beat = now + self.interval
                await self._publish(ALIVE)
            self.check(self.clock())
            await asyncio.sleep(tick)

    async def _publish(self, state: str) -> None:
        self.seq += 1
        body = {
            "v": 1, "node": self.node_id, "mesh": self.mesh_id, "state": state,
            "seq": self.seq, "url": self.public_url, "interval": self.interval,
            "timeout": self.timeout, **self.stats(),
        }
        try:
            await self.bus.publish(heartbeat_subject(self.mesh_id, self.node_id),
                                   json.dumps(body, separators=(",", ":")).encode())
            self.sent += 1
        except Exception as exc:  # the bus is down: the check pauses itself
            self.send_failed += 1
            log.debug("heartbeat not sent: %s", exc)

    # -- what comes in ---------------------------------------------------------

    async def _receive(self, message: BusMessage) -> None:
        try:
            body = json.loads(message.data)
            node, state = str(body["node"]), str(body.get("state", ALIVE))
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        if node == self.node_id:
            self.own_echo_at = self.clock()
            return
        if state == BYE:
            self._gone(node, BYE)
            return
        info = self._alive(node)
        if info is None:
            return
        info.mesh = str(body.get("mesh", ""))
        info.url = str(body.get("url", ""))
        info.peers = int(body.get("peers", 0) or 0)
        info.channels = int(body.get("channels", 0) or 0)
        info.info = {k: body[k] for k in ("seq", "interval", "timeout", "version", "ready")
                     if k in body}

    def seen(self, node: str) -> None:
        """An event from ``node`` crossed the bus: it is alive."""
        info = self.nodes.get(node)
        if info is not None:
            info.last_seen = self.clock()
        else:
            self._alive(node)

    def _alive(self, node: str) -> NodeInfo | None:
        now = self.clock()
        info = self.nodes.get(node)
        if info is None:
            if node in self.dead:
                why, _ = self.dead[node]
                if why == BYE:
                    return None  # a straggler from a node that said goodbye
                # Declared dead by timeout, yet alive: a healed partition or a long stall.
                del self.dead[node]
                log.warning("node back node=%s: asking local peers to re-announce", node)
                self.on_resync(f"node {node} back")
            else:
                log.info("node joined node=%s", node)
            info = self.nodes[node] = NodeInfo(node, now)
        info.last_seen = now
        return info

    def _gone(self, node: str, why: str) -> None:
        info = self.nodes.pop(node, None)
        self.dead[node] = (why, self.clock())
        self.declared_dead += 1
        silent = f" silent_for={self.clock() - info.last_seen:.2f}s" if info else ""
        log.log(logging.INFO if why == BYE else logging.WARNING,
                "node down node=%s reason=%s%s", node, why, silent)
        self.on_down(node, why)

    # -- the check ---------------------------------------------------------------

    def check(self, now: float) -> None:
        """Declare silent nodes dead, unless it is our own link that is silent."""
        healthy = (self.bus.up and self.own_echo_at is not None
                   and now - self.own_echo_at <= self.link_grace)
        if not healthy:
            if self.link_ok:
                self.link_ok = False
                self.link_lost_at = self.own_echo_at if self.own_echo_at is not None else now
                log.warning("mesh link lost (bus %s): no node is declared dead meanwhile",
                            self.bus.state)
            return
        if not self.link_ok:
            self.link_ok = True
            lost_at = self.link_lost_at if self.link_lost_at is not None else now
            gap = now - lost_at
            # Everybody we knew gets a full timeout to be heard from again.
            for info in self.nodes.values():
                info.last_seen = max(info.last_seen, now)
            first, self._ever_linked = not self._ever_linked, True
            if first and self.stats().get("peers", 0) and (
                    self._bus_was_down or gap > self.link_grace):
                # The bus came up (or our first heartbeat came back unusually late) after
                # local peers joined: their events may not have reached anybody. With the
                # bus up all along they went out, and a second join ack would only make
                # every client announce itself twice.
                log.warning("mesh link up after %.1fs with local peers: asking them to "
                            "re-announce", gap)
                self.on_resync("first link with local peers")
            elif not first and gap >= self.timeout - self.interval:
                log.warning("mesh link back after %.1fs: others may have dropped our peers, "
                            "asking them to re-announce", gap)
                self.on_resync(f"link back after {gap:.1f}s")
            elif not first:
                log.info("mesh link back after %.1fs", gap)
        for node, info in list(self.nodes.items()):
            if now - info.last_seen > self.timeout:
                self._gone(node, "timeout")
        for node, (_, when) in list(self.dead.items()):
            if now - when > DEAD_MEMORY_S:
                del self.dead[node]

    # -- inspection --------------------------------------------------------------

    def directory(self) -> list[dict[str, Any]]:
        """Every node we currently believe alive, this one first (for /v1/nodes)."""
        now = self.clock()
        me = {"node": self.node_id, "mesh": self.mesh_id, "url": self.public_url,
              "self": True, **self.stats()}
        others = [
            {"node": i.node, "mesh": i.mesh, "url": i.url, "peers": i.peers,
             "channels": i.channels, "ready": bool(i.info.get("ready", True)),
             "age_s": round(now - i.last_seen, 2)}
            for i in sorted(self.nodes.values(), key=lambda i: (i.mesh, i.node))
        ]
        return [me, *others]

    def summary(self) -> dict[str, Any]:
        return {
            "link_ok": self.link_ok,
            "nodes_alive": len(self.nodes),
            "nodes_declared_dead": self.declared_dead,
            "heartbeat_interval_s": self.interval,
            "node_timeout_s": self.timeout,
        }
