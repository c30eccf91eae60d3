"""Metrics overhead: the fan-out benchmark with ``METRICS=true`` (the default: the
latency histograms of node/metrics.py) and ``METRICS=false`` (counters and gauges only),
in one run, alternating which goes first each round.

Two shapes: a wide channel (every frame goes to ``peers`` receivers: the per-delivery
path) and narrow channels of ``narrow`` receivers, where the per-frame costs (the clock
reads and histogram observations of every frame) weigh the most. A scraper reads
``/metrics`` once a second during every measurement, both modes (a scrape costs the
same either way but for the histograms' few lines), so scrape cost is in the numbers.
Reported: node CPU seconds per 100k deliveries (from /proc), deliveries/s, and their
on/off ratios (goal: CPU within 5%).

The fan-out's ratios move by +-15% between rounds on a shared machine, more than the 5%
to be measured, so :func:`in_process` also times the node's own work per frame (its
``receive`` with 10 receivers whose links only count: no socket, so the ratio is a
pessimistic bound) on one node, switching the metrics' hot-path work on and off between
alternating blocks, CPU time from ``time.process_time``: as shipped with the embedded bus
(no publish timing), with the bus publish timed as on NATS, and an A/A control.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

from bench.fanout import measure
from bench.procs import Pool, Server, start_node
from testkit.frames import data_frame, join_frame

MODES = {"on": {"METRICS": "true"}, "off": {"METRICS": "false"}}


class Scraper:
    """GET /metrics every ``interval`` seconds until stopped; counts scrapes and bytes."""

    def __init__(self, server: Server, interval: float = 1.0) -> None:
        self.server, self.interval = server, interval
        self.scrapes, self.bytes = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.bytes += len(self.server.http("/metrics"))
                self.scrapes += 1
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(log_dir: Path, *, peers: int = 1000, narrow: int = 10, rounds: int = 4,
        warmup: float = 1.5, duration: float = 4.0, window: int = 32,
        workers: int = 2) -> dict[str, Any]:
    shapes = {"wide": peers, "narrow": narrow}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        shape: {mode: [] for mode in MODES} for shape in shapes}
    with Pool(workers) as pool:
        for r in range(rounds):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for shape, n in shapes.items():
                for mode in order:
                    node = start_node(log_dir, env=MODES[mode], name=f"prscd-metrics-{mode}")
                    scraper = Scraper(node)
                    try:
                        row = measure(pool, node, peers=n, size=64, warmup=warmup,
                                      duration=duration, window=window,
                                      tag=f"m{shape}{mode}{r}")
                    finally:
                        scraper.stop()
                        node.stop()
                    row["scrapes"], row["scrape_bytes"] = scraper.scrapes, scraper.bytes
                    results[shape][mode].append(row)

    out: dict[str, Any] = {"peers_wide": peers, "peers_narrow": narrow, "rounds": rounds,
                           "duration_s": duration, "window": window}
    for shape, by_mode in results.items():
        def median(mode: str, key: str, by_mode: Any = by_mode) -> float:
            return statistics.median(x[key] for x in by_mode[mode])

        on_cpu, off_cpu = median("on", "server_cpu_s_per_100k"), median("off",
                                                                           "server_cpu_s_per_100k")
        on_rate, off_rate = median("on", "deliveries_per_s"), median("off", "deliveries_per_s")
        # Paired by round (the two ran back to back): less sensitive to drift across rounds.
        pairs = [a["server_cpu_s_per_100k"] / b["server_cpu_s_per_100k"]
                 for a, b in zip(by_mode["on"], by_mode["off"], strict=True)]
        out[shape] = {
            "cpu_s_per_100k_on": on_cpu, "cpu_s_per_100k_off": off_cpu,
            "cpu_ratio_on_vs_off": on_cpu / off_cpu,
            "cpu_ratio_paired_median": statistics.median(pairs),
            "cpu_ratios_by_round": pairs,
            "deliveries_per_s_on": on_rate, "deliveries_per_s_off": off_rate,
            "rate_ratio_on_vs_off": on_rate / off_rate,
            "scrape_bytes": median("on", "scrape_bytes") / max(1, median("on", "scrapes")),
        }
    quick = rounds < 4
    sizes = {"frames": 500, "blocks": 40} if quick else {}
    out["in_process"] = {
        "as_shipped": asyncio.run(in_process(**sizes)),
        "publish_timed": asyncio.run(in_process(publish_timed=True, **sizes)),
        # The noise floor: two nodes both METRICS=false, measured the same way.
        "a_a_control": asyncio.run(in_process(control=True, **sizes))}
    out["within_5_percent"] = all(out[s]["cpu_ratio_on_vs_off"] <= 1.05 for s in shapes)
    out["rounds_detail"] = results
    return out


class _CountingLink:
    def send(self, frame: bytes) -> bool:
        return True

    def close(self, code: int, reason: str) -> None:
        pass


async def in_process(*, receivers: int = 10, frames: int = 500, blocks: int = 200,
                     publish_timed: bool = False, control: bool = False) -> dict[str, Any]:
    """CPU microseconds per data frame through ``Node.receive`` on one node, the metrics'
    hot-path work on ("on") and off ("off": what METRICS=false runs) in alternating
    blocks. One node, so memory layout and warm-up are shared; ``control``: an A/A run
    that toggles nothing (the noise floor); ``publish_timed``: the bus publish timed too,
    as on NATS."""
    from node.app import App
    from node.config import Settings
    from node.metrics import FRAME_SAMPLE
    from node.ports import Admission

    tmp = Path(tempfile.mkdtemp(prefix="prscd-metrics-bench-"))
    settings = Settings.from_env({"PORT": "0", "HOST": "127.0.0.1", "TLS": "false",
                                  "WEBTRANSPORT": "false", "RATE_LIMIT": "0",
                                  "PID_FILE": str(tmp / "node.pid"), "METRICS": "true"})
    app = App(settings)
    await app.start()
    node = app.node
    assert node.metrics.publish is not None
    timer = node.metrics.publish.observe if publish_timed else None
    node.source.sample = FRAME_SAMPLE
    sender = None
    for i in range(receivers):
        admission = Admission(HTTPStatus.SWITCHING_PROTOCOLS, "", f"p{i}", "app")
        peer = node.open(admission, "websocket", _CountingLink())
        await node.receive(peer, join_frame("room", f"p{i}"))
        sender = sender or peer
    assert sender is not None
    frame = data_frame("room", "cursor", '{"x":1,"y":2}')
    per: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for b in range(blocks):
            for mode in (("on", "off") if b % 2 == 0 else ("off", "on")):
                on = mode == "on" and not control
                node._timed = on
                node.source.timer = timer if on else None
                t0 = time.process_time()
                for _ in range(frames):
                    await node.receive(sender, frame)
                per[mode].append((time.process_time() - t0) / frames * 1e6)
    finally:
        await app.stop()
    on_us, off_us = statistics.median(per["on"]), statistics.median(per["off"])
    pairs = [a / b for a, b in zip(per["on"], per["off"], strict=True)]
    return {"receivers": receivers, "us_per_frame_on": on_us, "us_per_frame_off": off_us,
            "ratio": on_us / off_us, "ratio_paired_median": statistics.median(pairs),
            "added_us_per_frame": on_us - off_us}
