"""Tracing overhead: the fan-out benchmark with tracing off, at the defaults, and on for
every message, in one run (rounds rotate the order).

At the defaults every presence change is traced and 1% of ``data`` messages
(``TRACE_DATA_RATIO``); "all" sets ``TRACE_DATA_RATIO=1``. The fan-out sends only
``data`` messages, so "defaults" is the cost a cursor-heavy app pays with tracing left on.

HOOK: tracing (mesh/tracing.py) is wired into the data path by another change. This
benchmark finds out at run time whether the node exports spans: it points
``YOMO_TRACE_JAEGER_ENDPOINT`` at a local OTLP/HTTP sink, sends a few messages and
waits for an export. No export = skipped, with the reason in the results. Once spans
flow, the same command measures the overhead with no edit here.
"""

from __future__ import annotations

import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.fanout import measure
from bench.procs import Pool, start_node


class Sink:
    """An OTLP/HTTP endpoint that accepts everything and counts requests and bytes."""

    def __init__(self) -> None:
        sink = self
        self.requests = 0
        self.bytes = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                sink.requests += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def close(self) -> None:
        self.server.shutdown()


def run(log_dir: Path, *, peers: int = 1000, rounds: int = 3, duration: float = 4.0,
        warmup: float = 1.5, window: int = 128, workers: int = 2) -> dict[str, Any]:
    sink = Sink()
    env_on = {"YOMO_TRACE_JAEGER_ENDPOINT": sink.url, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    try:
        with Pool(workers) as pool:
            probe = start_node(log_dir, env=env_on, name="prscd-trace-probe")
            try:
                measure(pool, probe, peers=10, size=64, warmup=0.5, duration=1.0,
                        window=4, tag="probe")
                deadline = time.monotonic() + 8
                while sink.requests == 0 and time.monotonic() < deadline:
                    time.sleep(0.2)
            finally:
                probe.stop()
            if sink.requests == 0:
                return {"skipped": "the node exported no spans with YOMO_TRACE_JAEGER_ENDPOINT "
                                   "set: tracing is not wired into the data path yet"}
            envs: dict[str, dict[str, str] | None] = {
                "off": None, "defaults": env_on, "all": {**env_on, "TRACE_DATA_RATIO": "1"}}
            results: dict[str, list[dict[str, Any]]] = {k: [] for k in envs}
            kinds = tuple(envs)
            for r in range(rounds):
                for which in kinds[r % 3:] + kinds[:r % 3]:
                    node = start_node(log_dir, env=envs[which], name=f"prscd-trace-{which}")
                    try:
                        results[which].append(measure(
                            pool, node, peers=peers, size=64, warmup=warmup,
                            duration=duration, window=window, tag=f"t{which}{r}"))
                    finally:
                        node.stop()
    finally:
        sink.close()
    def median(which: str, key: str) -> float:
        return statistics.median(x[key] for x in results[which])

    off, dflt, every = (median(k, "deliveries_per_s") for k in ("off", "defaults", "all"))
    cpu = {k: median(k, "server_cpu_s_per_100k") for k in results}
    return {"peers": peers, "window": window, "data_ratio_default": 0.01,
            "deliveries_per_s_tracing_off": off, "deliveries_per_s_tracing_defaults": dflt,
            "deliveries_per_s_tracing_on": every,
            "ratio": dflt / off, "ratio_on_vs_off": every / off,
            "cpu_s_per_100k": cpu, "cpu_ratio_defaults": cpu["defaults"] / cpu["off"],
            "cpu_ratio_all": cpu["all"] / cpu["off"],
            "exports": sink.requests, "export_bytes": sink.bytes, "rounds_detail": results}
