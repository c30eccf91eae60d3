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
"""

from __future__ import annotations

import statistics
import threading
from pathlib import Path
from typing import Any

from bench.fanout import measure
from bench.procs import Pool, Server, start_node

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
    out["within_5_percent"] = all(out[s]["cpu_ratio_on_vs_off"] <= 1.05 for s in shapes)
    out["rounds_detail"] = results
    return out
