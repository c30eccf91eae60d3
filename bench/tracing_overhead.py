"""Tracing overhead (issue 14, goal 3): the node's CPU per delivery with tracing off, at
the defaults, and on for every message, in many short alternating rounds of one run.

At the defaults every presence change is traced and 1% of ``data`` messages
(``TRACE_DATA_RATIO``); "all" sets ``TRACE_DATA_RATIO=1``. The fan-out sends only ``data``
messages, so "defaults" is what a cursor-heavy app pays with tracing left on.

Built for a shared, busy machine: four nodes run side by side (off, defaults, all, and
"control", tracing off again: an A/A pair that shows this run's noise), each with its own
receivers connected once; the rounds take turns sending to one of them (the order rotates
each round, so each config runs in each position equally often). A round's cost is the
node's CPU (``/proc/PID/stat``: every thread, so the BatchSpanProcessor's encoding and
HTTP export are in it) from the first message sent until every receiver has the last one
and the node's spans are exported (a tail longer than ``OTEL_BSP_SCHEDULE_DELAY``),
divided by the deliveries in that time. Reported: medians per config, the median of the
per-round ratios (a round's four runs are seconds apart), throughput as a secondary
figure, and the machine's load (load average and, per round, the share of all CPUs busy
from ``/proc/stat``).

The spans go to a local OTLP/HTTP endpoint (:class:`Sink`), the protocol and path Jaeger
ingests (a real Jaeger cannot run here): the node's real ``OTLPSpanExporter`` encodes and
POSTs them. The sink counts the spans it gets per round, so a dropped span (a full
export queue) shows as a sampled share below what was asked.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.procs import Pool, Server, start_node

CONFIGS = ("off", "defaults", "all", "control")
#: The goals, as CPU per delivery: "costs at most 10% / 25% of throughput" on a node
#: that is CPU-bound = the same CPU delivers at least 0.90x / 0.75x as much.
GOAL_DEFAULTS, GOAL_ALL = 1 / 0.90, 1 / 0.75
#: Idle peers of the nodes not being measured should cost (almost) nothing.
QUIET = {"PING_INTERVAL": "30", "PING_TIMEOUT": "60"}
#: The BatchSpanProcessor exports at most this long after a span ends (ms); the SDK
#: default is 5000, shortened so that a round's spans are exported within its window.
SCHEDULE_DELAY_MS = 200


class Sink:
    """An OTLP/HTTP endpoint that accepts everything and counts requests and spans."""

    def __init__(self) -> None:
        sink = self
        self.requests = 0
        self.bytes = 0
        self.spans = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                sink.spans += sum(len(ss.spans) for rs in request.resource_spans
                                  for ss in rs.scope_spans)
                sink.requests += 1
                sink.bytes += len(body)
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


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat: the machine's load in a round."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class Target:
    """One node under test with its own receivers (connected once) and OTLP sink."""

    def __init__(self, which: str, log_dir: Path, *, peers: int, workers: int) -> None:
        self.which = which
        self.sink = Sink() if which in ("defaults", "all") else None
        env = dict(QUIET)
        if self.sink is not None:
            env |= {"YOMO_TRACE_JAEGER_ENDPOINT": self.sink.url,
                    "OTEL_BSP_SCHEDULE_DELAY": str(SCHEDULE_DELAY_MS)}
            if which == "all":
                env["TRACE_DATA_RATIO"] = "1"
        self.pool = Pool(workers)
        self.node: Server = start_node(log_dir, env=env, name=f"prscd-trace-{which}")
        self.peers = peers
        ids = [f"t{which}-{i}" for i in range(peers)]
        self.pool.call_all("fanout_receivers", port=self.node.port, tls=False,
                           per_worker=lambda i: {
                               "ids": ids[i::workers], "sources": [f"127.0.0.{1 + i}"],
                               "sender_id": f"t{which}-sender" if i == 0 else None})

    def count(self) -> tuple[float, int]:
        snaps = self.pool.call_all("snapshot")
        return statistics.mean(s["t"] for s in snaps), sum(s["count"] for s in snaps)

    def round(self, *, size: int, window: int, warmup: float, duration: float,
              tail: float) -> dict[str, Any]:
        spans0 = self.sink.spans if self.sink else 0
        busy0, total0 = busy_jiffies()
        _, count0 = self.count()
        sent0 = self.pool.call(0, "snapshot")["sent"]
        cpu0 = self.node.cpu_seconds()
        self.pool.call(0, "fanout_start", size=size, window=window)
        time.sleep(warmup)
        ta, ca = self.count()
        time.sleep(duration)
        tb, cb = self.count()
        sent = self.pool.call(0, "fanout_stop") - sent0
        # Every message sent reaches every receiver; wait for the last ones (bounded).
        deadline = time.monotonic() + 10
        while (count1 := self.count()[1]) - count0 < sent * self.peers:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        time.sleep(tail)  # the spans of the last messages exported (or the same idle: off)
        cpu = self.node.cpu_seconds() - cpu0
        busy1, total1 = busy_jiffies()
        delivered = count1 - count0
        spans = (self.sink.spans - spans0) if self.sink else 0
        return {
            "cpu_us_per_delivery": 1e6 * cpu / delivered if delivered else None,
            "deliveries_per_s": (cb - ca) / (tb - ta),
            "delivered": delivered, "lost": sent * self.peers - delivered,
            "messages": sent, "node_cpu_s": cpu,
            "spans_per_message": spans / sent if sent else None,
            "machine_busy": (busy1 - busy0) / max(1, total1 - total0),
        }

    def close(self) -> dict[str, Any]:
        closed = self.pool.call_all("open_count")
        self.pool.call_all("close_all")
        self.pool.close()
        self.node.stop()
        if self.sink is not None:
            self.sink.close()
        return {"receivers_closed": sum(c["closed"] for c in closed),
                "exports": self.sink.requests if self.sink else 0,
                "export_bytes": self.sink.bytes if self.sink else 0}


def run(log_dir: Path, *, peers: int = 1000, rounds: int = 20, duration: float = 1.0,
        warmup: float = 0.2, window: int = 128, workers: int = 2,
        size: int = 64) -> dict[str, Any]:
    load_start = os.getloadavg()
    targets: dict[str, Target] = {}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in CONFIGS}
    tail = 2 * SCHEDULE_DELAY_MS / 1000
    started = time.monotonic()
    try:
        for which in CONFIGS:
            targets[which] = Target(which, log_dir, peers=peers, workers=workers)
        # Does the node export spans at all? (one probe round on "all", not counted)
        probe = targets["all"].round(size=size, window=window, warmup=0.1, duration=0.3,
                                     tail=tail)
        if not probe["spans_per_message"]:
            return {"skipped": "the node exported no spans with YOMO_TRACE_JAEGER_ENDPOINT "
                               "set"}
        for r in range(rounds):
            k = r % len(CONFIGS)
            for which in CONFIGS[k:] + CONFIGS[:k]:
                results[which].append(targets[which].round(
                    size=size, window=window, warmup=warmup, duration=duration, tail=tail))
    finally:
        closing = {which: t.close() for which, t in targets.items()}
    return summarize(results, closing, peers=peers, window=window, rounds=rounds,
                     duration=duration, load=(load_start, os.getloadavg()),
                     seconds=time.monotonic() - started)


def summarize(results: dict[str, list[dict[str, Any]]], closing: dict[str, Any], *,
              peers: int, window: int, rounds: int, duration: float,
              load: tuple[Any, Any], seconds: float) -> dict[str, Any]:
    def med(which: str, key: str) -> float:
        return statistics.median(x[key] for x in results[which])

    cpu = {k: med(k, "cpu_us_per_delivery") for k in CONFIGS}
    rate = {k: med(k, "deliveries_per_s") for k in CONFIGS}

    def paired(which: str) -> float:
        return statistics.median(a["cpu_us_per_delivery"] / b["cpu_us_per_delivery"]
                                 for a, b in zip(results[which], results["off"], strict=True))

    busy = [x["machine_busy"] for rs in results.values() for x in rs]
    return {
        "peers": peers, "window": window, "rounds": rounds, "duration_s": duration,
        "data_ratio_default": 0.01, "schedule_delay_ms": SCHEDULE_DELAY_MS,
        "cpu_us_per_delivery": cpu,
        # The goals' figures: CPU per delivery against tracing off (1.0 = free).
        "ratio": cpu["defaults"] / cpu["off"], "ratio_all": cpu["all"] / cpu["off"],
        "ratio_paired": paired("defaults"), "ratio_all_paired": paired("all"),
        "ratio_control": cpu["control"] / cpu["off"], "ratio_control_paired": paired("control"),
        "spread": {k: [round(min(x["cpu_us_per_delivery"] for x in results[k]), 3),
                       round(max(x["cpu_us_per_delivery"] for x in results[k]), 3)]
                   for k in CONFIGS},
        "met_defaults": cpu["defaults"] / cpu["off"] <= GOAL_DEFAULTS,
        "met_all": cpu["all"] / cpu["off"] <= GOAL_ALL,
        "deliveries_per_s": rate,
        "rate_ratio": rate["defaults"] / rate["off"], "rate_ratio_all": rate["all"] / rate["off"],
        "spans_per_message": {k: med(k, "spans_per_message") for k in ("defaults", "all")},
        "lost": {k: sum(x["lost"] for x in results[k]) for k in CONFIGS},
        "load_avg_start": load[0], "load_avg_end": load[1],
        "machine_busy_median": statistics.median(busy),
        "machine_busy_range": [round(min(busy), 2), round(max(busy), 2)],
        "seconds": round(seconds, 1), "nodes": closing, "rounds_detail": results,
    }


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of the results table (benchmark, prscd, baseline, ratio, target)."""
    cpu, rate = r["cpu_us_per_delivery"], r["deliveries_per_s"]
    load = (f"medians of {r['rounds']} alternating rounds; machine {r['machine_busy_median']:.0%}"
            f" busy, load {r['load_avg_start'][0]:.1f} -> {r['load_avg_end'][0]:.1f}")
    out = []
    for which, label, key, goal, met in (
            ("defaults", "tracing at the defaults (presence changes, 1% of data)", "ratio",
             "<= 1.11x CPU (>= 0.90x throughput)", r["met_defaults"]),
            ("all", "tracing every message", "ratio_all",
             "<= 1.33x CPU (>= 0.75x throughput)", r["met_all"])):
        out.append((
            f"{label}: node CPU us per delivery ({r['peers']} peers, {r['window']} in flight; "
            f"{load})",
            f"{cpu[which]:.3f} ({rate[which]:,.0f}/s; "
            f"{r['spans_per_message'][which]:.3f} spans per message)",
            f"{cpu['off']:.3f} ({rate['off']:,.0f}/s) (tracing off)",
            f"**{r[key]:.3f}x** CPU (paired {r[key + '_paired']:.3f}x); "
            f"{r['rate_ratio' + key[5:]]:.2f}x deliveries/s",
            f"{goal} ({'met' if met else 'MISSED'})"))
    out.append((
        "A/A control: a second node with tracing off, same rounds (this run's noise)",
        f"{cpu['control']:.3f} ({rate['control']:,.0f}/s)", f"{cpu['off']:.3f} (tracing off)",
        f"{r['ratio_control']:.3f}x CPU (paired {r['ratio_control_paired']:.3f}x)", "1.0"))
    return out
