"""Fan-out: one channel of N WebSocket peers, one sender of 64-byte ``data`` messages.

The same load generator runs against prscd and against the raw ``websockets.broadcast``
server (``bench/rawserver.py``), in alternating rounds of one run, same TLS setting.
The sender keeps a window of messages in flight (a message is done when every receiver
in the sender's worker has it), so neither server is fed faster than it can deliver.

Deliveries/s counts binary frames arriving at receivers between two snapshots taken
after a warm-up. Also reported: server CPU seconds per 100k deliveries (less sensitive
to a noisy neighbour than the rate).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.procs import Pool, Server, cpu_seconds, start_node, start_raw


def split(ids: list[str], n: int) -> list[list[str]]:
    return [ids[i::n] for i in range(n)]


def measure(pool: Pool, server: Server, *, peers: int, size: int, warmup: float,
            duration: float, window: int, slow: int = 0, tag: str = "fan",
            rss_samples: int = 0) -> dict[str, Any]:
    ids = [f"{tag}-{i}" for i in range(peers)]
    parts = split(ids, len(pool))
    t0 = time.monotonic()
    pool.call_all("fanout_receivers", port=server.port, tls=server.tls,
                  per_worker=lambda i: {
                      "ids": parts[i],
                      "sources": [f"127.0.0.{1 + i}"],
                      "sender_id": f"{tag}-sender" if i == 0 else None,
                      "slow": slow if i == 0 else 0,
                  })
    setup = time.monotonic() - t0
    rss_idle = server.rss_kib()
    frame = pool.call(0, "fanout_start", size=size, window=window)
    time.sleep(warmup)
    first = pool.call_all("snapshot")
    cpu1, rss1 = server.cpu_seconds(), server.rss_kib()
    ccpu1 = sum(cpu_seconds(pid) for pid in pool.pids())
    rss_trace = [rss1]
    if rss_samples:
        for _ in range(rss_samples):
            time.sleep(duration / rss_samples)
            rss_trace.append(server.rss_kib())
    else:
        time.sleep(duration)
    second = pool.call_all("snapshot")
    cpu2, rss2 = server.cpu_seconds(), server.rss_kib()
    ccpu2 = sum(cpu_seconds(pid) for pid in pool.pids())
    sent = pool.call(0, "fanout_stop")
    metrics = server.metrics() if server.name.startswith("prscd") else {}
    delivered = sum(s["count"] for s in second) - sum(s["count"] for s in first)
    elapsed = statistics.mean(s["t"] for s in second) - statistics.mean(s["t"] for s in first)
    cpu = cpu2 - cpu1
    closed = pool.call_all("open_count")
    pool.call_all("close_all")
    return {
        "deliveries_per_s": delivered / elapsed,
        "server_cpu_s_per_100k": 100_000 * cpu / delivered if delivered else None,
        "server_cpu_util": cpu / elapsed,
        "clients_cpu_util": (ccpu2 - ccpu1) / elapsed,
        "messages_sent": sent,
        "frame_bytes": frame,
        "setup_s": setup,
        "rss_idle_kib": rss_idle,
        "rss_start_kib": rss1,
        "rss_end_kib": rss2,
        "rss_trace_kib": rss_trace,
        "lag_max": max(s["max"] for s in second) - min(s["min"] for s in second),
        "closed": _merge_codes(closed),
        "dropped": {k.split('"')[1]: int(v) for k, v in metrics.items()
                    if k.startswith("prscd_dropped_total")},
    }


def _merge_codes(results: list[dict[str, Any]]) -> dict[str, Any]:
    codes: dict[str, int] = {}
    reasons: list[str] = []
    for r in results:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
        reasons += r["reasons"]
    return {"codes": codes, "reasons": sorted(set(reasons))[:3]}


def run(log_dir: Path, *, peers: int = 1000, size: int = 64, rounds: int = 2,
        warmup: float = 1.5, duration: float = 4.0, window: int = 32, workers: int = 2,
        tls: bool = False) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {"raw": [], "prscd": []}
    with Pool(workers) as pool:
        for r in range(rounds):
            # Alternate which goes first so drift on a shared machine hits both.
            order = ("raw", "prscd") if r % 2 == 0 else ("prscd", "raw")
            for which in order:
                server = (start_raw(log_dir, "broadcast", tls=tls) if which == "raw"
                          else start_node(log_dir, tls=tls))
                try:
                    results[which].append(measure(
                        pool, server, peers=peers, size=size, warmup=warmup,
                        duration=duration, window=window, tag=f"{which}{r}"))
                finally:
                    server.stop()
    node_rate = statistics.median(x["deliveries_per_s"] for x in results["prscd"])
    raw_rate = statistics.median(x["deliveries_per_s"] for x in results["raw"])
    node_cpu = statistics.median(x["server_cpu_s_per_100k"] for x in results["prscd"])
    raw_cpu = statistics.median(x["server_cpu_s_per_100k"] for x in results["raw"])
    return {
        "peers": peers, "message_bytes": size, "tls": tls, "rounds": rounds,
        "duration_s": duration, "window": window, "client_workers": workers,
        "prscd_deliveries_per_s": node_rate,
        "raw_deliveries_per_s": raw_rate,
        "ratio": node_rate / raw_rate,
        "prscd_cpu_s_per_100k": node_cpu,
        "raw_cpu_s_per_100k": raw_cpu,
        "cpu_ratio": raw_cpu / node_cpu,
        "rounds_detail": results,
    }
