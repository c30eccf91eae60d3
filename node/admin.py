"""The operations page's data: the mesh at a glance, as one JSON object (docs/operations.md).

    GET /admin                 the page (node/static/admin.html, .js, .css; no data in it)
    GET /v1/admin/overview     the JSON it polls every second

Where it is served: on the server API (node/api.py, API_PORT) behind the API keys when
API_KEYS is set; otherwise on the node's PORT to loopback clients only, unless
ADMIN_LOCAL=false (node/endpoints.py). Both answer from the same :class:`AdminView`.

What each node knows of the others comes from two places that exist already: heartbeats
(mesh/liveness.py: who is alive, their peers and channels, heartbeat age, who died and
why) and one mesh query (mesh/query.py, kind ``admin``): every live node answers with its
counters, drops and busiest channels. Rates are counter deltas between two answers of the
same node. The query runs only while someone looks (at most once per ``REFRESH_S``), so
an unwatched page costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from mesh.liveness import BYE
from node import __version__

if TYPE_CHECKING:
    from mesh.bridge import Source, StreamFunction
    from mesh.bus import Bus
    from mesh.liveness import Liveness
    from mesh.query import Gathered, MeshQuery
    from node.presence import Presence

log = logging.getLogger("prscd.admin")

KIND = "admin"
OVERVIEW_PATH = "/v1/admin/overview"
#: The page and its two files; all in node/static/ (setuptools package data).
PAGES = {
    "/admin": ("admin.html", "text/html; charset=utf-8"),
    "/admin/admin.js": ("admin.js", "text/javascript; charset=utf-8"),
    "/admin/admin.css": ("admin.css", "text/css; charset=utf-8"),
}
#: Channels each node reports, and the page lists.
TOP_CHANNELS = 20
#: A newer answer than this is reused: many open pages ask the mesh once a second.
REFRESH_S = 0.8
COUNTERS = ("handled", "delivered", "published", "received")
ALIVE, DRAINING, DEAD = "alive", "draining", "dead"


class Node(Protocol):
    """What the page reads of the node (node/server.py)."""

    node_id: str
    started_at: float
    draining: bool
    delivered: int
    links: Mapping[str, Any]
    presence: Presence
    bus: Bus
    liveness: Liveness
    source: Source
    stream_function: StreamFunction

    @property
    def mesh_id(self) -> str: ...

    def readiness(self) -> tuple[bool, str]: ...


def local_answer(node: Node, top: int = TOP_CHANNELS) -> dict[str, Any]:
    """What this node tells an asking node: cheap, O(channels) plus the top ``top``."""
    ready, reason = node.readiness()
    busiest = heapq.nlargest(
        top, ((len(ch.peers), app, name, ch) for app, realm in node.presence.realms.items()
              for name, ch in realm.channels.items()), key=lambda t: t[0])
    return {
        "mesh_id": node.mesh_id,
        "version": __version__,
        "uptime_s": round(time.monotonic() - node.started_at, 3),
        "draining": node.draining,
        "ready": ready,
        "reason": reason,
        "bus": node.bus.state,
        "peers": len(node.links),
        "channels": node.presence.channel_count(),
        "counters": {"handled": node.presence.handled, "delivered": node.delivered,
                     "published": node.source.published,
                     "received": node.stream_function.received},
        "dropped": dict(node.presence.dropped),
        "top": [[app, name, len({p.client_id for p in ch.peers.values()}), n]
                for n, app, name, ch in busiest],
    }


def _rate(now: float, then: float, dt: float) -> float:
    return round(max(now - then, 0) / dt, 2) if dt > 0 else 0.0


class AdminView:
    """The overview of one node's view of the mesh, refreshed while someone looks."""

    def __init__(self, node: Node, query: MeshQuery, *, on_node_port: bool = False) -> None:
        self.node, self.query = node, query
        #: Served on the node's PORT (to loopback clients), not on the server API.
        self.on_node_port = on_node_port
        self._answers: dict[str, dict[str, Any]] = {}
        self._rates: dict[str, dict[str, Any]] = {}
        self._missing: list[str] = []
        #: The last row of every node seen, to show a dead node with its region and load.
        self._known: dict[str, dict[str, Any]] = {}
        self._at = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        query.handle(KIND, lambda body: local_answer(node))

    # -- the mesh query ----------------------------------------------------------------

    def _kick(self) -> asyncio.Task[None] | None:
        if self._refreshing is None and time.monotonic() - self._at >= REFRESH_S:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        return self._refreshing

    async def _refresh(self) -> None:
        try:
            self._take(await self.query.ask(KIND, {}))
        except Exception as exc:  # busy or the bus is down: the page shows the last answer
            log.info("admin overview: mesh query failed: %s", exc)
        finally:
            self._at = time.monotonic()
            self._refreshing = None

    def _take(self, g: Gathered) -> None:
        answers: dict[str, dict[str, Any]] = {}
        for node_id in g.answered:
            answer = g.answers[node_id]
            if "error" in answer or not isinstance(answer.get("counters"), dict):
                continue  # refused (an older node without this kind): heartbeat data only
            answers[node_id] = answer
            before = self._answers.get(node_id)
            if before is not None:
                dt = float(answer["uptime_s"]) - float(before["uptime_s"])
                c0, c1 = before["counters"], answer["counters"]
                d0, d1 = before.get("dropped", {}), answer.get("dropped", {})
                self._rates[node_id] = {
                    **{k: _rate(c1.get(k, 0), c0.get(k, 0), dt) for k in COUNTERS},
                    "dropped": {r: _rate(n, d0.get(r, 0), dt) for r, n in d1.items()}}
        self._answers = answers
        self._rates = {n: r for n, r in self._rates.items() if n in answers}
        self._missing = list(g.missing)

    async def fresh(self) -> dict[str, Any]:
        """What the server API answers: as :meth:`cached`, except that the first request
        waits for the first mesh query (at most API_QUERY_TIMEOUT). Later ones never wait
        for it: a node that died is waited for until it is declared dead, and the page
        must show that at once (states come from liveness, fresh at every request)."""
        task = self._kick()
        if task is not None and not self._answers:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        return self.overview()

    def cached(self) -> dict[str, Any]:
        """The overview now, with the mesh's last answers; starts the next query (the
        node's port answers from a synchronous hook)."""
        self._kick()
        return self.overview()

    # -- the overview ------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        node, live = self.node, self.node.liveness
        now = live.clock()
        mine = local_answer(node)
        answers = {**self._answers, node.node_id: mine}
        nodes = [self._row(node.node_id, answers, now)]
        nodes += [self._row(n, answers, now) for n in sorted(live.nodes)]
        for node_id, (why, when) in sorted(live.dead.items()):
            known = self._known.get(node_id, {})
            nodes.append({"peers": 0, "channels": 0, "url": "", "version": None,
                          "uptime_s": None, **known, "node": node_id, "state": DEAD, "self": False,
                          "mesh_id": known.get("mesh_id") or node_id.rpartition("-")[0],
                          "reason": "left" if why == BYE else why,
                          "heartbeat_age_s": None, "dead_for_s": round(now - when, 1),
                          "answered": False, "rates": None, "dropped": {}})
        return {
            "generated_at": round(time.time(), 3),
            "node": {"node_id": node.node_id, "mesh_id": node.mesh_id,
                     "version": __version__, "uptime_s": round(mine["uptime_s"], 1),
                     "draining": node.draining, "bus": {"kind": node.bus.kind,
                                                        "state": node.bus.state},
                     "link_ok": live.link_ok},
            "node_timeout_s": live.timeout,
            "heartbeat_interval_s": live.interval,
            "regions": _regions(nodes),
            "nodes": nodes,
            "channels": _channels(answers),
            "rates": {k: round(sum(r[k] for r in self._rates.values()), 2) for k in COUNTERS},
            "dropped": _drops(answers, self._rates),
            "missing": [n for n in self._missing if n in live.nodes],
        }

    def _row(self, node_id: str, answers: dict[str, dict[str, Any]],
             now: float) -> dict[str, Any]:
        live, answer = self.node.liveness, answers.get(node_id)
        me = node_id == self.node.node_id
        info = live.nodes.get(node_id)
        if me:
            echo = live.own_echo_at
            age = None if echo is None else round(now - echo, 2)
            url, ready = live.public_url, not self.node.draining
        else:
            assert info is not None
            age, url = round(now - info.last_seen, 2), info.url
            ready = bool(info.info.get("ready", True))
        row: dict[str, Any] = {
            "node": node_id, "self": me, "url": url, "heartbeat_age_s": age,
            "mesh_id": answer["mesh_id"] if answer else (info.mesh if info else ""),
            "peers": answer["peers"] if answer else (info.peers if info else 0),
            "channels": answer["channels"] if answer else (info.channels if info else 0),
            "version": answer["version"] if answer else (info.info.get("version")
                                                         if info else None),
            "uptime_s": round(answer["uptime_s"], 1) if answer else None,
            "answered": answer is not None,
            "rates": self._rates.get(node_id),
            "dropped": answer.get("dropped", {}) if answer else {},
        }
        draining = answer["draining"] if answer else not ready
        row["state"] = DRAINING if draining else ALIVE
        row["reason"] = (answer["reason"] if answer and not answer["ready"]
                         else "" if not draining else "not ready")
        self._known[node_id] = {k: row[k] for k in ("mesh_id", "url", "peers", "channels",
                                                    "version", "uptime_s")}
        if len(self._known) > 4 * (len(live.nodes) + len(live.dead)) + 16:
            keep = {self.node.node_id, *live.nodes, *live.dead}
            self._known = {n: v for n, v in self._known.items() if n in keep}
        return row


