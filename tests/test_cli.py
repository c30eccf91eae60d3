"""The `prscd` command as other tooling uses it: a real process, signals, pid file, .env."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers import data_frame, get, insecure, join_frame, recv
from tests.mesh_helpers import free_port

PRSCD = [sys.executable, "-m", "node"]


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, workdir: Path) -> None:
        self.proc, self.port, self.workdir = proc, port, workdir
        self.log: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            async with self._changed:
                self.log.append(raw.decode(errors="replace").rstrip())
                self._changed.notify_all()

    async def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        async def find() -> str:
            async with self._changed:
                while True:
                    for line in self.log:
                        if needle in line:
                            return line
                    if self.proc.returncode is not None or self._reader.done():
                        raise AssertionError(f"prscd exited before logging {needle!r}")
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(f"no log line with {needle!r}:\n" + "\n".join(self.log[-20:])) from None


@pytest.fixture
async def prscd(tmp_path: Path) -> AsyncIterator[Proc]:
    async with run_prscd(tmp_path) as proc:
        yield proc


@contextlib.asynccontextmanager
async def run_prscd(tmp_path: Path, **extra: str) -> AsyncIterator[Proc]:
    port = free_port()
    dotenv = f"PORT={port}\nMESH_ID=from-dotenv\nHOST=127.0.0.1\n"
    dotenv += "".join(f"{k}={v}\n" for k, v in extra.items())
    (tmp_path / ".env").write_text(dotenv)
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "MESH_ID", "NATS_URL")}
    env.update(CERT_CACHE_DIR=str(tmp_path / "certs"), PID_FILE=str(tmp_path / "prscd.pid"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = await asyncio.create_subprocess_exec(
        *PRSCD, cwd=tmp_path, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    running = Proc(proc, port, tmp_path)
    try:
        await running.wait_log("listening")
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_starts_with_dotenv_and_answers_health(prscd: Proc) -> None:
    status, headers, body = await get(f"https://127.0.0.1:{prscd.port}/health")
    assert headers["X-Prscd-MeshID"] == "from-dotenv"
    assert status == 200
    assert json.loads(body)["mesh_id"] == "from-dotenv"
    line = await prscd.wait_log("spki_sha256=")
    assert "generated=True" in line
    assert (prscd.workdir / "prscd.pid").read_text().strip() == str(prscd.proc.pid)


async def test_signals_dump_state_and_stats(prscd: Proc) -> None:
    ws = await connect(f"wss://127.0.0.1:{prscd.port}/v1?publickey=k&id=alice", ssl=insecure())
    await ws.send(join_frame("room", "alice"))
    await recv(ws)
    prscd.proc.send_signal(signal.SIGUSR1)
    line = await prscd.wait_log("state dump")
    dump = json.loads(line.split("state dump ", 1)[1])
    [peer] = dump["realms"]["default"]["room"]["peers"]
    assert peer["id"] == "alice" and peer["transport"] == "websocket"
    prscd.proc.send_signal(signal.SIGUSR2)
    stats = json.loads((await prscd.wait_log("runtime stats")).split("runtime stats ", 1)[1])
    assert stats["connections"] == 1 and stats["rss_kib"] > 0 and "gc_counts" in stats
    await ws.close()


async def test_sigterm_closes_peers_1001_and_exits_0_fast(prscd: Proc) -> None:
    url = f"wss://127.0.0.1:{prscd.port}/v1?publickey=k&id=alice"
    ws = await connect(url, ssl=insecure())
    await ws.send(join_frame("room", "alice"))
    await recv(ws)
    started = time.monotonic()
    prscd.proc.send_signal(signal.SIGTERM)
    with pytest.raises(ConnectionClosed) as err:
        await asyncio.wait_for(ws.recv(), 5)
    assert err.value.rcvd is not None and err.value.rcvd.code == 1001
    assert await asyncio.wait_for(prscd.proc.wait(), 5) == 0
    assert time.monotonic() - started < 5
    assert not (prscd.workdir / "prscd.pid").exists()
    await prscd.wait_log("node stopped")


async def test_config_error_is_clear(tmp_path: Path) -> None:
    env = {**os.environ, "PORT": "not-a-port",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = await asyncio.create_subprocess_exec(
        *PRSCD, cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 2
    assert b"PORT='not-a-port'" in err


async def test_sigterm_drains_first_when_configured(tmp_path: Path) -> None:
    async with run_prscd(tmp_path, DRAIN_SECONDS="30") as prscd:
        base = f"wss://127.0.0.1:{prscd.port}/v1?publickey=k"
        a = await connect(f"{base}&id=alice", ssl=insecure())
        b = await connect(f"{base}&id=bob", ssl=insecure())
        for ws, who in ((a, "alice"), (b, "bob")):
            await ws.send(join_frame("room", who))
            await recv(ws)
        prscd.proc.send_signal(signal.SIGTERM)
        await prscd.wait_log("draining")
        status, headers, _ = await get(f"https://127.0.0.1:{prscd.port}/ready")
        assert status == 503 and headers["X-Prscd-MeshID"] == "from-dotenv"
        with pytest.raises(InvalidStatus) as err:
            await connect(f"{base}&id=late", ssl=insecure())
        assert err.value.response.status_code == 503
        # Existing peers are still served while the balancer moves traffic away.
        await a.send(data_frame("room", "still", '"here"'))
        assert (await recv(b))["p"] == "alice"
        # A second signal ends the drain: peers get 1001 (the client reconnects elsewhere).
        prscd.proc.send_signal(signal.SIGTERM)
        for ws in (a, b):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert await asyncio.wait_for(prscd.proc.wait(), 5) == 0


async def test_an_unusable_token_key_is_a_configuration_error(tmp_path: Path) -> None:
    """Checked when the node is built, not when settings are read: same clear answer."""
    env = {**os.environ, "PORT": "0", "AUTH_TOKEN_SECRET": "tiny-secret-value",
           "CERT_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = await asyncio.create_subprocess_exec(
        *PRSCD, cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"configuration error: AUTH_TOKEN_SECRET" in err and b"Traceback" not in err
    assert b"tiny-secret-value" not in err  # the secret is never echoed
