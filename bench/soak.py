"""Soak: thousands of peers on a three-region mesh for minutes, faults in the middle,
every message and every presence change accounted for.

    python -m bench.soak --minutes 10 --peers 2000        # the long run
    python -m bench.soak --minutes 1.25 --peers 150       # what CI runs (tests/test_soak.py)

What runs: ``infra.cluster`` on free ports (three nats-servers joined by gateways, three
prscd nodes with default settings, limits included), and ``--procs`` client processes of
raw WebSocket peers that behave like ``@yomo/presence`` (``bench/protoclient.py``).
Peers are spread over the three regions and ``--channels`` channels, every channel
spanning all three regions.

* **Steady peers** (most) join once and stay: each broadcasts a numbered message every
  ``--msg-interval`` seconds and changes its state every ``--state-interval``. When
  their node dies they reconnect (same id) as soon as it is back, and re-join.
* **Churn peers** (``--churn``) loop: connect, join, change state, broadcast, then leave
  (peer_offline, then close) or vanish (TCP abort), pause, and again, same id.

Faults, a third and two thirds of the way through: one NATS server restart (SIGTERM,
started again 3 s later) and one node ``kill -9`` followed by a restart.

Accounting. Every client process logs what it sent (message id, channel, time) and
what each steady peer received and when it was joined. A message is *expected* at a
steady peer of its channel (not the sender) when it was sent while that peer was joined
(after its join ack, before its connection dropped). Expected but never received is
*lost*; received twice is a *duplicate*. Losses are split by send time: steady state, or
within a fault window (from 1 s before the fault until its recovery plus ``--settle``).
At the end, churn stops, the mesh settles, and every steady peer's member list (built
from frames exactly as the real client does) is compared with who is really there:
*stale* members (listed, gone) and *missing* members (there, not listed), and states
older than the member's last. Node RSS (and its anonymous part, RssAnon) is sampled
every 10 s; growth is measured from the end of warm-up (the ramp-up plus up to a
minute, and a minute of each process) to the last sample before churn stops, so both
ends are under the same load. Error and warning lines of the node logs are counted.

Memory investigation (docs/soak.md): ``--memwatch SECONDS`` makes the nodes log RSS,
glibc's heap, pymalloc blocks and live objects by type (bench/memwatch.py), ``--trace``
adds tracemalloc from the end of the ramp-up, ``--node-env KEY=VALUE`` sets node
settings or glibc tunables (``MALLOC_TRIM_INTERVAL=0``, ``MALLOC_ARENA_MAX=2``).

The report is printed and written to ``--out`` (``soak.json``); the exit status is 1
when a steady-state loss, a duplicate, a stale or missing member, a stale state, an
error log line or (runs of 5 minutes or more) RSS growth of 5 % or more after warm-up
is seen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGIONS = ("us-east", "eu-west", "ap-south")
ROOT = Path(__file__).resolve().parent.parent


# -- the plan every process derives from the same arguments ---------------------------


@dataclass(frozen=True)
class Plan:
    peers: int
    procs: int
    channels: int
    churn: float
    t0: float  # time.monotonic() (system-wide on Linux) when ramp-up starts
    ramp: float
    stop: float  # steady traffic and churn end here
    snapshot: float  # member lists are read here
    end: float
    msg_interval: float
    state_interval: float
    churn_cycle: float
    ports: list[int]  # node port per region

    def region(self, i: int) -> int:
        return i % 3

    def channel(self, i: int) -> str:
        return f"soak-{(i // 3) % self.channels}"

    def mine(self, worker: int) -> list[int]:
        return [i for i in range(self.peers) if i % self.procs == worker]

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))


def is_steady(plan: Plan, i: int) -> bool:
    """Peers 0..n: a ``churn`` fraction churns, spread evenly over channels and regions."""
    if plan.churn <= 0:
        return True
    return int((i + 1) * plan.churn) == int(i * plan.churn)


# -- the client processes ---------------------------------------------------------------


@dataclass
class SteadyLog:
    intervals: list[list[float]] = field(default_factory=list)
    got: dict[int, float] = field(default_factory=dict)  # message id -> first arrival
    dups: int = 0
    state_version: int = 0


class Worker:
    def __init__(self, plan: Plan, worker: int) -> None:
        from bench.protoclient import ProtoClient

        self.ProtoClient = ProtoClient
        self.plan = plan
        self.worker = worker
        self.sends: list[tuple[int, str, float, int]] = []  # id, channel, time, sender
        self.steady: dict[int, SteadyLog] = {}
        self.clients: dict[int, Any] = {}
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.final_versions: dict[str, int] = {}
        self.latency_ms: list[float] = []

    def base(self, i: int) -> str:
        return f"wss://127.0.0.1:{self.plan.ports[self.plan.region(i)]}"

    def on_data(self, i: int) -> Any:
        log = self.steady.get(i)

        def handle(client: Any, sender: str, body: dict[str, Any]) -> None:
            if log is None or body.get("event") != "m":
                return
            try:
                data = json.loads(body["data"])
                mid, sent = int(data["n"]), float(data["t"])
            except (ValueError, KeyError, TypeError):
                self.errors["bad data"] += 1
                return
            if mid in log.got:
                log.dups += 1
            else:
                now = time.monotonic()
                log.got[mid] = now
                self.latency_ms.append((now - sent) * 1000)

        return handle

    async def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def connect_join(self, i: int, client: Any, until: float) -> bool:
        """Connect and join, retrying (node down, handshake refused) until ``until``."""
        while time.monotonic() < until:
            try:
                await client.connect()
                await client.join(self.plan.channel(i))
                return True
            except Exception as exc:
                self.errors[f"connect: {type(exc).__name__}"] += 1
                with contextlib.suppress(Exception):
                    client.abort()
                await asyncio.sleep(0.3 + random.random() * 0.4)
        return False

    async def run_steady(self, i: int) -> None:
        plan, log = self.plan, self.steady[i]
        cid = f"p{i}"
        client = self.ProtoClient(self.base(i), cid, on_data=self.on_data(i), state={"v": 0})
        self.clients[i] = client
        await self.sleep_until(plan.t0 + plan.ramp * random.random())
        seq = 0
        next_msg = time.monotonic() + plan.msg_interval * random.random()
        next_state = time.monotonic() + plan.state_interval * random.random()
        while time.monotonic() < plan.stop:
            if not await self.connect_join(i, client, plan.stop):
                break
            self.counts["steady_joins"] += 1
            log.intervals.append([time.monotonic(), plan.end])
            while time.monotonic() < plan.stop and client.closed is None:
                now = time.monotonic()
                try:
                    if now >= next_msg:
                        seq += 1
                        mid = i * 1_000_000 + seq
                        t = time.monotonic()
                        await client.broadcast("m", f'{{"n":{mid},"t":{t:.6f}}}')
                        self.sends.append((mid, plan.channel(i), t, i))
                        next_msg += plan.msg_interval
                    if now >= next_state:
                        log.state_version += 1
                        await client.set_state(v=log.state_version)
                        next_state += plan.state_interval
                except Exception:
                    break  # the connection died: reconnect
                wake = min(next_msg, next_state, plan.stop)
                await asyncio.sleep(max(0.0, min(wake - time.monotonic(), 0.5)))
            if client.closed is not None:
                log.intervals[-1][1] = time.monotonic()
                self.counts["steady_drops"] += 1
                with contextlib.suppress(Exception):
                    await client.close()
        self.final_versions[cid] = log.state_version

    async def run_churn(self, i: int) -> None:
        plan = self.plan
        cid = f"p{i}"
        last = plan.stop - 1.0  # every churn peer is gone by then

        async def pause(low: float, high: float) -> None:
            await asyncio.sleep(max(0.0, min(random.uniform(low, high),
                                             last - time.monotonic())))

        await self.sleep_until(plan.t0 + plan.ramp * random.random())
        seq = 0
        version = 0
        while time.monotonic() < last - 2:
            client = self.ProtoClient(self.base(i), cid, state={"v": version})
            self.clients[i] = client
            if not await self.connect_join(i, client, last - 2):
                break
            self.counts["churn_joins"] += 1
            try:
                await pause(0.2, plan.churn_cycle / 2)
                version += 1
                await client.set_state(v=version)
                if time.monotonic() < last - 1.5:
                    seq += 1
                    mid = i * 1_000_000 + seq
                    t = time.monotonic()
                    await client.broadcast("m", f'{{"n":{mid},"t":{t:.6f}}}')
                    self.sends.append((mid, plan.channel(i), t, i))
                    # Leave well after it: an abort may discard bytes not yet read.
                    await pause(1.0, plan.churn_cycle / 2)
                if random.random() < 0.5:
                    await client.leave()
                    self.counts["churn_leaves"] += 1
                    await asyncio.sleep(0.05)
                    await client.close()
                else:
                    client.abort()
                    self.counts["churn_aborts"] += 1
            except Exception as exc:
                self.errors[f"churn: {type(exc).__name__}"] += 1
                with contextlib.suppress(Exception):
                    client.abort()
            await pause(0.2, plan.churn_cycle / 4)

    async def run(self) -> dict[str, Any]:
        plan = self.plan
        mine = plan.mine(self.worker)
        tasks = []
        for i in mine:
            if is_steady(plan, i):
                self.steady[i] = SteadyLog()
                tasks.append(asyncio.create_task(self.run_steady(i)))
            else:
                tasks.append(asyncio.create_task(self.run_churn(i)))
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sleep_until(plan.snapshot)
        members: dict[int, dict[str, int | None]] = {}
        joined: dict[int, bool] = {}
        for i in self.steady:
            client = self.clients[i]
            joined[i] = client.joined.is_set() and client.closed is None
            members[i] = {m: (s or {}).get("v") if s is not None else None
                          for m, s in client.members.items()}
        await asyncio.gather(*(c.close() for c in self.clients.values()),
                             return_exceptions=True)
        return {
            "worker": self.worker,
            "sends": self.sends,
            "steady": {i: {"intervals": log.intervals, "got": list(log.got), "dups": log.dups,
                           "last_at": max(log.got.values(), default=0.0)}
                       for i, log in self.steady.items()},
            "members": members,
            "joined": joined,
            "versions": self.final_versions,
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            "latency_ms": _sample(self.latency_ms, 20000),
            "latency_max_ms": max(self.latency_ms, default=0.0),
        }


def _sample(values: list[float], n: int) -> list[float]:
    picked = values if len(values) <= n else random.sample(values, n)
    return [round(v, 2) for v in picked]


def worker_main(plan_json: str, worker: int, out: str) -> int:
    plan = Plan.from_json(plan_json)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(Worker(plan, worker).run())
    Path(out).write_text(json.dumps(result))
    return 0


# -- the orchestrator ---------------------------------------------------------------------


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, and its anonymous part (the heap: what the process allocated; the rest is
    mapped files such as libpython, counted as their pages are first touched)."""
    out = {"rss_kib": 0, "anon_kib": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                out["anon_kib"] = int(line.split()[1])
    except OSError:
        pass
    return out


@dataclass
class Fault:
    name: str
    start: float
    end: float = 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from infra.cluster import Cluster, Ports
    from testkit.net import free_port_block

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="prscd-soak-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    base = free_port_block(12)
    duration = args.minutes * 60
    ramp = min(max(10.0, args.peers / 50), duration * 0.2)
    node_env = memwatch_env(args, out_dir, warm_s=3.0 + ramp) if args.memwatch else {}
    node_env.update(kv.split("=", 1) for kv in args.node_env)
    cluster = Cluster(out_dir / "cluster", Ports(nats=base, http=base + 3, gateway=base + 6,
                                                 node=base + 9), node_env=node_env)
    settle = args.settle
    report: dict[str, Any] = {"args": vars(args), "out": str(out_dir)}
    print(f"soak: {args.peers} peers, {args.minutes:g} min, cluster in {out_dir}", flush=True)
    cluster.up()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.monotonic() + 3.0
        stop = t0 + duration - 2 * settle
        plan = Plan(peers=args.peers, procs=args.procs, channels=args.channels,
                    churn=args.churn, t0=t0, ramp=ramp, stop=stop,
                    snapshot=stop + settle, end=stop + settle + 1,
                    msg_interval=args.msg_interval, state_interval=args.state_interval,
                    churn_cycle=args.churn_cycle,
                    ports=[cluster.port(r, "node") for r in REGIONS])
        for w in range(args.procs):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "bench.soak", "--worker", str(w),
                 "--plan", plan.to_json(), "--worker-out", str(out_dir / f"worker-{w}.json")],
                cwd=ROOT, stdout=open(out_dir / f"worker-{w}.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT))
        faults: list[Fault] = []
        rss: list[dict[str, Any]] = []
        warm = t0 + ramp + min(60.0, (stop - t0 - ramp) / 4)
        fault_at = [t0 + ramp + (stop - t0 - ramp) * k / 3 for k in (1, 2)]
        next_sample = time.monotonic()
        done_faults = 0
        while time.monotonic() < plan.end + 2 and any(w.poll() is None for w in workers):
            now = time.monotonic()
            if now >= next_sample:
                for r in REGIONS:
                    proc = cluster.procs.get(("node", r))
                    if proc is not None:
                        rss.append({"t": round(now - t0, 1), "region": r, "pid": proc.pid,
                                    **rss_kib(proc.pid)})
                next_sample += 10
            if done_faults < len(fault_at) and now >= fault_at[done_faults]:
                if done_faults == 0:
                    faults.append(nats_restart(cluster, "eu-west", settle))
                else:
                    faults.append(node_kill_restart(cluster, "ap-south", settle))
                f = faults[-1]
                print(f"soak: fault {f.name} at +{f.start - t0:.0f}s, recovered "
                      f"+{f.end - settle - t0:.1f}s", flush=True)
                done_faults += 1
            time.sleep(0.25)
        for w in workers:
            w.wait(timeout=max(30.0, plan.end - time.monotonic() + 30))
        results = []
        for w in range(args.procs):
            path = out_dir / f"worker-{w}.json"
            if not path.exists():
                raise RuntimeError(f"worker {w} wrote no results; see {out_dir}/worker-{w}.log")
            results.append(json.loads(path.read_text()))
        report.update(analyse(plan, results, faults, rss, warm, cluster, settle))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        cluster.down()
    (out_dir / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def memwatch_env(args: argparse.Namespace, out_dir: Path, warm_s: float) -> dict[str, str]:
    """Settings for bench/memwatch.py in the node processes (through bench/memsite)."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT / "bench" / "memsite"), str(ROOT)]),
            "PRSCD_MEMWATCH": str(out_dir / "memwatch"),
            "PRSCD_MEMWATCH_EVERY": str(args.memwatch),
            "PRSCD_MEMWATCH_TRACE_AT": str(warm_s if args.trace else -1)}


def nats_restart(cluster: Any, region: str, settle: float) -> Fault:
    fault = Fault(f"nats restart ({region})", time.monotonic())
    cluster.stop("nats", region, signal.SIGTERM)
    time.sleep(3)
    cluster.start_nats(region)
    cluster.wait_nats()
    cluster.wait_nodes()
    fault.end = time.monotonic() + settle
    return fault


def node_kill_restart(cluster: Any, region: str, settle: float) -> Fault:
    fault = Fault(f"node kill -9 + restart ({region})", time.monotonic())
    cluster.send_signal("node", region, signal.SIGKILL)
    cluster.stop("node", region)  # reap
    cluster.start_node(region)
    cluster.wait_nodes()
    fault.end = time.monotonic() + settle
    return fault


def analyse(plan: Plan, results: list[dict[str, Any]], faults: list[Fault],
            rss: list[dict[str, Any]], warm: float, cluster: Any,
            settle: float) -> dict[str, Any]:
    sends: dict[str, list[tuple[int, float, int]]] = defaultdict(list)
    for r in results:
        for mid, channel, t, sender in r["sends"]:
            sends[channel].append((mid, t, sender))
    windows = [(f.name, f.start - 1.0, f.end) for f in faults]

    def window_of(t: float) -> str:
        for name, a, b in windows:
            if a <= t <= b:
                return name
        return "steady"

    expected: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    received = dups = 0
    lost_samples: list[dict[str, Any]] = []
    for r in results:
        for key, log in r["steady"].items():
            i = int(key)
            got = set(log["got"])
            received += len(got)
            dups += log["dups"]
            for mid, t, sender in sends[plan.channel(i)]:
                if sender == i:
                    continue
                if not any(a < t < b - 0.5 for a, b in log["intervals"]):
                    continue
                where = window_of(t)
                expected[where] += 1
                if mid not in got:
                    lost[where] += 1
                    if len(lost_samples) < 20:
                        lost_samples.append({"mid": mid, "to": i, "at": round(t - plan.t0, 2),
                                             "window": where})
    # Presence at the end: every steady peer lists exactly the steady peers of its channel.
    steady_by_channel: dict[str, set[str]] = defaultdict(set)
    versions: dict[str, int] = {}
    for r in results:
        versions.update(r["versions"])
        for key in r["steady"]:
            steady_by_channel[plan.channel(int(key))].add(f"p{key}")
    stale = missing = stale_state = not_joined = 0
    presence_samples: list[str] = []
    for r in results:
        for key, members in r["members"].items():
            i = int(key)
            if not r["joined"][key]:
                not_joined += 1
                continue
            truth = steady_by_channel[plan.channel(i)] - {f"p{i}"}
            view = set(members)
            stale += len(view - truth)
            missing += len(truth - view)
            for m in view & truth:
                if members[m] != versions.get(m):
                    stale_state += 1
            if view != truth and len(presence_samples) < 10:
                presence_samples.append(f"p{i}: stale {sorted(view - truth)[:5]} "
                                        f"missing {sorted(truth - view)[:5]}")
    # Node logs: errors and warnings, grouped.
    log_lines: Counter[str] = Counter()
    errors: list[str] = []
    # Keepalive outcomes (node/silence.py, info lines): a steady peer found silent missed
    # no delivery (still delivered to) but flickered if it was released.
    keepalive: Counter[str] = Counter()
    for region in REGIONS:
        path = cluster.dir / "logs" / f"node-{region}.log"
        for line in path.read_text(errors="replace").splitlines():
            if "peer silent " in line:
                keepalive["silent"] += 1
            elif "peer heard again " in line:
                keepalive["rejoined" if "re-joins" in line else "heard"] += 1
            elif "code=1011" in line and "closing sid=" in line:
                keepalive["closed_1011"] += 1
            m = re.search(r"level=(error|warning|critical) logger=(\S+) (.*)", line)
            if m:
                text = re.sub(r"[0-9a-f]{8}\b|\d+(\.\d+)?", "#", m.group(3))[:90]
                log_lines[f"{m.group(1)} {m.group(2)} {text}"] += 1
                if m.group(1) != "warning":
                    errors.append(line[:300])
    # RSS per process incarnation: after warm-up vs the end of steady traffic. Both ends
    # are taken under the same load: the end is the last sample before churn stops (the
    # run's last samples fall while the peers close, which moves memory around).
    rss_report = []
    loaded_until = plan.stop - plan.t0
    for (region, pid), samples in _group(rss).items():
        # Warm-up: the run's, and a minute of this process (a restarted node fills up).
        since = max(warm - plan.t0, samples[0]["t"] + 60)
        after = [s for s in samples if since <= s["t"] <= loaded_until]
        first = samples[0]["rss_kib"]
        start, end = (after[0], after[-1]) if after else (None, samples[-1])
        base = start["rss_kib"] if start else None
        last = end["rss_kib"]
        rss_report.append({
            "region": region, "pid": pid, "first_kib": first,
            "after_warmup_kib": base, "end_kib": last,
            "growth_after_warmup_pct": round(100 * (last - base) / base, 2) if base else None,
            "anon_after_warmup_kib": start["anon_kib"] if start else None,
            "anon_end_kib": end["anon_kib"],
            "measured_s": [start["t"], end["t"]] if start else None,
            "samples": len(samples), "span_s": end["t"] - samples[0]["t"],
            "series_kib": [[s["t"], s["rss_kib"], s["anon_kib"]] for s in samples]})
    counts: Counter[str] = Counter()
    client_errors: Counter[str] = Counter()
    latency: list[float] = []
    for r in results:
        counts.update(r["counts"])
        client_errors.update(r["errors"])
        latency += r["latency_ms"]
    latency.sort()

    def pct(q: float) -> float:
        return latency[min(len(latency) - 1, int(q * len(latency)))] if latency else 0.0
    return {
        "messages_sent": sum(len(v) for v in sends.values()),
        "deliveries_expected": dict(expected),
        "deliveries_lost": dict(lost),
        "deliveries_received": received,
        "duplicates": dups,
        "lost_samples": lost_samples,
        "faults": [{"name": f.name, "at_s": round(f.start - plan.t0, 1),
                    "window_s": round(f.end - f.start + 1.0, 1)} for f in faults],
        "presence": {"stale_members": stale, "missing_members": missing,
                     "stale_states": stale_state, "steady_not_joined_at_end": not_joined,
                     "samples": presence_samples},
        "rss": rss_report,
        "keepalive": {k: keepalive[k] for k in ("silent", "heard", "rejoined", "closed_1011")},
        "node_log": {"errors": errors[:20], "error_lines": len(errors),
                     "by_message": dict(log_lines.most_common(30))},
        "client_counts": dict(counts),
        "client_errors": dict(client_errors),
        "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999),
                       "max": round(max((r["latency_max_ms"] for r in results), default=0), 1)},
    }


def _group(rss: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for s in rss:
        out[(s["region"], s["pid"])].append(s)
    return out


def verdict(report: dict[str, Any], long_run: bool) -> list[str]:
    problems = []
    if report["deliveries_lost"].get("steady", 0):
        problems.append(f"{report['deliveries_lost']['steady']} deliveries lost in steady state")
    if report["duplicates"]:
        problems.append(f"{report['duplicates']} duplicate deliveries")
    p = report["presence"]
    for key in ("stale_members", "missing_members", "stale_states",
                "steady_not_joined_at_end"):
        if p[key]:
            problems.append(f"{p[key]} {key.replace('_', ' ')}")
    if report["node_log"]["error_lines"]:
        problems.append(f"{report['node_log']['error_lines']} error lines in node logs")
    if long_run:
        for row in report["rss"]:
            g = row["growth_after_warmup_pct"]
            if g is not None and row["span_s"] >= 120 and g >= 5:
                problems.append(f"RSS of {row['region']} pid {row['pid']} grew {g}%")
    return problems


def summary(report: dict[str, Any]) -> str:
    lines = [f"messages sent          {report['messages_sent']}",
             f"deliveries expected    {report['deliveries_expected']}",
             f"deliveries lost        {report['deliveries_lost'] or 0}",
             f"deliveries received    {report['deliveries_received']}",
             f"duplicates             {report['duplicates']}",
             f"latency (ms)           {report['latency_ms']}",
             f"faults                 {report['faults']}",
             f"presence at the end    {report['presence']}",
             f"keepalive              {report.get('keepalive')}",
             "node RSS (KiB)"]
    for row in report["rss"]:
        lines.append(f"  {row['region']:9} pid {row['pid']:>7}: first {row['first_kib']} "
                     f"after warm-up {row['after_warmup_kib']} end {row['end_kib']} "
                     f"growth {row['growth_after_warmup_pct']}% over {row['span_s']:.0f}s "
                     f"(anon {row['anon_after_warmup_kib']} -> {row['anon_end_kib']}, "
                     f"measured {row['measured_s']})")
    lines.append(f"node log error lines   {report['node_log']['error_lines']}")
    for msg, n in report["node_log"]["by_message"].items():
        lines.append(f"  {n:6} {msg}")
    lines.append(f"clients                {report['client_counts']}")
    lines.append(f"client errors          {report['client_errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--peers", type=int, default=2000)
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--channels", type=int, default=0,
                        help="channels (default: peers / 20)")
    parser.add_argument("--churn", type=float, default=0.25, help="fraction of churn peers")
    parser.add_argument("--msg-interval", type=float, default=10.0)
    parser.add_argument("--state-interval", type=float, default=30.0)
    parser.add_argument("--churn-cycle", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds after a fault's recovery (and at the end) to settle")
    parser.add_argument("--out", default="", help="directory for soak.json and logs")
    parser.add_argument("--memwatch", type=float, default=0.0, metavar="SECONDS",
                        help="nodes log memory stats to OUT/memwatch every SECONDS "
                             "(bench/memwatch.py)")
    parser.add_argument("--node-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the node processes (repeatable), e.g. "
                             "MALLOC_ARENA_MAX=2")
    parser.add_argument("--trace", action="store_true",
                        help="with --memwatch: tracemalloc from the end of the ramp-up")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.plan, args.worker, args.worker_out)
    if not args.channels:
        args.channels = max(1, args.peers // 20)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    report = run(args)
    print(summary(report))
    problems = verdict(report, long_run=args.minutes >= 5)
    print("soak: " + ("OK" if not problems else "FAILED: " + "; ".join(problems)), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
