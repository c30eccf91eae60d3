"""Slow readers: N peers of which k never read, one sender of ``size``-byte messages.

In one run, alternating: the node with k slow readers, the node with none (control),
and the raw ``websockets.broadcast`` server with k slow readers (which has no limit:
its RSS grows for as long as the run lasts). Reported: the fast peers' delivery rate
with slow readers relative to the control, the server's RSS over time, and how the
slow ones ended (the node closes them with 1008 past WRITE_BUFFER_LIMIT).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.fanout import measure
from bench.procs import Pool, start_node, start_raw


def run(log_dir: Path, *, peers: int = 1000, slow: int = 10, size: int = 4096,
        duration: float = 15.0, warmup: float = 1.0, window: int = 64, workers: int = 2,
        write_buffer_limit: int = 1024 * 1024, raw: bool = False,
        rounds: int = 2) -> dict[str, Any]:
    out: dict[str, Any] = {"peers": peers, "slow": slow, "message_bytes": size,
                           "duration_s": duration, "write_buffer_limit": write_buffer_limit}
    env = {"WRITE_BUFFER_LIMIT": str(write_buffer_limit)}
    cases = [("prscd_control", 0), ("prscd_slow", slow)] * rounds
    if raw:
        cases.append(("raw_slow", slow))
    results: dict[str, list[dict[str, Any]]] = {}
    with Pool(workers) as pool:
        for i, (name, k) in enumerate(cases):
            server = (start_raw(log_dir, "slow") if name.startswith("raw")
                      else start_node(log_dir, env=env, name=name))
            try:
                r = measure(pool, server, peers=peers, size=size, warmup=warmup,
                            duration=duration, window=window, slow=k, tag=f"s{i}",
                            rss_samples=int(duration))
            finally:
                server.stop()
            trace = r["rss_trace_kib"]
            r["rss_growth_kib"] = trace[-1] - trace[0]
            r["rss_max_growth_kib"] = max(trace) - trace[0]
            results.setdefault(name, []).append(r)
    for name, rs in results.items():
        out[name] = {
            "deliveries_per_s": statistics.median(r["deliveries_per_s"] for r in rs),
            "rss_growth_kib": max(r["rss_growth_kib"] for r in rs),
            "rss_max_growth_kib": max(r["rss_max_growth_kib"] for r in rs),
            "dropped": rs[-1]["dropped"],
            "slow_reader_closes": [r["dropped"].get("slow_reader", 0) for r in rs],
            "rounds": rs,
        }
    ctl, slw = out["prscd_control"], out["prscd_slow"]
    out["rate_ratio_slow_vs_control"] = slw["deliveries_per_s"] / ctl["deliveries_per_s"]
    out["slow_closed_by_node"] = min(slw["slow_reader_closes"])
    return out
