"""Processes: the node under test (``prscd``), the raw baselines, and client workers.

Servers run as subprocesses; load generators run in worker processes driven over a
pipe, one asyncio loop (uvloop when installed) each. Nothing here shares a process
with the server being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from testkit.net import insecure

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (KiB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prscd_command() -> list[str]:
    exe = Path(sys.executable).with_name("prscd")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "node"]


@dataclass
class Server:
    """A server subprocess listening on ``port`` (TCP, loopback)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    tls: bool
    log_path: Path
    tmp: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def http(self, path: str) -> bytes:
        scheme = "https" if self.tls else "http"
        ctx = insecure() if self.tls else None  # (no CA store parsed per request: ~45 ms)
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.port}{path}",
                                    context=ctx, timeout=120) as resp:
            return resp.read()

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.http("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
        return out

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.proc.returncode


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log_path: Path,
                    timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}:\n"
                               + log_path.read_text()[-2000:])
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not listen on {port} within {timeout} s; see {log_path}")


def start_node(log_dir: Path, *, tls: bool = False, name: str = "prscd",
               env: dict[str, str] | None = None, port: int | None = None,
               args: list[str] | None = None) -> Server:
    """Run ``prscd`` with TLS as asked, on loopback, reading no ``.env`` file."""
    port = port or free_port()
    tmp = Path(tempfile.mkdtemp(prefix="prscd-bench-"))
    full_env = {k: v for k, v in os.environ.items() if k not in _NODE_KEYS}
    full_env.update({
        "PORT": str(port), "HOST": "127.0.0.1", "TLS": "true" if tls else "false",
        "PID_FILE": str(tmp / "prscd.pid"), "CERT_CACHE_DIR": str(tmp),
        # Benchmarks measure the server, not its per-peer limits (one sender at full
        # speed would be rate-limited; capacity runs exceed a channel's peer limit).
        "RATE_LIMIT": "0", "MAX_PEERS_PER_CHANNEL": "0", "MAX_CONNECTIONS": "0",
    })
    full_env.update(env or {})
    log_path = log_dir / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*prscd_command(), "--env-file", os.devnull, *(args or [])],
                                env=full_env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    _wait_listening(proc, port, log_path)
    return Server(name, proc, port, tls, log_path, tmp)


# Settings a developer's shell might carry that would change what is measured.
_NODE_KEYS = {"PORT", "HOST", "TLS", "NATS_URL", "DEBUG", "PUBLIC_KEYS", "PUBLIC_KEYS_FILE",
              "PING_INTERVAL", "PING_TIMEOUT", "WRITE_BUFFER_LIMIT", "WS_COMPRESSION",
              "WEBTRANSPORT", "CERT_FILE", "KEY_FILE", "MESH_ID", "PID_FILE",
              "RATE_LIMIT", "RATE_BURST", "MAX_PEERS_PER_CHANNEL", "MAX_CONNECTIONS",
              "MAX_CHANNELS_PER_PEER", "AUTH_WEBHOOK_URL"}


def start_raw(log_dir: Path, mode: str, *, tls: bool = False) -> Server:
    """The raw ``websockets`` baseline (``bench/rawserver.py``)."""
    port = free_port()
    log_path = log_dir / f"raw-{mode}-{port}.log"
    cmd = [sys.executable, "-m", "bench.rawserver", "--port", str(port), "--mode", mode]
    tmp = None
    if tls:
        tmp = Path(tempfile.mkdtemp(prefix="raw-bench-"))
        cmd += ["--tls-dir", str(tmp)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    _wait_listening(proc, port, log_path)
    return Server(f"raw-{mode}", proc, port, tls, log_path, tmp)


def start_nats(log_dir: Path) -> Server | None:
    exe = Path(sys.executable).with_name("nats-server")
    if not exe.exists():
        found = shutil.which("nats-server")
        if not found:
            return None
        exe = Path(found)
    port = free_port()
    log_path = log_dir / f"nats-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(exe), "-a", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    _wait_listening(proc, port, log_path)
    return Server("nats-server", proc, port, False, log_path)


# -- client workers ------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Pool:
    """``n`` worker processes, each running commands from ``bench.clients.COMMANDS``."""

    def __init__(self, n: int, *, uvloop: bool = True) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for index in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, index, uvloop),
                               daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def __len__(self) -> int:
        return len(self.conns)

    def send(self, index: int, command: str, **kwargs: Any) -> None:
        self.conns[index].send((command, kwargs))

    def recv(self, index: int, timeout: float = 600.0) -> Any:
        conn = self.conns[index]
        if not conn.poll(timeout):
            raise WorkerError(f"worker {index}: no answer within {timeout} s")
        status, value = conn.recv()
        if status != "ok":
            raise WorkerError(f"worker {index}: {value}")
        return value

    def call(self, index: int, command: str, timeout_: float = 600.0, **kwargs: Any) -> Any:
        self.send(index, command, **kwargs)
        return self.recv(index, timeout_)

    def call_all(self, command: str, per_worker: Callable[[int], dict[str, Any]] | None = None,
                 timeout_: float = 600.0, only: Iterable[int] | None = None,
                 **kwargs: Any) -> list[Any]:
        """Send to every worker first, then collect: the workers run concurrently.

        ``timeout_`` bounds the wait here; other keywords go to the command."""
        indexes = list(range(len(self)) if only is None else only)
        for i in indexes:
            self.send(i, command, **{**kwargs, **(per_worker(i) if per_worker else {})})
        return [self.recv(i, timeout_) for i in indexes]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_main(conn: Connection, index: int, use_uvloop: bool = True) -> None:
    # Line-buffered so a crash explains itself in the parent's stderr.
    # Without uvloop for aioquic clients: under it some of 16 concurrent handshakes
    # never completed (bench/wt_clients.py).
    try:
        import uvloop
        if not use_uvloop:
            raise ImportError
    except ImportError:
        asyncio.run(_serve(conn, index))
    else:
        uvloop.run(_serve(conn, index))


async def _serve(conn: Connection, index: int) -> None:
    from bench import clients

    loop = asyncio.get_running_loop()
    state = clients.WorkerState(index)
    incoming: asyncio.Queue[Any] = asyncio.Queue()

    def reader() -> None:  # a thread: the pipe stays blocking (uvloop would change that)
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = None
            loop.call_soon_threadsafe(incoming.put_nowait, msg)
            if msg is None:
                return

    threading.Thread(target=reader, daemon=True).start()
    while True:
        msg = await incoming.get()
        if msg is None:
            break
        name, kwargs = msg
        try:
            result = await clients.COMMANDS[name](state, **kwargs)
        except Exception:
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("ok", result))
    await state.shutdown()