def _regions(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    regions: dict[str, dict[str, Any]] = {}
    for row in nodes:
        r = regions.setdefault(row["mesh_id"], {"mesh_id": row["mesh_id"], ALIVE: 0,
                                                DRAINING: 0, DEAD: 0, "peers": 0,
                                                "channels": 0})
        r[row["state"]] += 1
        if row["state"] != DEAD:
            r["peers"] += int(row.get("peers") or 0)
            r["channels"] += int(row.get("channels") or 0)
    for r in regions.values():
        r["state"] = (ALIVE if r[ALIVE] else DRAINING if r[DRAINING] else DEAD)
    return sorted(regions.values(), key=lambda r: r["mesh_id"])


def _channels(answers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The busiest channels mesh-wide: members summed over nodes (distinct ids per node,
    as the server API counts them: node/answers.py)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for answer in answers.values():
        for app, name, members, connections in answer.get("top", []):
            entry = merged.setdefault((app, name), {"app": app, "channel": name,
                                                    "members": 0, "connections": 0,
                                                    "nodes": 0})
            entry["members"] += members
            entry["connections"] += connections
            entry["nodes"] += 1
    ranked = sorted(merged.values(), key=lambda e: (-e["members"], e["app"], e["channel"]))
    return ranked[:TOP_CHANNELS]


def _drops(answers: dict[str, dict[str, Any]],
           rates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    totals: dict[str, int] = {}
    per_s: dict[str, float] = {}
    for answer in answers.values():
        for reason, n in answer.get("dropped", {}).items():
            totals[reason] = totals.get(reason, 0) + int(n)
    for r in rates.values():
        for reason, n in r.get("dropped", {}).items():
            per_s[reason] = per_s.get(reason, 0.0) + n
    return [{"reason": reason, "total": n, "per_s": round(per_s.get(reason, 0.0), 2)}
            for reason, n in sorted(totals.items(), key=lambda t: (-t[1], t[0]))]
