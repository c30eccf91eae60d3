"""WebTransport fan-out against the WebSocket path of the same node (issue 14, goal 1).

One prscd (TLS on, WebTransport on), one WebSocket sender of 64-byte ``data`` messages,
N receivers in two worker processes: all WebTransport (aioquic clients, datagrams) or
all WebSocket, in alternating rounds of one run, a fresh node for each. Each round runs
every window (messages in flight) on the same receivers. Reported per (receivers,
window): deliveries/s and the node's CPU seconds per 100k deliveries (from /proc) for
both transports, ``ratio`` = WebTransport CPU / WebSocket CPU (goal: <= 2), and the
deliveries lost (sent x receivers - counted, after the phase settles) with what the
node counted as dropped. Idle memory: the node's RSS growth over connecting and joining
the receivers, per peer (goal: <= 40 KiB per WebTransport peer).

The aioquic client acknowledges after 1 ms; Chromium after up to 25 ms or every second
packet. With one message in flight both send about one ACK per delivery.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.procs import Pool, Server, start_node
from testkit.net import free_port

TRANSPORTS = ("webtransport", "websocket")
#: Generous keepalive settings for both transports: 500 clients in two processes on a busy
#: machine can stall for seconds, and a receiver cut as vanished turns into presence events.
IDLE = {"WT_IDLE_TIMEOUT": "10", "WT_PING_INTERVAL": "4", "PING_INTERVAL": "10",
        "PING_TIMEOUT": "20"}


def udp_errors() -> dict[str, int]:
    """The kernel's UDP buffer drops (machine-wide: other sessions count too)."""
    try:
        lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
                 if ln.startswith("Udp:")]
    except OSError:
        return {}
    names, values = lines[0][1:], lines[1][1:]
    row = dict(zip(names, map(int, values), strict=True))
    return {k: row.get(k, 0) for k in ("RcvbufErrors", "SndbufErrors", "InErrors")}


def _phase(pool: Pool, server: Server, *, peers: int, window: int, size: int,
           warmup: float, duration: float) -> dict[str, Any]:
    pool.call_all("wt_reset_counts")
    udp0 = udp_errors()
    pool.call(0, "wt_fanout_start", size=size, window=window)
    time.sleep(warmup)
    first = pool.call_all("snapshot")
    cpu1 = server.cpu_seconds()
    time.sleep(duration)
    second = pool.call_all("snapshot")
    cpu2 = server.cpu_seconds()
    stopped = pool.call(0, "wt_fanout_stop")
    time.sleep(0.5)  # what is in flight lands (or is lost)
    counted = sum(pool.call_all("wt_reset_counts"))
    udp1 = udp_errors()
    delivered = sum(s["count"] for s in second) - sum(s["count"] for s in first)
    elapsed = statistics.mean(s["t"] for s in second) - statistics.mean(s["t"] for s in first)
    cpu = cpu2 - cpu1
    return {
        "window": window,
        "deliveries_per_s": delivered / elapsed,
        "cpu_s_per_100k": 100_000 * cpu / delivered if delivered else None,
        "cpu_util": cpu / elapsed,
        "messages_sent": stopped["sent"],
        "lost": stopped["sent"] * peers - counted,
        "stalls": stopped["stalls"],
        "udp_errors": {k: udp1[k] - udp0[k] for k in udp1},
    }


def measure(pool: Pool, log_dir: Path, transport: str, *, peers: int, windows: tuple[int, ...],
            size: int, warmup: float, duration: float, tag: str,
            env: dict[str, str] | None = None, **connect: Any) -> dict[str, Any]:
    """One fresh node; ``env`` may point PYTHONPATH at another checkout (before/after)."""
    # A UDP port too, from below the ephemeral range: bench.procs.free_port's (bind to 0)
    # was once taken by a receiver's UDP socket before the node bound it.
    server = start_node(log_dir, tls=True, name=f"prscd-{transport}", port=free_port(),
                        env={"WEBTRANSPORT": "true", **IDLE, **(env or {})})
    try:
        time.sleep(0.5)
        rss0 = server.rss_kib()
        ids = [f"{tag}-{i}" for i in range(peers)]
        t0 = time.monotonic()
        pool.call_all("wt_fanout_receivers", port=server.port, transport=transport, **connect,
                      per_worker=lambda i: {"ids": ids[i::len(pool)],
                                            "sender_id": f"{tag}-sender" if i == 0 else None})
        setup = time.monotonic() - t0
        time.sleep(1.0)
        rss1 = server.rss_kib()
        phases = [_phase(pool, server, peers=peers, window=w, size=size, warmup=warmup,
                         duration=duration) for w in windows]
        metrics = server.metrics()
        closed = pool.call_all("open_count")
    finally:
        pool.call_all("close_all")
        server.stop()
    return {
        "setup_s": setup,
        "rss_before_kib": rss0, "rss_idle_kib": rss1,
        "idle_kib_per_peer": (rss1 - rss0) / peers,
        "phases": phases,
        "closed": sum(c["closed"] for c in closed),
        "dropped": {k.split('"')[1]: int(v) for k, v in metrics.items()
                    if k.startswith("prscd_dropped_total")},
    }


