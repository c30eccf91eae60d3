"""``prscd --workers N``: N node processes sharing one port, each its own mesh member.

The WebSocket socket (and the WebTransport UDP socket) is bound with SO_REUSEPORT, so
the kernel spreads new connections over the workers. Workers do not share memory: two
peers of one channel may sit on different workers, so they meet through the bus like
peers on different machines. That is why several workers need ``NATS_URL``.

The supervisor (this process) owns the pid file and the terminal: it forwards SIGTERM /
SIGINT (drain, then stop; a second one cuts the drain short) and SIGUSR1 / SIGUSR2
(state and stats dumps, one per worker) to every worker, restarts a worker that dies
on its own (after a pause, so a crash loop does not spin), and exits when all have
stopped. Each worker is a plain ``prscd`` process with its own pid file
(``PID_FILE.<n>``) and dies with the supervisor (PR_SET_PDEATHSIG) if that is killed.

Metrics: ``/metrics`` on the shared PORT answers from whichever worker the kernel picks.
With ``METRICS_PORT=P`` worker n serves its own on P+n (node/metrics.py), one scrape
target per worker, as each is its own mesh member (docs/metrics.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

from node.config import Settings
from node.introspect import remove_pid_file, write_pid_file

log = logging.getLogger("prscd.workers")

RESTART_PAUSE = 1.0
#: How long after the last forwarded stop signal before stragglers are killed.
STOP_GRACE = 10.0


def check(settings: Settings, workers: int) -> str | None:
    """Why ``workers`` cannot run with these settings, or None."""
    if workers < 1:
        return "--workers must be at least 1"
    if workers > 1 and not settings.nats_url:
        return ("--workers N needs NATS_URL: each worker is its own mesh member, and "
                "without a bus peers on different workers would not see each other")
    if settings.metrics_port and settings.metrics_port + workers - 1 > 65535:
        return f"METRICS_PORT={settings.metrics_port} leaves no port for worker {workers - 1}"
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host or "", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(settings: Settings, workers: int, env_file: str,
              environ: Mapping[str, str]) -> int:
    """Run the workers; each gets ``environ`` (the process environment, as ``load()`` read
    it: only node/config.py reads ``os.environ``) with its own PORT and PID_FILE."""
    port = settings.port or _free_port(settings.host)
    pid_path = settings.with_(port=port).pid_path()
    command = [sys.executable, "-m", "node", "--env-file", env_file, "run"]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping_since: float | None = None
    pending: list[int] = []

    def start(index: int) -> None:
        env = {**environ, "PORT": str(port), "PID_FILE": f"{pid_path}.{index}"}
        if settings.metrics_port:  # PORT is shared: each worker's /metrics on a port of its own
            env["METRICS_PORT"] = str(settings.metrics_port + index)
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which
        # forwards one signal (a second one would cut the drain short).
        procs[index] = subprocess.Popen(command, env=env, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        log.info("worker started index=%d pid=%d port=%d", index, procs[index].pid, port)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping_since
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping_since = time.monotonic()
            signum = signal.SIGTERM
        pending.append(signum)

    # SIGHUP too: each worker reloads PUBLIC_KEYS_FILE (unhandled, it would end the supervisor).
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, forward)
    write_pid_file(pid_path)
    log.info("supervisor pid=%d workers=%d port=%d pid_file=%s", os.getpid(), workers, port,
             pid_path)
    if workers > 1 and not settings.metrics_port:
        log.warning("/metrics on port %d answers from one worker at a time: set METRICS_PORT "
                    "for one /metrics port per worker (docs/metrics.md)", port)
    restart_at: dict[int, float] = {}
    try:
        for index in range(workers):
            start(index)
        while procs:
            while pending:
                signum = pending.pop(0)
                for proc in procs.values():
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signum)
            for index, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                if stopping_since is not None:
                    log.info("worker stopped index=%d pid=%d code=%d", index, proc.pid, code)
                    del procs[index]
                elif index not in restart_at:
                    log.error("worker died index=%d pid=%d code=%d: restarting in %.0f s",
                              index, proc.pid, code, RESTART_PAUSE)
                    restart_at[index] = time.monotonic() + RESTART_PAUSE
            for index, when in list(restart_at.items()):
                if stopping_since is not None:
                    procs.pop(index, None)
                    del restart_at[index]
                elif time.monotonic() >= when:
                    del restart_at[index]
                    start(index)
            if stopping_since is not None and time.monotonic() - stopping_since > (
                    settings.drain_seconds + STOP_GRACE):
                for index, proc in procs.items():
                    log.error("worker did not stop index=%d pid=%d: killing", index, proc.pid)
                    proc.kill()
                    proc.wait()
                procs.clear()
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            proc.kill()
        remove_pid_file(pid_path)
    log.info("all workers stopped")
    return 0
