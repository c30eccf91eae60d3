"""Memory watch for a node process (investigation only; off unless asked for).

``bench/soak.py --memwatch`` starts the nodes with ``bench/memsite`` on PYTHONPATH and
``PRSCD_MEMWATCH=<dir>``: the ``sitecustomize`` there calls :func:`start`, which runs a
daemon thread that every ``PRSCD_MEMWATCH_EVERY`` seconds appends one JSON line to
``<dir>/memwatch-<pid>.jsonl``: RSS, glibc's ``mallinfo2`` (what C code such as OpenSSL
and libuv holds), pymalloc's allocated blocks, live objects by type, and from
``PRSCD_MEMWATCH_TRACE_AT`` seconds on, ``tracemalloc``'s growth since then by place;
with ``PRSCD_MEMWATCH_TRIM=1`` it calls ``malloc_trim(0)`` after each sample and logs the
RSS after it (what glibc held free but resident).
Nothing of this is imported by the node itself.

The sample is taken on the event loop's thread, between callbacks: ``gc.get_objects()``
from another thread can catch a tuple being built (``tuple(generator)``) and make its
resize fail with SystemError in the node.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def mallinfo() -> dict[str, int]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {name: getattr(info, name) // 1024 for name, _ in _Mallinfo2._fields_}


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def type_counts(found: dict[str, Any]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] += 1
        if name == "HeapTrim":  # node/memory.py: how many trims, how long they took
            found["heap_trim"] = {"trims": obj.trims, "last_ms": round(obj.last_ms, 3),
                                  "max_ms": round(obj.max_ms, 3)}
    return counts


_loop_of_node: list[Any] = []


def _remember_loop(original: Any) -> Any:
    def set_running_loop(loop: Any) -> None:
        if loop is not None and not _loop_of_node:
            _loop_of_node.append(loop)
        original(loop)

    return set_running_loop


def _on_loop(fn: Any) -> None:
    """Run ``fn`` on the node's event loop and wait for it (it samples there)."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        finally:
            done.set()

    _loop_of_node[0].call_soon_threadsafe(run)
    done.wait(60)


def _loop(out: Path, every: float, trace_at: float, frames: int) -> None:
    started = time.monotonic()
    state: dict[str, Any] = {"base": None, "first_types": None,
                             "trim": os.environ.get("PRSCD_MEMWATCH_TRIM") == "1"}
    while True:
        time.sleep(every)
        if _loop_of_node:
            _on_loop(lambda: _sample(out, started, trace_at, frames, state))


def _sample(out: Path, started: float, trace_at: float, frames: int,
            state: dict[str, Any]) -> None:
    now = time.monotonic() - started
    if state["base"] is None and trace_at >= 0 and now >= trace_at:
        tracemalloc.start(frames)
        state["base"] = tracemalloc.take_snapshot()
    found: dict[str, Any] = {}
    types = type_counts(found)
    if state["first_types"] is None and now >= trace_at:
        state["first_types"] = types
    row: dict[str, Any] = {
        "t": round(now, 1), "rss_kib": rss_kib(), "mallinfo_kib": mallinfo(),
        "pymalloc_blocks": sys.getallocatedblocks(), "gc_objects": sum(types.values()),
        "gc_counts": gc.get_count(),
        "gc_collections": [g["collections"] for g in gc.get_stats()],
        "types_top": types.most_common(25),
        **found,
    }
    if state["first_types"] is not None:
        diff = types.copy()
        diff.subtract(state["first_types"])
        row["types_growth"] = [kv for kv in diff.most_common(25) if kv[1] > 0]
    if state["base"] is not None:
        snap = tracemalloc.take_snapshot()
        row["traced_kib"] = tracemalloc.get_traced_memory()[0] // 1024
        row["tracemalloc_overhead_kib"] = tracemalloc.get_tracemalloc_memory() // 1024
        stats = snap.compare_to(state["base"], "traceback" if frames > 1 else "lineno")
        row["trace_growth"] = [
            {"kib": round(s.size_diff / 1024, 1), "count": s.count_diff,
             "where": [f"{f.filename.rsplit('/site-packages/', 1)[-1]}:{f.lineno}"
                       for f in s.traceback][-frames:]}
            for s in stats[:30] if s.size_diff > 0]
    if state.get("trim"):  # what glibc holds free but resident, given back
        started = time.perf_counter()
        row["trim_released"] = _malloc_trim()
        row["trim_ms"] = round((time.perf_counter() - started) * 1000, 3)
        row["rss_after_trim_kib"] = rss_kib()
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _malloc_trim() -> int:
    try:
        return int(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return -1


def start() -> None:
    directory = os.environ.get("PRSCD_MEMWATCH", "")
    if not directory:
        return
    out = Path(directory) / f"memwatch-{os.getpid()}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    every = float(os.environ.get("PRSCD_MEMWATCH_EVERY", "30"))
    trace_at = float(os.environ.get("PRSCD_MEMWATCH_TRACE_AT", "-1"))
    frames = int(os.environ.get("PRSCD_MEMWATCH_FRAMES", "1"))
    # Before uvloop is imported: it keeps asyncio._set_running_loop at import time.
    asyncio._set_running_loop = asyncio.events._set_running_loop = _remember_loop(  # type: ignore
        asyncio.events._set_running_loop)
    threading.Thread(target=_loop, args=(out, every, trace_at, frames), daemon=True,
                     name="memwatch").start()
