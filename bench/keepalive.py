"""Keepalive: node CPU per idle peer at the default keepalive against keepalive off.

One node process per configuration, one at a time, alternating which goes first:

- WebSocket (TLS off): the defaults (a ping every ``PING_INTERVAL``, ``PING_TIMEOUT``)
  against ``PING_INTERVAL=0``; ``ws_peers`` idle peers, joined to 100 channels.
- WebTransport (TLS on): the defaults (a QUIC PING one ``WT_PING_INTERVAL`` after the
  peer's last packet, ``WT_IDLE_TIMEOUT``) against ``WT_PING_INTERVAL=0`` with a 60 s idle
  timeout; ``wt_peers`` idle peers, all joined to one channel.

Once every peer is connected and joined and the node has settled, the node's CPU seconds
(``/proc``) over one quiet window, per peer open at its start; the rounds' medians are
reported (the machine is shared). The difference is the keepalive's cost; what the
clients spend on pongs and ACKs is theirs. (Both nodes up at once, the second one's
connection storm starved the first: every peer of the keepalive node timed out at once.)
Before the window the WebTransport clients send one QUIC PING: the aioquic client's own
idle timeout (60 s) would otherwise end keepalive-off connections during a slow connect.
Every close is counted by code, while connecting and during the window (from the node's
``prscd_connections_closed_total`` and from the clients): a close is a false timeout,
and a window with closes (or under 98% of the peers open) is left out of the medians.
Every peer found *silent* (past the soft timeout: offline for the others, not closed;
``prscd_presence_grace_total{outcome="silent"}``) is a false silence, counted the same way.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.clients import WorkerState, command
from bench.procs import Pool, Server, start_node
from bench.wt_clients import _open_wt

#: Node settings per transport and configuration; "keepalive" leaves the defaults.
CONFIGS: dict[str, dict[str, dict[str, str]]] = {
    "websocket": {"keepalive": {"WEBTRANSPORT": "false"},
                  "off": {"WEBTRANSPORT": "false", "PING_INTERVAL": "0"}},
    "webtransport": {"keepalive": {"WEBTRANSPORT": "true"},
                     "off": {"WEBTRANSPORT": "true", "WT_PING_INTERVAL": "0",
                             "WT_IDLE_TIMEOUT": "60"}},
}
CLOSED = "prscd_connections_closed_total"
SILENT = 'prscd_presence_grace_total{outcome="silent"}'


@command
async def keepalive_wt_connect(state: WorkerState, port: int, ids: list[str],
                               concurrency: int = 16, timeout: float = 20.0) -> dict[str, Any]:
    """Connect and join WebTransport peers; unlike ``wt_fanout_receivers``, a peer that did
    not make it (its join datagram lost three times on a busy machine) is only counted."""
    opened, errors = await _open_wt(state, port, ids, "idle", concurrency, timeout)
    return {"opened": len(opened), "errors": errors[:3], "n_errors": len(errors)}


@command
async def keepalive_touch(state: WorkerState) -> int:
    """One QUIC PING from every WebTransport peer here (resets both sides' idle timers)."""
    touched = 0
    for peer in state.peers:
        quic = getattr(peer, "_quic", None)
        if quic is not None and peer.open:
            quic.send_ping(0)
            peer.transmit()  # type: ignore[attr-defined]
            touched += 1
    return touched


def _closed_by_code(server: Server) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in server.metrics().items():
        if key.startswith(CLOSED + "{") and value:
            code = key.split('code="', 1)[1].split('"', 1)[0]
            out[code] = out.get(code, 0) + int(value)
    return out


def _connect(pool: Pool, server: Server, transport: str, ids: list[str], workers: list[int],
             concurrency: int) -> dict[str, Any]:
    parts = [ids[i::len(workers)] for i in range(len(workers))]
    t0 = time.monotonic()
    if transport == "websocket":
        results = pool.call_all(
            "connect", only=workers, port=server.port, tls=False, channel="idle",
            channels=100, concurrency=concurrency,
            per_worker=lambda i: {"ids": parts[workers.index(i)],
                                  "sources": [f"127.0.0.{1 + i}"]})
        opened = sum(r["opened"] for r in results)
    else:
        results = pool.call_all(
            "keepalive_wt_connect", only=workers, port=server.port, concurrency=concurrency,
            per_worker=lambda i: {"ids": parts[workers.index(i)]})
        opened = sum(r["opened"] for r in results)
    if opened < 0.98 * len(ids):  # per-peer numbers divide by the peers actually open
        raise RuntimeError(f"{transport}: only {opened}/{len(ids)} peers connected: {results}")
    return {"opened": opened, "failed": len(ids) - opened,
            "errors": [e for r in results for e in r["errors"]][:3],
            "connect_s": round(time.monotonic() - t0, 1)}


def _open_now(server: Server, transport: str) -> int:
    key = f'prscd_connections{{transport="{transport}"}}'
    return int(server.metrics().get(key, 0))


def one_node(pool: Pool, log_dir: Path, transport: str, config: str, *, peers: int,
             window: float, settle: float, concurrency: int, tag: str) -> dict[str, Any]:
    """One node in ``config``: connect ``peers``, settle, then one quiet window."""
    tls = transport == "webtransport"
    workers = list(range(len(pool)))
    server = start_node(log_dir, tls=tls, name=f"prscd-{transport}-{config}",
                        env=CONFIGS[transport][config])
    try:
        info = _connect(pool, server, transport, [f"{tag}-{i}" for i in range(peers)],
                        workers, concurrency)
        closed_connect = _closed_by_code(server)
        silent_connect = int(server.metrics().get(SILENT, 0))
        if tls:
            pool.call_all("keepalive_touch")
        time.sleep(settle)
        open_start = _open_now(server, transport)
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        time.sleep(window)
        cpu1, seconds = server.cpu_seconds(), time.monotonic() - t0
        open_end = _open_now(server, transport)
        closed = _closed_by_code(server)
        silent = int(server.metrics().get(SILENT, 0))
        clients = pool.call_all("open_count")
        pool.call_all("close_all")
    finally:
        server.stop()
    codes: dict[str, int] = {}
    for r in clients:
        for code, n in r["codes"].items():
            codes[code] = codes.get(code, 0) + n
    return {
        "config": config, "seconds": round(seconds, 2), "cpu_s": round(cpu1 - cpu0, 3),
        "open_start": open_start, "open_end": open_end,
        # microseconds of node CPU per idle peer per second of wall time
        "us_per_peer_s": (cpu1 - cpu0) / seconds / open_start * 1e6 if open_start else None,
        **info, "closed_by_node_connecting": closed_connect,
        "closed_by_node_window": {c: n - closed_connect.get(c, 0) for c, n in closed.items()
                                  if n - closed_connect.get(c, 0)},
        "closed_at_clients": codes, "clients_open": sum(r["open"] for r in clients),
        "silent_connecting": silent_connect, "silent_window": silent - silent_connect,
    }


def measure(pool: Pool, log_dir: Path, transport: str, *, peers: int, rounds: int,
            window: float, settle: float, concurrency: int) -> dict[str, Any]:
    """Both configurations, one node at a time, alternating which goes first."""
    detail: dict[str, list[dict[str, Any]]] = {"keepalive": [], "off": []}
    for r in range(rounds):
        order = ("keepalive", "off") if r % 2 == 0 else ("off", "keepalive")
        for config in order:
            detail[config].append(one_node(
                pool, log_dir, transport, config, peers=peers, window=window, settle=settle,
                concurrency=concurrency, tag=f"{transport[:2]}-{config}-r{r}"))
    return _summary(transport, peers, window, detail)


def _summary(transport: str, peers: int, window: float,
             detail: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def intact(x: dict[str, Any]) -> bool:
        # A window in which peers were closed (a false timeout) measured fewer peers than
        # it divides by; closes while connecting only lower the peers it divides by.
        return (x["us_per_peer_s"] is not None and x["open_start"] >= 0.98 * peers
                and not x["closed_by_node_window"])

    def median(config: str) -> float | None:
        values = [x["us_per_peer_s"] for x in detail[config] if intact(x)]
        return statistics.median(values) if values else None

    def closes(config: str, key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for x in detail[config]:
            for code, n in x[key].items():
                out[code] = out.get(code, 0) + n
        return out

    on, off = median("keepalive"), median("off")
    return {
        "transport": transport, "peers": peers, "window_s": window,
        "rounds": len(detail["off"]), "settings": CONFIGS[transport],
        "intact_rounds": {c: sum(intact(x) for x in detail[c]) for c in detail},
        "us_per_peer_s_keepalive": on, "us_per_peer_s_off": off,
        "us_per_peer_s_cost": on - off if on is not None and off is not None else None,
        # node CPU % of one core per 1,000 idle peers = us per peer per second / 10
        "cpu_pct_per_1000_keepalive": on / 10 if on is not None else None,
        "cpu_pct_per_1000_off": off / 10 if off is not None else None,
        "closed_by_node_window": {c: closes(c, "closed_by_node_window") for c in detail},
        "closed_by_node_connecting": {c: closes(c, "closed_by_node_connecting")
                                      for c in detail},
        "closed_at_clients": {c: closes(c, "closed_at_clients") for c in detail},
        # False silences (past the soft timeout, not closed), per configuration.
        "silent_window": {c: sum(x["silent_window"] for x in detail[c]) for c in detail},
        "silent_connecting": {c: sum(x["silent_connecting"] for x in detail[c])
                              for c in detail},
        "rounds_detail": detail,
    }


def run(log_dir: Path, *, ws_peers: int = 10_000, wt_peers: int = 1_000, rounds: int = 3,
        window: float = 20.0, settle: float = 3.0, workers: int = 4, wt_workers: int = 2,
        transports: tuple[str, ...] = ("websocket", "webtransport")) -> dict[str, Any]:
    out: dict[str, Any] = {"ws_peers": ws_peers, "wt_peers": wt_peers}
    for transport, peers, n, uvloop, concurrency in (
            ("websocket", ws_peers, workers, True, 25),
            ("webtransport", wt_peers, wt_workers, False, 16)):  # uvloop: bench/procs.py
        if transport not in transports:
            continue
        try:  # one transport failing must not lose the other's numbers
            with Pool(n, uvloop=uvloop) as pool:
                out[transport] = measure(pool, log_dir, transport, peers=peers,
                                         rounds=rounds, window=window, settle=settle,
                                         concurrency=concurrency)
        except Exception as exc:
            out[transport] = {"error": f"{type(exc).__name__}: {exc}"}
    errors = [f"{t}: {out[t]['error']}" for t in transports if "error" in out[t]]
    if len(errors) == len(transports):
        out["error"] = "; ".join(errors)
    return out


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of the results table (benchmark, prscd, baseline, ratio, target)."""
    out = []
    for transport in ("websocket", "webtransport"):
        x = r.get(transport)
        if x is None:
            continue
        if "error" in x:
            out.append((f"keepalive cost, {transport}", "error", x["error"], "-", "-"))
            continue
        closes = sum(sum(c.values()) for c in x["closed_by_node_window"].values())
        silent = sum(x.get("silent_window", {}).values())
        if x["us_per_peer_s_keepalive"] is None or x["us_per_peer_s_off"] is None:
            out.append((f"keepalive cost, {x['peers']:,} idle {transport} peers",
                        "no round without closes", f"closed while connecting: "
                        f"{x['closed_by_node_connecting']}; in the window: "
                        f"{x['closed_by_node_window']}", "-", "-"))
            continue
        out.append((
            f"keepalive cost, {x['peers']:,} idle {transport} peers: node CPU % of a core per "
            f"1,000 peers (us per peer per second), median of {x['rounds']} x "
            f"{x['window_s']:g} s",
            f"{x['cpu_pct_per_1000_keepalive']:.2f} % ({x['us_per_peer_s_keepalive']:.1f} us) "
            "at the defaults",
            f"{x['cpu_pct_per_1000_off']:.2f} % ({x['us_per_peer_s_off']:.1f} us) keepalive off",
            f"+{x['us_per_peer_s_cost']:.1f} us per peer per s",
            f"no close, no silence ({closes} closed, {silent} silent)"))
    return out
