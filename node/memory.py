"""Give free heap memory back to the system: ``malloc_trim(0)`` every ``MALLOC_TRIM_INTERVAL``.

Why: every TLS connection on uvloop holds a 256 KiB read buffer from ``malloc``
(uvloop's SSLProtocol) of which it touches a few KiB. After glibc's first ``munmap`` of
such a buffer, its adaptive mmap threshold rises above 256 KiB and the buffers come from
the heap, interleaved with everything else (the heap of a node with 650 peers spans
~200 MiB). Under connection churn freed buffers and other freed chunks keep the pages
once written resident, and glibc returns only the top of the heap by itself: the
soak's RSS crept ~1 MiB a minute with a flat count of live objects and allocated blocks
(docs/soak.md). ``malloc_trim(0)`` also releases whole free pages inside the heap.

Measured in bench/soak.py (2,000 peers, three nodes): what a trim releases is 2-4 MiB
every 30 s and the RSS after trims is flat; what a trim costs is in docs/soak.md
(``debug`` log line per trim). Not glibc (musl, macOS): nothing happens.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger("prscd.memory")


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrim:
    """A task that trims the heap every ``interval`` seconds (0: no task at all)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.trim = malloc_trim() if interval > 0 else None
        self.trims = 0
        self.last_ms = 0.0
        self.max_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.trim is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self.trim is not None
        while True:
            await asyncio.sleep(self.interval)
            started = time.perf_counter()
            released = self.trim(0)
            self.last_ms = (time.perf_counter() - started) * 1000
            self.max_ms = max(self.max_ms, self.last_ms)
            self.trims += 1
            log.debug("malloc_trim released=%d took_ms=%.2f", released, self.last_ms)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
