"""Idle memory per WebTransport peer, and where it goes (issue 14, goal 1: <= 40 KiB).

Two measurements, both with N peers joined to one channel and then idle (aioquic
WebTransport clients, ``bench/wt_clients.py``, in two worker processes; the WebSocket
peers of the baseline are TLS ``bench/wsclient.py`` peers):

* ``rss``: a ``prscd`` process per round (TLS on, WebTransport on): its RSS after the
  peers joined minus before, per peer, WebTransport and WebSocket in alternating rounds.
  RSS is what an operator pays; it also counts C allocations (OpenSSL, lsqpack) and what
  the allocators keep.
* ``where``: a node in this process with ``tracemalloc`` (25 frames): the growth from 0
  to N WebTransport peers grouped by the part that allocated it (the first frame from
  the allocation outwards that is not the standard library: aioquic's connection,
  streams, crypto, H3, ours), plus glibc's ``mallinfo2`` in-use bytes (what C code and
  large Python objects take) and each connection's own objects by attribute (the objects
  reachable from one connection and from no other: its unique deep size).

* ``steps``: one ``prscd`` per round and transport, its peers added in steps (1, 10, 50,
  100, 200, 500) and its memory read at each (``/proc/<pid>/status``: RSS, and its
  anonymous and file-backed parts). Why: RSS per peer from a fresh node, ``rss`` at 100
  peers, was 55.9 KiB against 38.4 at 500. The first WebTransport peer costs ~1.1 MiB
  once, nearly all of it file-backed: the code pages of pylsqpack's and cryptography's
  native libraries (``_binding.abi3.so``, ``_rust.abi3.so``) read in on their first use
  (``first_peer_by_mapping``, from ``/proc/<pid>/smaps``), shared, not the peer's; a
  WebSocket peer's first costs ~0.3 MiB (libcrypto's). Spread over 100 peers that is 11
  KiB each, over 500 two. So each case reports the first peer's cost apart
  (``first_peer_kib``) and the cost of every further peer, measured, not assumed:
  ``slope_kib_per_peer[n]`` = (RSS at n - RSS at 1) / (n - 1), the same for anonymous
  memory alone (``anon_slope_kib_per_peer``), and between steps (``step_kib_per_peer``).
  The slope keeps what a burst of handshakes leaves (peers connect 16 at a time per
  client process, two processes: ~32 handshakes in flight): memory a handshake took
  and gave back that the heap keeps, most of it spent by the first 50 peers (the step
  10-50 cost ~48 KiB a peer, later steps ~33). aioquic's three 16 KiB crypto buffers per
  handshake were the largest part: sized to the flight since (node/transports/quic_turn.py,
  ``crypto_buffer_size``), the slope at 100 went from 46.8 to 38.7 KiB (500: 36.3 to
  35.2) in one run; the next, INITIAL keys for QUIC v1 and v2 (~5.6 KiB each), kept
  until the handshake was confirmed: dropped once the version is known
  (``drop_other_initial_keys``), 38.2 to 36.2 in another. The goal (``met``) is the
  WebTransport slope at 100 and at 500 peers (and ``rss`` at N).

``python -m bench.wt_memory [--peers 500] [--rounds 3] [--only rss,steps,where]`` prints
JSON; ``python -m bench --only wt_memory`` runs it into results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import itertools
import json
import statistics
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.procs import Pool, start_node
from testkit.net import free_port

#: The keepalive settings of bench/wt_fanout.py: 500 clients on a busy machine can stall.
IDLE = {"WT_IDLE_TIMEOUT": "10", "WT_PING_INTERVAL": "4", "PING_INTERVAL": "10",
        "PING_TIMEOUT": "20"}
TARGET_KIB = 40
_STDLIB = (sysconfig.get_paths()["stdlib"], "<frozen", "<string>")


# -- RSS of a prscd process ------------------------------------------------------------


def _connect(pool: Pool, port: int, transport: str, ids: list[str], **how: Any) -> None:
    pool.call_all("wt_fanout_receivers", port=port, transport=transport,
                  per_worker=lambda i: {"ids": ids[i::len(pool)]}, **how)


def rss_round(pool: Pool, log_dir: Path, transport: str, peers: int, tag: str,
              settle: float, env: dict[str, str] | None = None,
              age: float = 0.0) -> dict[str, Any]:
    server = start_node(log_dir, tls=True, name=f"prscd-mem-{transport}", port=free_port(),
                        env={"WEBTRANSPORT": "true", **IDLE, **(env or {})})
    try:
        time.sleep(0.5)
        rss0 = server.rss_kib()
        _connect(pool, server.port, transport, [f"{tag}-{i}" for i in range(peers)])
        time.sleep(settle)
        rss1 = server.rss_kib()
        if age:  # idle longer: past the node's heap trim (MALLOC_TRIM_INTERVAL, 30 s)
            time.sleep(age)
        rss2 = server.rss_kib()
        still = sum(c["open"] for c in pool.call_all("open_count"))
    finally:
        pool.call_all("close_all")
        server.stop()
    return {"rss_before_kib": rss0, "rss_idle_kib": rss1, "rss_aged_kib": rss2, "open": still,
            "kib_per_peer": (rss1 - rss0) / peers, "aged_kib_per_peer": (rss2 - rss0) / peers}


#: (name, transport, extra node environment) measured in each round.
Case = tuple[str, str, dict[str, str]]
CASES: tuple[Case, ...] = (("webtransport", "webtransport", {}),
                           ("websocket", "websocket", {}))


def rss(log_dir: Path, *, peers: int = 500, rounds: int = 3, settle: float = 2.0,
        age: float = 0.0, workers: int = 2, cases: tuple[Case, ...] = CASES) -> dict[str, Any]:
    """``cases`` may add a node from another checkout (``PYTHONPATH``): before/after."""
    detail: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in cases}
    with Pool(workers, uvloop=False) as pool:  # aioquic clients: see bench/procs.py
        for r in range(rounds):
            # Rotate the order so that drift on a shared machine hits every case.
            for name, transport, env in cases[r % len(cases):] + cases[:r % len(cases)]:
                detail[name].append(rss_round(pool, log_dir, transport, peers,
                                              f"m{name[:3]}{r}", settle, env, age))
    per = {name: statistics.median(x["kib_per_peer"] for x in detail[name])
           for name, _, _ in cases}
    aged = {name: statistics.median(x["aged_kib_per_peer"] for x in detail[name])
            for name, _, _ in cases}
    out: dict[str, Any] = {"peers": peers, "rounds": rounds, "settle_s": settle,
                           "kib_per_peer": per, "detail": detail, "target_kib": TARGET_KIB}
    if age:
        out.update(age_s=age, aged_kib_per_peer=aged)
    if "webtransport" in per:
        out["met"] = per["webtransport"] <= TARGET_KIB
        if per.get("websocket"):
            out["ratio"] = per["webtransport"] / per["websocket"]
    return out


# -- steps: one node, its peers added in steps ------------------------------------------

#: Peers in the node at each reading of ``steps`` (up to ``peers``).
STEPS = (1, 10, 50, 100, 200, 500)
_STATUS = {"VmRSS": "rss_kib", "RssAnon": "anon_kib", "RssFile": "file_kib"}


def memory(pid: int) -> dict[str, int]:
    """RSS of a process and its anonymous and file-backed parts, from /proc (KiB)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS:
                out[_STATUS[key]] = int(value.split()[0])
    return out


