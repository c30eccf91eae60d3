"""Backend data (tag 0x21) and `prscd publish` / `prscd observe` against real clients."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from mesh.backend import publish
from tests.conftest import NodeFactory
from tests.mesh.conftest import PuppetFactory
from tests.mesh.test_two_nodes import client, two_nodes
from tests.mesh_helpers import NatsServer

PRSCD = [sys.executable, "-m", "node"]
ROOT = Path(__file__).resolve().parents[2]


async def prscd(*args: str, env: dict[str, str], timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *PRSCD, "--env-file", "/nonexistent", *args, cwd=ROOT,
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_prscd_publish_reaches_real_clients_on_every_node(
        node_factory: NodeFactory, nats_server: NatsServer, make_puppet: PuppetFactory) -> None:
    a, b = await two_nodes(node_factory, nats_server)
    alice = await client(make_puppet, a, "alice")
    bob = await client(make_puppet, b, "bob")
    for p in (alice, bob):
        await p.subscribe("room", "alert")
    await alice.wait_peers("room", {"bob"})
    rc, _, err = await prscd("publish", "--channel", "room", "--event", "alert",
                             "--data", '{"level": 2, "text": "héllo"}',
                             env={"NATS_URL": nats_server.url})
    assert rc == 0, err
    assert "published subject=prscd.default.room.21.backend." in err
    for p in (alice, bob):
        [got] = await p.wait_data("room", "alert")
        assert got["data"] == {"level": 2, "text": "héllo"}
        assert got["from"] == "backend"
    # The Python API, with another sender name; a channel without peers costs nothing.
    await publish(nats_server.url, "default", "room", "alert", [1, 2], sender="ops")
    await publish(nats_server.url, "default", "empty", "alert", None)
    for p in (alice, bob):
        got = await p.wait_data("room", "alert", count=2)
        assert got[1]["data"] == [1, 2] and got[1]["from"] == "ops"


async def test_publish_without_nats_url_is_a_clear_error() -> None:
    rc, _, err = await prscd("publish", "--channel", "c", "--event", "e",
                             env={"NATS_URL": ""})
    assert rc == 2 and "NATS_URL is not set" in err
    rc, _, err = await prscd("observe", env={"NATS_URL": ""})
    assert rc == 2 and "NATS_URL is not set" in err


async def test_publish_rejects_bad_input(nats_server: NatsServer) -> None:
    rc, _, err = await prscd("publish", "--channel", "c", "--event", "e", "--data", "{nope",
                             env={"NATS_URL": nats_server.url})
    assert rc == 2 and "not JSON" in err
    rc, _, err = await prscd("publish", "--channel", "x" * 200, "--event", "e",
                             env={"NATS_URL": nats_server.url})
    assert rc == 2 and "channel" in err


async def test_observe_prints_one_line_per_event(
        node_factory: NodeFactory, nats_server: NatsServer, make_puppet: PuppetFactory) -> None:
    a, b = await two_nodes(node_factory, nats_server)
    proc = await asyncio.create_subprocess_exec(
        *PRSCD, "--env-file", "/nonexistent", "observe", "--channel", "watched",
        "--count", "5", cwd=ROOT, env={**os.environ, "NATS_URL": nats_server.url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 10)
        while b"observing" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), 10)
        alice = await client(make_puppet, a, "alice", channel="watched")
        await client(make_puppet, b, "bob", channel="watched")
        await alice.wait_peers("watched", {"bob"})
        await alice.broadcast("watched", "chat", {"x": 1})
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = out.decode().splitlines()
    assert len(lines) == 5, lines
    assert all(" channel='watched' " in ln for ln in lines), lines
    first = lines[0]
    assert first.startswith(f"prscd.default.watched.20.east.{a.node.node_id} ")
    assert "mesh=east" in first and f"node={a.node.node_id}" in first
    assert "op=peer_online" in first and "p='alice'" in first
