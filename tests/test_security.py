"""Keys and secrets on a running node: SIGHUP reloads the keys file (existing peers keep
their app), the auth webhook decides admission on both transports (403 refused, 503
unreachable), apps stay isolated."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import NodeFactory
from tests.helpers import barrier, data_frame, joined, peer, recv
from tests.test_auth import HookServer, hook  # noqa: F401  (fixture)
from tests.test_cli import run_prscd
from tests.wt_client import wt_connect


async def status_of(coro) -> int:  # type: ignore[no-untyped-def]
    try:
        ws = await coro
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


async def test_sighup_reloads_the_keys_file_and_existing_peers_keep_their_app(
        tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("old-key-0123:app-a\n")
    async with run_prscd(tmp_path, PUBLIC_KEYS_FILE=str(keys),
                         PUBLIC_KEYS="env-key-4567:app-a") as proc:
        from tests.conftest import RunningNode

        class Addr:  # what tests.helpers needs of a node
            port = proc.port
            ws_base = f"wss://127.0.0.1:{proc.port}"
            ws_url = RunningNode.ws_url

        node = Addr()
        old = await joined(node, "room", "old", key="old-key-0123")  # type: ignore[arg-type]
        keys.write_text("new-key-89ab:app-a\n")
        proc.proc.send_signal(signal.SIGHUP)
        line = await proc.wait_log("keys reloaded")
        assert "keys=2" in line  # the file's key and PUBLIC_KEYS'
        assert await status_of(peer(node, "x", key="old-key-0123")) == 403  # type: ignore[arg-type]
        new = await joined(node, "room", "new", key="new-key-89ab")  # type: ignore[arg-type]
        env = await joined(node, "room", "env", key="env-key-4567")  # type: ignore[arg-type]
        # The peer admitted with the old key is still in app-a, with the others.
        await barrier(old, new, "room")
        await barrier(new, old, "room")
        await barrier(env, old, "room")
        keys.write_text("this line has no app\n")
        proc.proc.send_signal(signal.SIGHUP)
        failed = await proc.wait_log("keys reload failed")
        assert "keeping keys=2" in failed and "this line" not in failed
        assert await status_of(peer(node, "y", key="new-key-89ab")) == 101  # type: ignore[arg-type]
        for line in proc.log:
            for secret in ("old-key-0123", "new-key-89ab", "env-key-4567"):
                assert secret not in line


async def test_webhook_admission_on_both_transports(
        node_factory: NodeFactory, hook: HookServer) -> None:  # noqa: F811
    apps = {"key-a": (200, b'{"app": "tenant-a"}'), "key-b": (200, b'{"app": "tenant-b"}'),
            "key-no": (403, b""), "key-err": (500, b"")}
    hook.answer = lambda body, headers: apps[body["publickey"]]
    node = await node_factory(AUTH_WEBHOOK_URL=hook.url(), AUTH_WEBHOOK_TIMEOUT="1")
    a1 = await joined(node, "room", "a1", key="key-a")
    a2 = await joined(node, "room", "a2", key="key-a")
    b1 = await joined(node, "room", "b1", key="key-b")
    await a1.send(data_frame("room", "m", '"for tenant a"'))
    assert (await recv(a2))["p"] == "a1"
    await barrier(a2, a1, "room")
    await b1.send(data_frame("room", "m", '"tenant b"'))  # same channel name, other app
    await barrier(a2, a1, "room")  # a1 got a2's marker first: nothing from b1
    assert await status_of(peer(node, "n", key="key-no")) == 403
    assert await status_of(peer(node, "e", key="key-err")) == 503
    for key, status in (("key-a", 200), ("key-no", 403), ("key-err", 503)):
        async with wt_connect(node.port, f"/v1?publickey={key}&id=w-{key}") as wt:
            assert wt.status == status, key
    assert node.node.presence.dropped["auth_unavailable"] == 2
    hook.server.close()  # type: ignore[union-attr]
    await hook.server.wait_closed()  # type: ignore[union-attr]
    # (key-a, a1) is cached (AUTH_WEBHOOK_CACHE=10 s); anything else cannot be checked now.
    assert await status_of(peer(node, "a1", key="key-a")) == 101
    assert await status_of(peer(node, "a3", key="key-a")) == 503
    apps["key-c"] = (200, b'{"app": "c"}')
    assert await status_of(peer(node, "c", key="key-c")) == 503


@pytest.mark.parametrize("transport", ["websocket", "webtransport"])
async def test_a_slow_webhook_does_not_stall_other_peers(
        node_factory: NodeFactory, hook: HookServer, transport: str) -> None:  # noqa: F811
    gate = asyncio.Event()

    async def slow(body: dict, headers: dict) -> tuple[int, bytes]:  # type: ignore[type-arg]
        if body["publickey"] == "slow":
            await gate.wait()
        return 200, b'{"app": "t"}'

    hook.answer = slow
    node = await node_factory(AUTH_WEBHOOK_URL=hook.url(), AUTH_WEBHOOK_TIMEOUT="5")
    if transport == "websocket":
        waiting = asyncio.ensure_future(peer(node, "s", key="slow"))
    else:
        cm = wt_connect(node.port, "/v1?publickey=slow&id=s", timeout=10)
        waiting = asyncio.ensure_future(cm.__aenter__())
    await asyncio.sleep(0.2)
    a = await joined(node, "room", "a", key="fast")  # admitted while "slow" waits
    b = await joined(node, "room", "b", key="fast")
    await barrier(a, b, "room")
    assert not waiting.done()
    gate.set()
    result = await waiting
    if transport == "websocket":
        await result.close()
    else:
        assert result.status == 200
        await cm.__aexit__(None, None, None)