def mappings(pid: int) -> Counter[str]:
    """Resident KiB per mapped file (``[heap]``, ``[anon]``, a library's name)."""
    out: Counter[str] = Counter()
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                name = head[5].strip().rsplit("/", 1)[-1] if len(head) > 5 else "[anon]"
            elif head[0] == "Rss:":
                out[name] += int(head[1])
    return out


def steps_round(pool: Pool, log_dir: Path, transport: str, counts: tuple[int, ...],
                tag: str, settle: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    server = start_node(log_dir, tls=True, name=f"prscd-steps-{transport}", port=free_port(),
                        env={"WEBTRANSPORT": "true", **IDLE, **(env or {})})
    try:
        time.sleep(0.5)
        readings = [{"peers": 0, **memory(server.pid)}]
        maps0 = mappings(server.pid)
        first: dict[str, int] = {}
        have = 0
        for n in counts:
            _connect(pool, server.port, transport, [f"{tag}-{i}" for i in range(have, n)])
            have = n
            time.sleep(settle)
            readings.append({"peers": n, **memory(server.pid)})
            if not first:  # what the first peer(s) made resident, by mapping
                grown = mappings(server.pid)
                grown.subtract(maps0)
                first = {k: v for k, v in grown.most_common() if v >= 16}
        still = sum(c["open"] for c in pool.call_all("open_count"))
    finally:
        pool.call_all("close_all")
        server.stop()
    return {"readings": readings, "open": still, "first_peer_by_mapping": first}


def step_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of the first peer's cost and the per-peer slopes after it."""
    counts = [r["peers"] for r in rounds[0]["readings"]]
    first = counts[1]
    values: dict[tuple[str, str], list[float]] = {}

    def add(key: str, at: str, value: float) -> None:
        values.setdefault((key, at), []).append(value)

    for x in rounds:
        got = {r["peers"]: r for r in x["readings"]}
        for part in ("rss", "file", "anon"):
            add(f"first_peer{'' if part == 'rss' else '_' + part}_kib", "",
                got[first][f"{part}_kib"] - got[0][f"{part}_kib"])
        for prev, n in itertools.pairwise(counts[1:]):
            add("kib_per_peer", str(n), (got[n]["rss_kib"] - got[0]["rss_kib"]) / n)
            for key, part in (("slope_kib_per_peer", "rss"), ("anon_slope_kib_per_peer", "anon")):
                add(key, str(n), (got[n][f"{part}_kib"] - got[first][f"{part}_kib"]) / (n - first))
            add("step_kib_per_peer", f"{prev}-{n}",
                (got[n]["rss_kib"] - got[prev]["rss_kib"]) / (n - prev))
    out: dict[str, Any] = {}
    for (key, at), vs in values.items():
        if at:
            out.setdefault(key, {})[at] = statistics.median(vs)
        else:
            out[key] = statistics.median(vs)
    return out


def steps(log_dir: Path, *, peers: int = 500, rounds: int = 3, settle: float = 2.0,
          workers: int = 2, cases: tuple[Case, ...] = CASES) -> dict[str, Any]:
    counts = (*(c for c in STEPS if c < peers), peers)
    detail: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in cases}
    with Pool(workers, uvloop=False) as pool:
        for r in range(rounds):
            for name, transport, env in cases[r % len(cases):] + cases[:r % len(cases)]:
                detail[name].append(steps_round(pool, log_dir, transport, counts,
                                                f"s{name[:3]}{r}", settle, env))
    out: dict[str, Any] = {"peers": list(counts), "rounds": rounds, "settle_s": settle,
                           "target_kib": TARGET_KIB, "detail": detail}
    for name, _, _ in cases:
        out[name] = step_summary(detail[name])
    if "webtransport" in out:
        slopes = out["webtransport"]["slope_kib_per_peer"]
        judged = {n: slopes[n] for n in ("100", str(peers)) if n in slopes}
        out["met"] = all(v <= TARGET_KIB for v in judged.values())
    return out


