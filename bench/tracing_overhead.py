"""Tracing overhead: the fan-out benchmark with tracing on vs off, in one run.

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


def run(log_dir: Path, *, peers: int = 1000, rounds: int = 2, duration: float = 4.0,
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
            results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
            for r in range(rounds):
                for which in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    node = start_node(log_dir, env=env_on if which == "on" else None,
                                      name=f"prscd-trace-{which}")
                    try:
                        results[which].append(measure(
                            pool, node, peers=peers, size=64, warmup=warmup,
                            duration=duration, window=window, tag=f"t{which}{r}"))
                    finally:
                        node.stop()
    finally:
        sink.close()
    on = statistics.median(x["deliveries_per_s"] for x in results["on"])
    off = statistics.median(x["deliveries_per_s"] for x in results["off"])
    return {"peers": peers, "deliveries_per_s_tracing_on": on,
            "deliveries_per_s_tracing_off": off, "ratio_on_vs_off": on / off,
            "exports": sink.requests, "export_bytes": sink.bytes, "rounds_detail": results}
