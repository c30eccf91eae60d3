"""Issue 15 on a real node, before a peer exists: HTTP requests, the auth webhook,
half-open connections, the open-files limit, logs. Each refusal has its documented
answer and counter, and the node keeps serving /health and its peers."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import node.auth
from tests.conftest import NodeFactory
from tests.helpers import get, insecure, joined, still_served
from tests.test_auth import HookServer

# -- (9) strict, quiet HTTP/1.1 ---------------------------------------------------------------


def _ask(port: int, raw: bytes) -> bytes:
    """Send raw bytes over TLS; everything the node answers until it closes."""
    with insecure().wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                server_hostname="x") as sock:
        sock.sendall(raw)
        sock.settimeout(5)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(("raw", "status", "reason"), [
    (b"FOO /health HTTP/1.1\r\nHost: x\r\n\r\n", 405, b"only GET and HEAD"),
    (b"POST /v1?publickey=k&id=a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405,
     b"only GET and HEAD"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 400,
     b"a request body is not accepted"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     b"a request body is not accepted"),
    # The AssertionError inside websockets, logged with a traceback at ERROR before:
    (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
     b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"one request per connection"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     b"one request per connection"),
    (b"GET /health HTTP/1.0\r\n\r\n", 400, b"an HTTP/1.1 request line is expected"),
])
async def test_what_http_does_not_serve_is_answered_and_counted_without_a_traceback(
        node_factory: NodeFactory, caplog: pytest.LogCaptureFixture, raw: bytes, status: int,
        reason: bytes) -> None:
    node = await node_factory()
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        reply = await asyncio.to_thread(_ask, node.port, raw)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), reply[:200]
        assert reason in body
    if status == 405:
        assert b"\r\nAllow: GET, HEAD" in head
    assert node.node.presence.dropped[f"http_{status}"] == 3
    # (The library's DEBUG log may show its parser's EOF: only with DEBUG=true.)
    assert not [r for r in caplog.records
                if r.levelno >= logging.ERROR or (r.exc_info and r.levelno > logging.DEBUG)]
    status_now, _, _ = await get(f"https://127.0.0.1:{node.port}/health")
    assert status_now == 200
    await still_served(node)


async def test_head_gets_the_headers_of_get_and_no_body(node_factory: NodeFactory) -> None:
    node = await node_factory()
    reply = await asyncio.to_thread(_ask, node.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b""
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    assert length > 100  # what GET would have sent
    get_reply = await asyncio.to_thread(_ask, node.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(get_reply.partition(b"\r\n\r\n")[2]) > 100


# -- (6) the auth webhook: real upgrades only, capped -------------------------------------------


async def _hook_server() -> HookServer:
    hook = HookServer()
    hook.server = await asyncio.start_server(hook._serve, "127.0.0.1", 0)
    return hook


async def test_a_plain_get_never_calls_the_auth_webhook(node_factory: NodeFactory) -> None:
    hook = await _hook_server()
    try:
        node = await node_factory(AUTH_WEBHOOK_URL=hook.url())
        for i in range(20):
            status, _, _ = await get(f"https://127.0.0.1:{node.port}/v1?publickey=k&id=g{i}")
            assert status == 426
        assert hook.requests == []
        ws = await joined(node, "room", "real")  # a real upgrade asks it
        assert len(hook.requests) == 1
        await ws.close()
    finally:
        hook.server.close()  # type: ignore[union-attr]


async def test_concurrent_webhook_look_ups_are_capped_with_503(
        node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.auth, "MAX_WEBHOOK_CONNECTIONS", 2)  # 8 in flight or waiting
    hook = await _hook_server()
    gate = asyncio.Event()

    async def held(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        await gate.wait()
        return 200, b'{"app": "hooked"}'

    hook.answer = held
    try:
        running = await node_factory(AUTH_WEBHOOK_URL=hook.url(), AUTH_WEBHOOK_TIMEOUT="10")

        async def attempt(i: int) -> int:
            try:
                ws = await connect(running.ws_url("k", f"id{i}"), ssl=insecure(),
                                   open_timeout=15)
            except InvalidStatus as exc:
                return exc.response.status_code
            await ws.close()
            return 101

        tasks = [asyncio.ensure_future(attempt(i)) for i in range(20)]
        done, _ = await asyncio.wait(tasks, timeout=5, return_when=asyncio.ALL_COMPLETED)
        refused = [t.result() for t in done]
        assert len(refused) == 12 and set(refused) == {503}  # at once, not queued
        gate.set()
        assert sorted(await asyncio.gather(*tasks)) == [101] * 8 + [503] * 12
        assert running.node.presence.dropped["auth_unavailable"] == 12
        assert len(hook.requests) <= 8
    finally:
        gate.set()
        hook.server.close()  # type: ignore[union-attr]