# -- where: a traced node in this process ----------------------------------------------


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_in_use() -> int:
    """Bytes glibc has handed out and not had back (heap + mmapped chunks)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return 0
    return int(info.uordblks + info.hblkhd)


def part(frames: Iterable[tracemalloc.Frame]) -> tuple[str, str]:
    """(part, site) of one allocation: the innermost frame outside the standard library;
    part is its file (package-relative), site adds the line."""
    for frame in reversed(list(frames)):
        name = frame.filename
        if name.startswith(_STDLIB) and "site-packages" not in name:
            continue
        short = name.rsplit("/site-packages/", 1)[-1]
        if "/work/" in short or short.startswith("/"):
            short = "/".join(short.rsplit("/", 3)[-2:])
        return short, f"{short}:{frame.lineno}"
    first = list(frames)[-1]
    return "stdlib", f"{first.filename.rsplit('/', 1)[-1]}:{first.lineno}"


#: Types whose objects every connection reaches (the node, the loop, the listener, a
#: channel's members): the walk of one connection's objects stops at them.
_SHARED_TYPES = frozenset({
    "WebTransportListener", "QuicServer", "Node", "Settings", "QuicConfiguration", "Counter",
    "Peer", "Channel", "Realm", "Presence", "_UnixSelectorEventLoop", "Loop", "Logger",
    "QuicLogger", "module", "function", "builtin_function_or_method",
    "code", "cell", "type", "Certificate", "_RSAPrivateKey", "_EllipticCurvePrivateKey",
    "RSAPrivateKey", "EllipticCurvePrivateKey"})


def _reachable(root: Any, stop: set[int]) -> dict[int, Any]:
    seen: dict[int, Any] = {}
    todo = [root]
    while todo:
        obj = todo.pop()
        key = id(obj)
        if key in seen or key in stop or type(obj).__name__ in _SHARED_TYPES:
            continue
        seen[key] = obj
        todo.extend(gc.get_referents(obj))
    return seen


def own_objects(conns: list[Any]) -> dict[str, Any]:
    """Per attribute of one connection (its H3Protocol, QuicConnection, H3Connection,
    tls.Context, sessions): bytes (``sys.getsizeof``, Python objects only) of the objects
    reachable from it and from no other connection, the median over a few connections."""
    sample, other = conns[:5], conns[5]
    other_reach = set(_reachable(other, set()))
    rows: dict[str, list[int]] = {}
    for conn in sample:
        taken = set(other_reach) | {id(conn)}
        holders = [("protocol", conn), ("quic", conn.quic), ("h3", conn.h3),
                   ("tls", conn.quic.tls)]
        for prefix, holder in holders:
            taken.add(id(holder))
            own = sys.getsizeof(holder) + (sys.getsizeof(vars(holder))
                                           if hasattr(holder, "__dict__") else 0)
            rows.setdefault(f"{prefix} (object itself)", []).append(own)
        for prefix, holder in reversed(holders):  # the innermost owner gets the bytes
            for attr, value in sorted(_attributes(holder).items()):
                if id(value) in taken:
                    continue
                found = _reachable(value, taken)
                taken |= set(found)
                size = sum(sys.getsizeof(o) for o in found.values())
                rows.setdefault(f"{prefix}.{attr}", []).append(size)
    return {k: statistics.median(v) for k, v in sorted(rows.items(), key=lambda kv:
                                                        -statistics.median(kv[1]))}


def _attributes(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "__dict__"):
        return vars(obj)
    names = [n for cls in type(obj).__mro__ for n in getattr(cls, "__slots__", ())]
    return {n: getattr(obj, n) for n in names if hasattr(obj, n)}


def census(conns: list[Any]) -> dict[str, float]:
    """Median count of the per-connection things that allocate."""
    def median(fn: Any) -> float:
        return statistics.median(fn(c) for c in conns)

    return {
        "quic_streams": median(lambda c: len(c.quic._streams)),
        "h3_streams": median(lambda c: len(c.h3._stream)),
        "crypto_streams": median(lambda c: len(c.quic._crypto_streams)),
        "crypto_buffers": median(lambda c: len(c.quic._crypto_buffers)),
        "packet_spaces": median(lambda c: len(c.quic._spaces)),
        "sent_packets": median(lambda c: sum(len(s.sent_packets)
                                             for s in c.quic._spaces.values())),
        "host_cids": median(lambda c: len(c.quic._host_cids)),
        "peer_cids": median(lambda c: len(c.quic._peer_cid_available)),
        "sessions": median(lambda c: len(c.sessions)),
    }


async def _traced(peers: int, frames: int, settle: float, workers: int,
                  env: dict[str, str]) -> dict[str, Any]:
    from node.app import App
    from node.config import Settings
    from node.tls import ensure_certificate

    tmp = Path(tempfile.mkdtemp(prefix="prscd-wtmem-"))
    cert = ensure_certificate("", "", tmp)
    port = free_port()
    settings = Settings.from_env({
        "PORT": str(port), "HOST": "127.0.0.1", "TLS": "true", "WEBTRANSPORT": "true",
        "PID_FILE": str(tmp / "pid"), "CERT_CACHE_DIR": str(tmp), "RATE_LIMIT": "0",
        "MAX_PEERS_PER_CHANNEL": "0", "MAX_CONNECTIONS": "0", "MALLOC_TRIM_INTERVAL": "0",
        **IDLE, **env})
    app = App(settings, cert)
    await app.start()
    loop = asyncio.get_running_loop()
    pool = await loop.run_in_executor(None, lambda: Pool(workers, uvloop=False))
    try:
        await loop.run_in_executor(None, pool.call_all, "open_count")  # workers up
        gc.collect()
        tracemalloc.start(frames)
        base, malloc0 = tracemalloc.take_snapshot(), malloc_in_use()
        overhead0 = tracemalloc.get_tracemalloc_memory()
        ids = [f"tr-{i}" for i in range(peers)]
        # Slow handshakes under tracemalloc: fewer at once, more time each.
        await loop.run_in_executor(None, lambda: _connect(pool, port, "webtransport", ids,
                                                          concurrency=4, timeout=60.0))
        await asyncio.sleep(settle)
        clients = await loop.run_in_executor(None, pool.call_all, "open_count")
        gc.collect()
        snap, malloc1 = tracemalloc.take_snapshot(), malloc_in_use()
        # tracemalloc's own tables are malloc'd too: not the node's.
        overhead = tracemalloc.get_tracemalloc_memory() - overhead0
        tracemalloc.stop()
        listener = next(x for x in app.listeners if type(x).__name__ == "WebTransportListener")
        conns = [c for c in listener.connections if c.sessions]
        own = own_objects(conns) if len(conns) > 5 else {}
        counted = census(conns) if conns else {}
    finally:
        await loop.run_in_executor(None, pool.call_all, "close_all")
        await loop.run_in_executor(None, pool.close)
        await app.stop()
    parts: Counter[str] = Counter()
    sites: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for stat in snap.compare_to(base, "traceback"):
        name, site = part(stat.traceback)
        parts[name] += stat.size_diff
        sites[site] += stat.size_diff
        counts[site] += stat.count_diff
    traced = sum(parts.values())
    return {
        "peers": peers, "connections_with_session": len(conns),
        "clients_open": sum(c["open"] for c in clients),
        "clients_closed": [c["codes"] for c in clients if c["closed"]],
        "traced_kib_per_peer": traced / 1024 / peers,
        "malloc_in_use_kib_per_peer": (malloc1 - malloc0 - overhead) / 1024 / peers,
        "census_per_connection": counted,
        "by_part_bytes_per_peer": {k: round(v / peers) for k, v in parts.most_common()
                                   if abs(v) >= peers * 16},
        "by_site_bytes_per_peer": {k: [round(v / peers), round(counts[k] / peers, 2)]
                                   for k, v in sites.most_common(40)},
        "own_objects_bytes_per_connection": {k: v for k, v in own.items() if v >= 16},
    }


def where(*, peers: int = 500, frames: int = 25, settle: float = 2.0, workers: int = 2,
          env: dict[str, str] | None = None) -> dict[str, Any]:
    return asyncio.run(_traced(peers, frames, settle, workers, env or {}))


def run(log_dir: Path, *, peers: int = 500, rounds: int = 3,
        only: Iterable[str] = ("rss", "steps", "where"), before: Path | None = None,
        age: float = 0.0, where_peers: int = 200) -> dict[str, Any]:
    """``where`` with fewer peers: handshakes under tracemalloc are slow. ``met``: every
    goal measured is met (``rss`` at N, the ``steps`` slopes at 100 and N)."""
    todo = set(only)
    out: dict[str, Any] = {}
    cases = CASES if before is None else (
        *CASES, ("webtransport_before", "webtransport", {"PYTHONPATH": str(before)}))
    if "rss" in todo:
        out["rss"] = rss(log_dir, peers=peers, rounds=rounds, cases=cases, age=age)
        out.update({k: out["rss"][k] for k in ("met", "ratio") if k in out["rss"]})
    if "steps" in todo:
        out["steps"] = steps(log_dir, peers=peers, rounds=rounds, cases=cases)
        out["met"] = out.get("met", True) and out["steps"]["met"]
    if "where" in todo:
        out["where"] = where(peers=min(peers, where_peers))
    return out


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of the results table (benchmark, prscd, baseline, ratio, target)."""
    out = []
    if "rss" in r:
        m = r["rss"]
        wt, ws = m["kib_per_peer"]["webtransport"], m["kib_per_peer"].get("websocket")
        out.append((f"WebTransport idle memory ({m['peers']} peers, median of {m['rounds']}): "
                    "node RSS per peer", f"{wt:.1f} KiB",
                    f"{ws:.1f} KiB (WebSocket, TLS)" if ws else "-",
                    f"{m['ratio']:.1f}x" if m.get("ratio") else "-",
                    f"<= {TARGET_KIB} KiB ({'met' if m['met'] else 'MISSED'})"))
    if "steps" in r:
        st = r["steps"]
        wt, ws = st["webtransport"], st.get("websocket")
        at = [n for n in ("100", str(st["peers"][-1])) if n in wt["slope_kib_per_peer"]]
        at = list(dict.fromkeys(at))

        def slopes(case: dict[str, Any]) -> str:
            return " / ".join(f"{case['slope_kib_per_peer'][n]:.1f}" for n in at)

        def first(case: dict[str, Any]) -> str:
            return (f"first peer {case['first_peer_kib']:.0f} KiB once, "
                    f"{case['first_peer_file_kib']:.0f} of it code pages")

        last = at[-1] if at else None
        ratio = (wt["slope_kib_per_peer"][last] / ws["slope_kib_per_peer"][last]
                 if ws and last and ws["slope_kib_per_peer"][last] else None)
        out.append((f"WebTransport idle memory, one node from 0 to {st['peers'][-1]} peers "
                    f"(median of {st['rounds']}): RSS per peer after the first, at "
                    f"{' / '.join(at)} peers",
                    f"{slopes(wt)} KiB ({first(wt)})",
                    f"{slopes(ws)} KiB ({first(ws)}) (WebSocket, TLS)" if ws else "-",
                    f"{ratio:.1f}x" if ratio else "-",
                    f"<= {TARGET_KIB} KiB ({'met' if st['met'] else 'MISSED'})"))
    if "where" in r:
        w = r["where"]
        top = ", ".join(f"{k} {v / 1024:.1f}" for k, v in
                        list(w["by_part_bytes_per_peer"].items())[:4])
        out.append((f"WebTransport idle memory ({w['peers']} peers, tracemalloc): Python heap "
                    "per peer", f"{w['traced_kib_per_peer']:.1f} KiB ({top} KiB)",
                    f"malloc in use {w['malloc_in_use_kib_per_peer']:.1f} KiB per peer", "-",
                    "-"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="rss,steps,where")
    p.add_argument("--age", type=float, default=0.0,
                   help="seconds idle before a second RSS reading (past the 30 s heap trim)")
    p.add_argument("--before", type=Path, default=None,
                   help="a checkout whose node/ is measured too (PYTHONPATH), as 'before'")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "prscd-wtmem")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.out, peers=args.peers, rounds=args.rounds, only=args.only.split(","),
                 before=args.before, age=args.age)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
