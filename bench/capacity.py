"""Capacity: N concurrent idle WebSocket peers on one node, RSS per peer.

Peers connect from several worker processes and loopback source addresses
(127.0.0.x), each joins one of 100 channels and then stays idle (answering pings).
RSS per peer = (server RSS with N peers - RSS before any) / N, after the node has
settled. The same clients against a raw ``websockets`` server give the library's
own cost per connection, in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.procs import Pool, Server, start_node, start_raw


def measure(pool: Pool, server: Server, *, peers: int, settle: float,
            concurrency: int, tag: str) -> dict[str, Any]:
    time.sleep(0.5)
    rss0 = server.rss_kib()
    ids = [f"{tag}-{i}" for i in range(peers)]
    parts = [ids[i::len(pool)] for i in range(len(pool))]
    t0 = time.monotonic()
    results = pool.call_all("connect", port=server.port, tls=server.tls, channel="cap",
                            channels=100, concurrency=concurrency,
                            per_worker=lambda i: {"ids": parts[i],
                                                  "sources": [f"127.0.0.{1 + i}"]})
    connect_s = time.monotonic() - t0
    opened = sum(r["opened"] for r in results)
    time.sleep(settle)
    rss1 = server.rss_kib()
    still = sum(r["open"] for r in pool.call_all("open_count"))
    pool.call_all("close_all")
    return {
        "peers": opened, "open_after_settle": still,
        "errors": sum(r["n_errors"] for r in results),
        "error_samples": [e for r in results for e in r["errors"]][:3],
        "connect_s": connect_s,
        "rss_before_kib": rss0, "rss_with_peers_kib": rss1,
        "kib_per_peer": (rss1 - rss0) / opened if opened else None,
    }


def run(log_dir: Path, *, peers: int = 10_000, workers: int = 4, settle: float = 3.0,
        concurrency: int = 25, tls: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"peers": peers, "tls": tls, "client_workers": workers}
    with Pool(workers) as pool:
        for which in ("raw", "prscd"):
            server = (start_raw(log_dir, "idle", tls=tls) if which == "raw"
                      else start_node(log_dir, tls=tls))
            try:
                out[which] = measure(pool, server, peers=peers, settle=settle,
                                     concurrency=concurrency, tag=which)
            finally:
                server.stop()
    node, raw = out["prscd"]["kib_per_peer"], out["raw"]["kib_per_peer"]
    out["prscd_kib_per_peer"] = node
    out["raw_kib_per_peer"] = raw
    out["ratio"] = node / raw if node and raw else None
    return out
