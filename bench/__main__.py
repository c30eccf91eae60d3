"""Run the benchmarks: ``.venv/bin/python -m bench [--quick] [--only NAMES] [--out DIR]``.

Every benchmark compares the node with a raw baseline measured in the same run (the
machine is shared and noisy: ratios from one run mean something, absolute numbers
from different runs do not). Servers and load generators run in separate processes
on loopback. Results go to ``DIR/results.json`` and ``DIR/results.md`` (default
``bench/results/``), server logs to ``DIR/logs/``.

Benchmarks (``--only`` takes a comma-separated list):

- ``fanout``:   1,000 peers in one channel, one sender of 64-byte messages; prscd vs a
  minimal ``websockets.broadcast`` server, TLS off for both (``--tls`` adds a TLS pair);
  with 32 messages in flight, and again with one at a time (no batching across messages)
- ``capacity``: 10,000 idle peers; RSS per peer, prscd vs a raw ``websockets`` server
- ``slow``:     1,000 peers of which 10 never read; the others' rate and the node's RSS
- ``storm``:    500 peers join one channel like the real client; time until everyone
  lists everyone (``--storm-plain`` adds the same storm with DEDUPE_PEER_STATE=false)
- ``latency``:  two nodes on one nats-server; same-node and cross-node p50/p99 vs raw
  nats-py pub->sub
- ``tracing``:  fan-out with tracing off, at the defaults (1% of data) and on for every
  message: node CPU per delivery, three nodes side by side, short alternating rounds
  (``bench/tracing_overhead.py``)
- ``metrics``:  fan-out (a wide channel and narrow ones) with ``METRICS`` on vs off, /metrics
  scraped every second: node CPU per 100k deliveries, on/off (goal: within 5%)
- ``members``:  the server API's members query of a 3,000-member channel on three nodes;
  p50/p99 vs raw nats-py request/reply of the same size, and the nodes' CPU per query
- ``webhooks``: 500 joins/s (raw peers joining and leaving) with membership webhooks to a
  local receiver, vs webhooks off: join -> receiver p50/p99, batches/s, CPU per join
- ``native``:   fan-out (1,000 peers, one and 32 messages in flight) against a server that
  is not Python (Node.js ``ws``, ``bench/native/``) and ``websockets.broadcast``
- ``workers``:  ``prscd --workers 1`` vs ``2`` on a local nats-server, WebSocket and
  WebTransport receivers: deliveries per node-CPU-second and RSS per worker
- ``webtransport``: 100 and 500 receivers over WebTransport datagrams vs WebSocket on the
  same node (TLS on), one and 32 messages in flight: node CPU per delivery (ratio, goal
  <= 2x), deliveries lost, idle KiB per peer (goal <= 40)
- ``wt_memory``: 500 idle WebTransport peers: the node's RSS per peer against WebSocket
  peers (goal <= 40 KiB) and where it goes (tracemalloc by part): ``bench/wt_memory.py``
- ``hostile``:  another peer's round trip p50/p99 while each hostile client of issue 15
  runs, against the same peer with no attack in the same run (goal p99 <= 2x within the
  default limits; the attacker closed within 2 s otherwise): ``bench/hostile.py``
- ``geo``:      three regions 40/90/60 ms apart (``infra/wan.py`` proxies): cross-region
  delivery vs raw NATS through the same proxies, newcomer/departure convergence, false
  node-downs, the same with 1% of gateway chunks stalled 500 ms, a far node killed
  (2 + 2 minutes here; ``python -m bench.geo --minutes N`` for other lengths)
- ``keepalive``: 10,000 idle WebSocket and 1,000 idle WebTransport peers: node CPU per idle
  peer at the default keepalive vs keepalive off, alternating rounds; closes by code
  (a false timeout) (``bench/keepalive.py``)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.procs import ROOT

ALL = ("fanout", "capacity", "slow", "storm", "latency", "tracing", "members", "webhooks",
       "native", "webtransport", "geo", "workers", "metrics", "hostile", "keepalive",
       "wt_memory")


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    return {
        "cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "python": platform.python_version(), "websockets": version("websockets"),
        "uvloop": version("uvloop"), "msgpack": version("msgpack"),
        "load_avg_start": os.getloadavg(),
    }


def run(names: list[str], out: Path, *, quick: bool, tls: bool,
        storm_plain: bool) -> dict[str, Any]:
    from bench import (
        capacity,
        fanout,
        geo,
        hostile,
        joinstorm,
        keepalive,
        latency,
        members_query,
        metrics,
        native,
        slow,
        tracing_overhead,
        webhooks,
        workers,
        wt_fanout,
        wt_memory,
    )

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "quick": quick,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    plans: dict[str, Any] = {
        "fanout": lambda: fanout.run(logs, **({"peers": 200, "rounds": 1, "duration": 1.5,
                                              "warmup": 0.5} if quick else {})),
        "fanout_paced": lambda: fanout.run(logs, window=1, **(
            {"peers": 200, "rounds": 1, "duration": 1.5, "warmup": 0.5} if quick else {})),
        "fanout_tls": lambda: fanout.run(logs, tls=True, **(
            {"peers": 200, "rounds": 1, "duration": 1.5, "warmup": 0.5} if quick else {})),
        "capacity": lambda: capacity.run(logs, **({"peers": 1000, "settle": 1.0}
                                                  if quick else {})),
        "slow": lambda: slow.run(logs, **({"peers": 200, "slow": 2, "duration": 4.0,
                                           "rounds": 1, "write_buffer_limit": 65536}
                                          if quick else {})),
        "storm": lambda: joinstorm.run(logs, **({"peers": 100} if quick else {})),
        "storm_plain": lambda: joinstorm.run(logs, env={"DEDUPE_PEER_STATE": "false"},
                                             timeout=300, **({"peers": 100} if quick else {})),
        "latency": lambda: latency.run(logs, **({"count": 300, "warmup": 30}
                                                if quick else {})),
        "tracing": lambda: tracing_overhead.run(logs, **({"peers": 200, "rounds": 3,
                                                          "duration": 0.5} if quick else {})),
        "members": lambda: members_query.run(logs, **({"members": 300, "queries": 50,
                                                       "warmup": 5} if quick else {})),
        "webhooks": lambda: webhooks.run(logs, **({"peers": 100, "rate": 100.0, "duration": 2.0,
                                                   "rounds": 1} if quick else {})),
        "native": lambda: native.run(logs, **({"peers": 200, "rounds": 1, "duration": 1.5,
                                               "warmup": 0.5} if quick else {})),
        "workers": lambda: workers.run(logs, **({"peers": 40, "rounds": 1, "duration": 1.5,
                                                 "warmup": 0.5} if quick else {})),
        "webtransport": lambda: wt_fanout.run(logs, **({"receivers": (20,), "windows": (1, 8),
                                                        "rounds": 1, "duration": 1.0,
                                                        "warmup": 0.5} if quick else {})),
        "wt_memory": lambda: wt_memory.run(logs, **({"peers": 20, "rounds": 1}
                                                    if quick else {})),
        "metrics": lambda: metrics.run(logs, **({"peers": 200, "narrow": 10, "rounds": 2,
                                                 "duration": 1.5, "warmup": 0.5}
                                                if quick else {})),
        "geo": lambda: geo.run(logs, **({"quick": True} if quick else {"minutes": 4.0})),
        "hostile": lambda: hostile.run(logs, **({"duration": 2.0, "rounds": 1}
                                                if quick else {})),
        "keepalive": lambda: keepalive.run(logs, **({"ws_peers": 500, "wt_peers": 50,
                                                     "rounds": 1, "window": 2.0,
                                                     "settle": 0.5} if quick else {})),
    }
    todo = list(names)
    if "fanout" in todo:
        todo.insert(todo.index("fanout") + 1, "fanout_paced")
    if tls and "fanout" in todo:
        todo.insert(todo.index("fanout") + 1, "fanout_tls")
    if storm_plain and "storm" in todo:
        todo.insert(todo.index("storm") + 1, "storm_plain")
    for name in todo:
        t0 = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = plans[name]()
        except Exception as exc:  # one broken benchmark must not lose the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        ratios = [x["ratio"] for x in results[name].get("rows", ()) if x.get("ratio")]
        if name == "webtransport" and ratios:
            # One figure per benchmark in results.json: goal 1's is its worst row.
            results[name].setdefault("ratio", max(ratios))
        results[name]["wall_s"] = round(time.monotonic() - t0, 1)
        print(f"bench: {name} done in {results[name]['wall_s']} s", file=sys.stderr,
              flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    return results


# -- the Markdown table ---------------------------------------------------------------------


def _n(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, "
        f"websockets {m['websockets']}, uvloop {m['uvloop']}; load average "
        f"{m['load_avg_start'][0]:.1f} at start, {m['load_avg_end'][0]:.1f} at end "
        f"(shared machine: compare the ratios, not the absolute numbers).",
        "",
        "| benchmark | prscd | baseline (same run) | ratio | target |",
        "|---|---|---|---|---|",
    ]

    def row(name: str, node: str, base: str, ratio: str, target: str) -> None:
        lines.append(f"| {name} | {node} | {base} | {ratio} | {target} |")

    def skipped(name: str, res: dict[str, Any]) -> bool:
        why = res.get("skipped") or res.get("error")
        if why:
            row(name, "skipped" if "skipped" in res else "error", why, "-", "-")
        return bool(why)

    for key, label in (("fanout", "fan-out, TLS off"),
                       ("fanout_paced", "fan-out, TLS off, one message in flight"),
                       ("fanout_tls", "fan-out, TLS on")):
        f = r.get(key)
        if f is None or skipped(label, f):
            continue
        ok = "met" if f["ratio"] >= 1.0 else "MISSED"
        row(f"{label}: deliveries/s ({f['peers']} peers, {f['message_bytes']} B, "
            f"median of {f['rounds']})",
            _n(f["prscd_deliveries_per_s"]), f"{_n(f['raw_deliveries_per_s'])} "
            "(`websockets.broadcast`)", f"**{f['ratio']:.2f}x**", f">= 1.0x ({ok})")
        row(f"{label}: server CPU s per 100k deliveries", _n(f["prscd_cpu_s_per_100k"], 3),
            _n(f["raw_cpu_s_per_100k"], 3), f"{f['cpu_ratio']:.1f}x less CPU", "-")
    c = r.get("capacity")
    if c is not None and not skipped("capacity", c):
        node, raw = c["prscd_kib_per_peer"], c["raw_kib_per_peer"]
        ok = "met" if node is not None and node <= 20 else "MISSED"
        row(f"capacity: RSS per idle peer ({c['prscd']['peers']:,} peers)",
            f"{node:.1f} KiB", f"{raw:.1f} KiB (raw `websockets`)",
            f"{c['ratio']:.2f}x", f"<= 20 KiB ({ok})")
    s = r.get("slow")
    if s is not None and not skipped("slow readers", s):
        ctl, slw = s["prscd_control"], s["prscd_slow"]
        row(f"slow readers: others' deliveries/s ({s['peers']} peers, {s['slow']} never "
            f"read, {s['message_bytes']} B)", _n(slw["deliveries_per_s"]),
            f"{_n(ctl['deliveries_per_s'])} (no slow reader)",
            f"{s['rate_ratio_slow_vs_control']:.2f}x", "flat")
        grow, peak = slw["rss_growth_kib"] / 1024, slw["rss_max_growth_kib"] / 1024
        row("slow readers: node RSS growth over the run",
            f"{grow:+.1f} MiB (max {peak:+.1f})",
            f"{ctl['rss_growth_kib'] / 1024:+.1f} MiB (no slow reader)", "-",
            f"bounded; {s['slow_closed_by_node']}/{s['slow']} closed 1008")
    for key, label in (("storm", "join storm"), ("storm_plain", "join storm, dedupe off")):
        j = r.get(key)
        if j is None or skipped(label, j):
            continue
        t = j["seconds_until_all_listed"]
        node = (f"{t:.2f} s until all listed" if t is not None
                else f"{j['peers_done']}/{j['peers']} listed all")
        row(f"{label} ({j['peers']} peers): time / frames handled / delivered",
            f"{node}; {j['frames_handled']:,} handled; "
            f"{j['frames_delivered_until_idle']:,} delivered",
            f"node idle after {j['seconds_until_node_idle']:.1f} s; "
            f"max RSS {j['server_rss_kib_max'] / 1024:.0f} MiB",
            "-", f"{j['dropped'].get('slow_reader', 0)} closed as slow readers")
    lat = r.get("latency")
    if lat is not None and not skipped("mesh latency", lat):
        same, cross, raw = lat["prscd_same_node"], lat["prscd_cross_node"], lat["raw_nats"]
        row("mesh latency p50 / p99, same node", f"{same['p50_ms']:.2f} / {same['p99_ms']:.2f} ms",
            "-", "-", "-")
        row("mesh latency p50 / p99, node A -> NATS -> node B",
            f"{cross['p50_ms']:.2f} / {cross['p99_ms']:.2f} ms",
            f"{raw['p50_ms']:.2f} / {raw['p99_ms']:.2f} ms (nats-py pub->sub)",
            f"+{lat['added_cross_p50_ms']:.2f} / +{lat['added_cross_p99_ms']:.2f} ms added",
            "-")
    tr = r.get("tracing")
    if tr is not None and not skipped("tracing overhead", tr):
        from bench.tracing_overhead import table_rows as tracing_rows

        for cells in tracing_rows(tr):
            row(*cells)
    me = r.get("metrics")
    if me is not None and not skipped("metrics overhead", me):
        for shape in ("wide", "narrow"):
            s = me[shape]
            ok = "met" if s["cpu_ratio_on_vs_off"] <= 1.05 else "MISSED"
            row(f"metrics on: node CPU s per 100k deliveries, {me[f'peers_{shape}']} peers per "
                f"channel, median of {me['rounds']}", _n(s["cpu_s_per_100k_on"], 3),
                f"{_n(s['cpu_s_per_100k_off'], 3)} (METRICS=false)",
                f"{s['cpu_ratio_on_vs_off']:.3f}x CPU (paired {s['cpu_ratio_paired_median']:.3f}x)"
                f", {s['rate_ratio_on_vs_off']:.2f}x deliveries/s", f"<= 1.05x CPU ({ok})")
        for variant, label in (("as_shipped", "embedded bus"),
                               ("publish_timed", "bus publish timed, as on NATS"),
                               ("a_a_control", "A/A control: off vs off")):
            ip = me["in_process"][variant]
            ok = "met" if ip["ratio"] <= 1.05 else "MISSED"
            row(f"metrics on: node CPU us per frame in process ({ip['receivers']} receivers, "
                f"no sockets; {label})", _n(ip["us_per_frame_on"], 2),
                f"{_n(ip['us_per_frame_off'], 2)} (METRICS=false)",
                f"{ip['ratio']:.3f}x (+{ip['added_us_per_frame']:.2f} us)", f"<= 1.05x ({ok})")
    mq = r.get("members")
    if mq is not None and not skipped("members query", mq):
        api, raw = mq["prscd_api"], mq["raw_nats"]
        row(f"members query p50 / p99 ({mq['members']:,} members on {mq['nodes']} nodes, "
            f"{mq['answer_bytes'] / 1024:.0f} KiB JSON)",
            f"{api['p50_ms']:.2f} / {api['p99_ms']:.2f} ms",
            f"{raw['p50_ms']:.2f} / {raw['p99_ms']:.2f} ms (nats-py request/reply, same size)",
            f"{mq['ratio_p50_ms']:.1f}x / {mq['ratio_p99_ms']:.1f}x", "-")
        others = ", ".join(f"{c:.2f}" for c in mq["cpu_ms_per_query_other_nodes"])
        row("members query: node CPU per query", f"{mq['cpu_ms_per_query_asked_node']:.2f} ms "
            f"(asked node)", f"{others} ms (the other nodes)", "-", "-")
    h = r.get("hostile")
    if h is not None and not skipped("hostile clients", h):
        from bench import hostile

        for cells in hostile.markdown_rows(h):
            row(*cells)
    w = r.get("webhooks")
    if w is not None and not skipped("webhooks", w):
        row(f"webhooks ({w['rate']:.0f} joins/s): join -> receiver p50 / p99; batches",
            f"{w['delivery_p50_ms']:.0f} / {w['delivery_p99_ms']:.0f} ms; "
            f"{w['batches_per_s']} batches/s of {w['events_per_batch']} events", "-", "-", "-")
        row("webhooks: join ack p50 / p99; node CPU per join",
            f"{w['ack_p50_ms_on']:.2f} / {w['ack_p99_ms_on']:.2f} ms; "
            f"{w['node_cpu_ms_per_join_on']:.3f} ms (webhooks on)",
            f"{w['ack_p50_ms_off']:.2f} / {w['ack_p99_ms_off']:.2f} ms; "
            f"{w['node_cpu_ms_per_join_off']:.3f} ms (off)",
            f"{w['cpu_ratio_on_vs_off']:.2f}x CPU "
            f"({w['webhook_cpu_ms_per_event_added']:+.3f} ms per event)", "-")
    nat = r.get("native")
    if nat is not None and not skipped("native ceiling", nat):
        for window, x in nat["windows"].items():
            ok = "met" if x["cpu_vs_native"] <= 2.0 else "MISSED"
            row(f"native ceiling ({nat['peers']} peers, {window} in flight): "
                "server CPU s per 100k deliveries",
                _n(x["prscd_cpu_s_per_100k"], 3),
                f"{_n(x['native_cpu_s_per_100k'], 3)} ({nat['baseline']}); "
                f"{_n(x['raw_cpu_s_per_100k'], 3)} (`websockets.broadcast`)",
                f"{x['cpu_vs_native']:.2f}x native's CPU",
                f"<= 2x with one in flight ({ok})" if window == "1" else "-")
    wt = r.get("webtransport")
    if wt is not None and not skipped("webtransport fan-out", wt):
        from bench.wt_fanout import table_rows

        for cells in table_rows(wt):
            row(*cells)
    wm = r.get("wt_memory")
    if wm is not None and not skipped("webtransport idle memory", wm):
        from bench.wt_memory import table_rows as wt_memory_rows

        for cells in wt_memory_rows(wm):
            row(*cells)
    g = r.get("geo")
    if g is not None and not skipped("geo (WAN)", g):
        from bench.geo import table_rows as geo_rows

        for cells in geo_rows(g):
            row(*cells)
    ka = r.get("keepalive")
    if ka is not None and not skipped("keepalive", ka):
        from bench.keepalive import table_rows as keepalive_rows

        for cells in keepalive_rows(ka):
            row(*cells)
    wk = r.get("workers")
    if wk is not None and not skipped("workers", wk):
        for x in wk["rows"]:
            rss = ", ".join(f"{k / 1024:.0f}" for k in x["worker_rss_idle_kib"])
            row(f"--workers 2 vs 1, {x['transport']} ({x['receivers']} receivers, "
                f"{x['window']} in flight): deliveries per node-CPU-second",
                f"{_n(x['deliveries_per_cpu_s_2'])} ({_n(x['deliveries_per_s_2'])}/s; "
                f"idle RSS {rss} MiB per worker)",
                f"{_n(x['deliveries_per_cpu_s_1'])} ({_n(x['deliveries_per_s_1'])}/s, 1 worker)",
                f"{x['ratio']:.2f}x per CPU-s, {x['throughput_ratio']:.2f}x per s", "-")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(ALL),
                        help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds, not minutes")
    parser.add_argument("--tls", action="store_true", help="also run fan-out with TLS on")
    parser.add_argument("--storm-plain", action="store_true",
                        help="also run the join storm with DEDUPE_PEER_STATE=false")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(ALL)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    out = Path(args.out)
    results = run(names, out, quick=args.quick, tls=args.tls, storm_plain=args.storm_plain)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