def _median(rounds: list[dict[str, Any]], window: int, key: str) -> float | None:
    values = [p[key] for r in rounds for p in r["phases"]
              if p["window"] == window and p[key] is not None]
    return statistics.median(values) if values else None


def run(log_dir: Path, *, receivers: tuple[int, ...] = (100, 500),
        windows: tuple[int, ...] = (1, 32), rounds: int = 3, size: int = 64,
        warmup: float = 1.5, duration: float = 5.0, workers: int = 2) -> dict[str, Any]:
    detail: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with Pool(workers, uvloop=False) as pool:  # see bench/procs.py
        for n in receivers:
            per = detail[str(n)] = {t: [] for t in TRANSPORTS}
            for r in range(rounds):
                # Alternate which goes first so drift on a shared machine hits both.
                order = TRANSPORTS if r % 2 == 0 else TRANSPORTS[::-1]
                for transport in order:
                    per[transport].append(measure(
                        pool, log_dir, transport, peers=n, windows=windows, size=size,
                        warmup=warmup, duration=duration, tag=f"{transport[:2]}{n}r{r}"))
    rows = []
    memory = []
    for n in receivers:
        wt, ws = detail[str(n)]["webtransport"], detail[str(n)]["websocket"]
        for w in windows:
            wt_cpu, ws_cpu = _median(wt, w, "cpu_s_per_100k"), _median(ws, w, "cpu_s_per_100k")
            ratio = wt_cpu / ws_cpu if wt_cpu and ws_cpu else None
            rows.append({
                "receivers": n, "window": w,
                "wt_deliveries_per_s": _median(wt, w, "deliveries_per_s"),
                "ws_deliveries_per_s": _median(ws, w, "deliveries_per_s"),
                "wt_cpu_s_per_100k": wt_cpu, "ws_cpu_s_per_100k": ws_cpu,
                "ratio": ratio, "target": 2.0, "met": ratio is not None and ratio <= 2.0,
                "wt_lost": sum(p["lost"] for r in wt for p in r["phases"] if p["window"] == w),
                "wt_delivered_approx": sum(p["messages_sent"] * n for r in wt
                                           for p in r["phases"] if p["window"] == w),
                "wt_node_dropped": sum(sum(r["dropped"].values()) for r in wt),
                "ws_lost": sum(p["lost"] for r in ws for p in r["phases"] if p["window"] == w),
            })
        wt_kib = statistics.median(r["idle_kib_per_peer"] for r in wt)
        ws_kib = statistics.median(r["idle_kib_per_peer"] for r in ws)
        memory.append({"receivers": n, "wt_kib_per_peer": wt_kib, "ws_kib_per_peer": ws_kib,
                       "ratio": wt_kib / ws_kib if ws_kib > 0 else None, "target_kib": 40,
                       "met": wt_kib <= 40})
    return {"receivers": list(receivers), "windows": list(windows), "rounds": rounds,
            "message_bytes": size, "duration_s": duration, "client_workers": workers,
            "tls": True, "rows": rows, "memory": memory, "rounds_detail": detail}


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of the results table (benchmark, prscd, baseline, ratio, target)."""
    def n(x: float | None, digits: int = 0) -> str:
        return "-" if x is None else f"{x:,.{digits}f}"

    out = []
    for x in r["rows"]:
        ok = "met" if x["met"] else "MISSED"
        lost = f"; {x['wt_lost']:,} of ~{x['wt_delivered_approx']:,} lost" if x["wt_lost"] else ""
        out.append((
            f"WebTransport fan-out ({x['receivers']} receivers, {x['window']} in flight, TLS): "
            f"node CPU s per 100k deliveries (deliveries/s)",
            f"{n(x['wt_cpu_s_per_100k'], 2)} ({n(x['wt_deliveries_per_s'])}){lost}",
            f"{n(x['ws_cpu_s_per_100k'], 2)} ({n(x['ws_deliveries_per_s'])}) (WebSocket)",
            f"**{x['ratio']:.1f}x**" if x["ratio"] else "-", f"<= 2x ({ok})"))
    for m in r["memory"]:
        ok = "met" if m["met"] else "MISSED"
        out.append((f"WebTransport idle memory ({m['receivers']} peers): node RSS per peer",
                    f"{m['wt_kib_per_peer']:.1f} KiB", f"{m['ws_kib_per_peer']:.1f} KiB "
                    "(WebSocket, TLS)", f"{m['ratio']:.1f}x" if m["ratio"] else "-",
                    f"<= 40 KiB ({ok})"))
    return out
