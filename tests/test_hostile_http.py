"""Issue 15 on a real node, before a peer exists: HTTP requests, the auth webhook,
half-open connections, the open-files limit, logs. Each refusal has its documented
answer and counter, and the node keeps serving /health and its peers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import node.auth
from tests.conftest import NodeFactory
from tests.helpers import (
    barrier,
    data_frame,
    get,
    http_get,
    insecure,
    join_frame,
    joined,
    recv,
    still_served,
)
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


# -- (7) half-open connections count --------------------------------------------------------


def _tls_only(port: int) -> ssl.SSLSocket:
    """TLS done, no request: a connection in its handshake."""
    return insecure().wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                  server_hostname="x")


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, ssl.SSLError, OSError) as exc:
        return not isinstance(exc, TimeoutError)


def _silent_tcp(port: int, n: int) -> list[socket.socket]:
    """``n`` TCP connections that never send a ClientHello: half-open before TLS."""
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


async def test_half_open_connections_before_tls_count_and_the_oldest_makes_room(
        node_factory: NodeFactory) -> None:
    """MAX_CONNECTIONS TCP connections that never start TLS are all counted; a newcomer
    closes the oldest of them (not itself refused): a real peer joins, /health answers,
    and all is released when they go."""
    running = await node_factory(MAX_CONNECTIONS="20", MAX_HANDSHAKES="100",
                                 HANDSHAKE_TIMEOUT="30", WEBTRANSPORT="false")
    node_ = running.node
    a = await joined(running, "room", "a")
    silent = await asyncio.to_thread(_silent_tcp, running.port, 19)
    await wait_for(lambda: node_.handshakes["websocket"] == 19)
    assert node_.connections() == 20  # one peer and 19 before TLS: full
    assert node_.presence.dropped["handshake_limit"] == 0
    b = await joined(running, "room", "b")  # the oldest silent one made room
    assert await asyncio.to_thread(_closed_by_server, silent[0], 5)
    assert node_.presence.dropped["handshake_limit"] == 1
    status, _, body = await get(f"https://127.0.0.1:{running.port}/health")
    assert status == 200, body  # (it made room too: the second oldest)
    assert await asyncio.to_thread(_closed_by_server, silent[1], 5)
    health = json.loads(body)
    assert health["dropped"]["handshake_limit"] == 2
    await barrier(a, b, "room")
    assert node_.connections() <= 20
    for sock in silent:
        sock.close()
    await wait_for(lambda: node_.handshakes["websocket"] == 0)
    assert node_.connections() == 2
    await a.close()
    await b.close()


async def test_a_node_full_of_peers_keeps_a_few_half_open_slots(
        node_factory: NodeFactory) -> None:
    """MAX_CONNECTIONS peers: FULL_NODE_RESERVE (16) half-open connections are still let in
    (the oldest closed past that), so the full node answers /health and 503 to a peer."""
    from node.transports.handshakes import FULL_NODE_RESERVE

    running = await node_factory(MAX_CONNECTIONS="2", HANDSHAKE_TIMEOUT="30",
                                 WEBTRANSPORT="false")
    node_ = running.node
    a = await joined(running, "room", "a")
    b = await joined(running, "room", "b")
    silent = await asyncio.to_thread(_silent_tcp, running.port, FULL_NODE_RESERVE + 4)
    for sock in silent[:4]:
        assert await asyncio.to_thread(_closed_by_server, sock, 5)
    await wait_for(lambda: node_.handshakes["websocket"] == FULL_NODE_RESERVE)
    assert node_.presence.dropped["handshake_limit"] == 4
    status, _, body = await get(f"https://127.0.0.1:{running.port}/health")
    assert status == 200, body
    with pytest.raises(InvalidStatus) as err:
        await connect(running.ws_url("k", "c"), ssl=insecure())
    assert err.value.response.status_code == 503
    assert err.value.response.body == b"node full: 2 connections\n"
    assert node_.connections() <= 2 + FULL_NODE_RESERVE
    await barrier(a, b, "room")
    for sock in silent:
        sock.close()
    await wait_for(lambda: node_.handshakes["websocket"] == 0)
    await a.close()
    await b.close()


async def test_half_open_connections_have_their_own_bound_and_deadline(
        node_factory: NodeFactory) -> None:
    """Over MAX_HANDSHAKES the oldest half-open connection is closed, before or after TLS;
    each is closed after HANDSHAKE_TIMEOUT (TLS not begun, or no request) and uncounted."""
    running = await node_factory(MAX_CONNECTIONS="100", MAX_HANDSHAKES="3",
                                 HANDSHAKE_TIMEOUT="2", WEBTRANSPORT="false")
    node_ = running.node
    raw_tcp = socket.create_connection(("127.0.0.1", running.port))
    tls = [await asyncio.to_thread(_tls_only, running.port) for _ in range(2)]
    await wait_for(lambda: node_.handshakes["websocket"] == 3)
    fourth = await asyncio.to_thread(_tls_only, running.port)
    assert await asyncio.to_thread(_closed_by_server, raw_tcp, 5)  # the oldest
    assert node_.presence.dropped["handshake_limit"] == 1
    assert node_.handshakes["websocket"] == 3
    started = time.monotonic()
    late = socket.create_connection(("127.0.0.1", running.port))
    assert await asyncio.to_thread(_closed_by_server, late, 6)  # no ClientHello: 2 s
    assert 1.5 < time.monotonic() - started < 5
    for sock in (*tls, fourth):  # TLS done, no request: closed within 2 s more
        assert await asyncio.to_thread(_closed_by_server, sock, 6)
    await wait_for(lambda: node_.handshakes["websocket"] == 0)
    for sock in (raw_tcp, *tls, fourth, late):
        sock.close()
    await still_served(running)


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    from tests.mesh_helpers import wait_until

    await wait_until(condition, timeout, "the condition")


# -- (8) the open-files limit --------------------------------------------------------------


def _start_with_files_limit(tmp_path: Path, limit: int, env: dict[str, str]) -> Any:
    """bench.procs.start_node, with the open-files limit set (soft and hard) before exec."""
    import subprocess

    from bench import procs

    port = procs.free_port()
    run = tmp_path / "run"  # (removed by Server.stop; the log stays)
    run.mkdir()
    full_env = {k: v for k, v in os.environ.items() if k not in procs._NODE_KEYS}
    full_env.update({"PORT": str(port), "HOST": "127.0.0.1", "TLS": "false",
                     "PID_FILE": str(run / "prscd.pid"), "CERT_CACHE_DIR": str(run), **env})
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*procs.prscd_command(), "--env-file", os.devnull], env=full_env, stdout=log,
            stderr=subprocess.STDOUT, cwd=run,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    procs._wait_listening(proc, port, log_path)
    return procs.Server("prscd", proc, port, False, log_path, run)


async def test_at_the_open_files_limit_the_node_refuses_in_time_and_keeps_serving(
        tmp_path: Path) -> None:
    """A node whose open-files limit (160) cannot hold MAX_CONNECTIONS lowers its limits to
    fit at start-up (one warning), so a flood of connections that never send a request is
    closed as it comes (handshake_limit) instead of making accept() fail: /health answers
    during the flood, peers connected before keep talking, no traceback."""
    srv = _start_with_files_limit(tmp_path, 160, {"WEBTRANSPORT": "false",
                                                  "HANDSHAKE_TIMEOUT": "60"})
    junk: list[socket.socket] = []
    try:
        base = f"ws://127.0.0.1:{srv.port}/v1?publickey=k&id="
        a = await connect(base + "a")
        b = await connect(base + "b")
        for ws, who in ((a, "a"), (b, "b")):
            await ws.send(join_frame("room", who))
            assert (await recv(ws))["op"] == "channel_join"
        for _ in range(300):  # more than the limit allows open at once
            junk.append(socket.create_connection(("127.0.0.1", srv.port)))
        for _ in range(5):  # peers connected before are served meanwhile
            await _still_talking(a, b)
        started = time.monotonic()
        health = await asyncio.to_thread(_health_within, srv.port, 5.0)
        assert time.monotonic() - started < 3.0
        assert health["dropped"]["handshake_limit"] >= 100, health
        await a.close()
        await b.close()
    finally:
        log_text = _stopped_quietly(srv, junk)
    assert log_text.count("open files limit 160 (hard 160): MAX_CONNECTIONS lowered to") == 1


def test_accept_failures_are_counted_logged_once_and_shed_handshakes(
        caplog: pytest.LogCaptureFixture) -> None:
    """The backstop when accept() fails anyway (a flood before TLS, which is not counted):
    asyncio's report (a traceback every second) becomes a counter and one line per
    interval, and the oldest handshakes are closed to free descriptors."""
    import errno as errno_

    from node.transports.handshakes import AcceptErrors, Handshakes

    class Peers:
        def __init__(self) -> None:
            self.dropped: dict[str, int] = {}

        def count_drop(self, reason: str, n: int = 1) -> None:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

        def handshaking(self, transport: str, delta: int) -> None:
            pass

    class Conn:
        closed = False

        def close(self) -> None:
            self.closed = True

    async def run() -> None:
        peers: Any = Peers()
        handshakes = Handshakes(peers, "websocket", 0, 60)
        conns = [Conn() for _ in range(8)]
        for conn in conns:
            handshakes.began(conn)
            handshakes.closable(conn, conn.close)
        listening = socket.socket()
        errors = AcceptErrors(peers, handshakes)
        errors.install([listening])
        loop = asyncio.get_running_loop()
        try:
            for _ in range(5):
                loop.call_exception_handler({
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno_.EMFILE, "Too many open files"),
                    "socket": listening})
        finally:
            loop.set_exception_handler(None)
            listening.close()
        assert peers.dropped["accept_failed"] == 5
        assert [c.closed for c in conns[:2]] == [True, True]  # the oldest first
        assert peers.dropped["handshake_shed"] >= 5

    caplog.set_level(logging.DEBUG)
    asyncio.run(run())
    lines = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _health_within(port: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _, body = http_get(f"http://127.0.0.1:{port}/health", timeout=1.0)
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("/health did not answer")


async def test_half_open_connections_on_uvloop_with_tls(tmp_path: Path) -> None:
    """The production loop (uvloop, in a real node process) with TLS: connections before
    TLS, after TLS, with a failed TLS handshake and connect-and-leave are each counted
    and released at once when they end; the oldest makes room for a peer; no traceback."""
    from bench import procs

    srv = procs.start_node(tmp_path, tls=True, env={
        "MAX_CONNECTIONS": "30", "HANDSHAKE_TIMEOUT": "30", "WEBTRANSPORT": "false"})
    base = f"https://127.0.0.1:{srv.port}"

    def health() -> dict[str, Any]:
        status, _, body = http_get(f"{base}/health")
        assert status == 200, body
        return json.loads(body)

    def counted(n: int) -> None:  # (the /health request's own connection counts too)
        deadline = time.monotonic() + 5
        while (got := health()["handshakes"].get("websocket", 0)) != n + 1:
            assert time.monotonic() < deadline, (got, n)
            time.sleep(0.05)

    silent: list[socket.socket] = []
    try:
        a = await connect(f"wss://127.0.0.1:{srv.port}/v1?publickey=k&id=a", ssl=insecure())
        await a.send(join_frame("room", "a"))
        assert (await recv(a))["op"] == "channel_join"
        silent = await asyncio.to_thread(_silent_tcp, srv.port, 17)
        tls = await asyncio.to_thread(_tls_only, srv.port)
        await asyncio.to_thread(counted, 18)
        bad = socket.create_connection(("127.0.0.1", srv.port))  # not TLS: fails at once
        bad.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.to_thread(_closed_by_server, bad, 5)
        socket.create_connection(("127.0.0.1", srv.port)).close()  # connect and leave
        await asyncio.to_thread(counted, 18)
        silent += await asyncio.to_thread(_silent_tcp, srv.port, 11)  # 1 + 18 + 11: full
        b = await connect(f"wss://127.0.0.1:{srv.port}/v1?publickey=k&id=b", ssl=insecure())
        await b.send(join_frame("room", "b"))
        assert (await recv(b))["op"] == "channel_join"
        assert await asyncio.to_thread(_closed_by_server, silent[0], 5)
        assert (await asyncio.to_thread(health))["dropped"]["handshake_limit"] >= 2
        for sock in (*silent, tls):
            sock.close()
        await asyncio.to_thread(counted, 0)
        await _still_talking(a, b)
        await a.close()
        await b.close()
    finally:
        _stopped_quietly(srv, silent)


async def _still_talking(a: Any, b: Any) -> None:
    """``a``'s message reaches ``b`` (joined to "room" before)."""
    await a.send(data_frame("room", "m", '"x"'))
    while (await recv(b, 5))["t"] != "data":
        pass


def _stopped_quietly(srv: Any, socks: list[socket.socket]) -> str:
    """Close the clients' sockets, stop the node; its log holds no traceback."""
    for sock in socks:
        sock.close()
    srv.stop()
    log_text: str = srv.log_path.read_text()
    assert "Traceback" not in log_text and "exc=" not in log_text, log_text[-3000:]
    return log_text
