"""Keys reloaded on SIGHUP (the Auth side) and the auth webhook client, against a small
local HTTP server: answers, refusals, failures, timeouts, the cache, no secrets in logs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import node.auth
from node import __version__
from node.auth import MAX_REPLY_BYTES, Auth, AuthError, AuthUnavailable, Webhook
from node.config import ConfigError, Settings
from node.tls import CertInfo, server_context

Answer = Callable[[dict[str, Any], dict[str, str]], Any]
Closing = Callable[[Webhook], Webhook]


@dataclass
class Raw:
    """An answer written as it is; with ``hold`` the connection then stays open until the
    client closes it (to tell a client that stops reading from one that reads it all)."""

    data: bytes
    hold: bool = False


class HookServer:
    """A one-route HTTP/1.1 server; ``answer(body, headers)`` returns (status, bytes),
    (status, bytes, True) for a chunked answer, a Raw, or a coroutine that does (to be
    slow). It closes each connection after one answer without saying so, as an idle
    keep-alive timeout would."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.targets: list[str] = []
        self.answer: Answer = lambda body, headers: (200, b'{"app": "hooked"}')
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}/auth?x=1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.targets.append((await reader.readline()).decode().split(" ")[1])
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = json.loads(await reader.readexactly(int(headers["content-length"])))
            self.requests.append((body, headers))
            result = self.answer(body, headers)
            if asyncio.iscoroutine(result):
                result = await result
            if isinstance(result, Raw):
                writer.write(result.data)
                await writer.drain()
                if result.hold:
                    await reader.read()
                return
            status, payload, *chunked = result
            if chunked:
                head = (f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
                chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c)
                                  for c in (payload[:5], payload[5:]))
                writer.write(head + chunks + b"0\r\n\r\n")
            else:
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(payload)}\r\n\r\n"
                             .encode() + payload)
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def hook() -> AsyncIterator[HookServer]:
    h = HookServer()
    h.server = await asyncio.start_server(h._serve, "127.0.0.1", 0)
    yield h
    h.server.close()


@pytest.fixture
async def closing() -> AsyncIterator[Closing]:
    """Webhooks passed through it are closed (their aiohttp sessions) at the test's end."""
    made: list[Webhook] = []

    def track(webhook: Webhook) -> Webhook:
        made.append(webhook)
        return webhook

    yield track
    for webhook in made:
        await webhook.aclose()


def padded(answer: bytes, size: int) -> bytes:
    """A JSON answer padded with spaces to exactly ``size`` bytes."""
    return answer + b" " * (size - len(answer))


def test_reload_rereads_the_file_and_keeps_env_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("old-key:app-a\n")
    auth = Auth.from_settings(Settings.from_env(
        {"PUBLIC_KEYS": "env-key:app-e", "PUBLIC_KEYS_FILE": str(keys)}))
    assert auth.app_for("old-key") == "app-a"
    keys.write_text("new-key:app-b\n# a comment\nnew-key-2:app-b\n")
    assert auth.reload() == 3
    assert auth.app_for("new-key") == "app-b" and auth.app_for("env-key") == "app-e"
    with pytest.raises(AuthError):
        auth.app_for("old-key")
    keys.write_text("broken-line-without-app\n")
    with pytest.raises(ConfigError) as err:
        auth.reload()
    assert "broken-line" not in str(err.value)
    assert auth.app_for("new-key") == "app-b"  # a bad file leaves the keys as they were
    keys.unlink()
    with pytest.raises(OSError):
        auth.reload()
    assert auth.app_for("new-key-2") == "app-b"


def test_a_webhook_turns_off_open_mode() -> None:
    s = Settings.from_env({"AUTH_WEBHOOK_URL": "http://127.0.0.1:9/x"})
    assert s.keys_configured and not Auth.from_settings(s).open_mode
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"AUTH_WEBHOOK_URL": "ftp://user:hunter2@x/"})
    assert "hunter2" not in str(err.value)
    assert "hunter2" not in repr(Settings.from_env(
        {"AUTH_WEBHOOK_URL": "https://user:hunter2@x/"}))


async def test_webhook_accepts_refuses_and_fails_closed(hook: HookServer, closing: Closing) -> None:
    answers = {
        "good": (200, b'{"app": "tenant-1"}'),
        "chunked": (200, b'{"app": "tenant-2"}', True),
        "forbidden": (403, b""),
        "no-app": (200, b'{"app": null}'),
        "error": (500, b"oops"),
        "not-json": (200, b"<html>"),
    }
    hook.answer = lambda body, headers: answers[body["publickey"]]
    auth = Auth(keys={"static": "app-s"}, open_mode=False,
                webhook=closing(Webhook(hook.url(), timeout=1, ttl=0)))
    assert await auth.resolve("static", "a") == "app-s"  # static keys first
    assert hook.requests == []
    assert await auth.resolve("good", "alice") == "tenant-1"
    assert hook.requests[-1][0] == {"publickey": "good", "id": "alice"}
    assert await auth.resolve("chunked", "a") == "tenant-2"
    for refused in ("forbidden", "no-app"):
        with pytest.raises(AuthError):
            await auth.resolve(refused, "a")
    for broken in ("error", "not-json"):
        with pytest.raises(AuthUnavailable):
            await auth.resolve(broken, "a")


async def test_webhook_timeout_and_unreachable_are_503(hook: HookServer, closing: Closing) -> None:
    async def slow(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        await asyncio.sleep(5)
        return 200, b'{"app": "late"}'

    hook.answer = slow
    auth = Auth(keys={}, open_mode=False, webhook=closing(Webhook(hook.url(), timeout=0.3)))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(AuthUnavailable):
        await auth.resolve("k", "a")
    assert loop.time() - t0 < 1.5
    dead = Auth(keys={}, open_mode=False,
                webhook=closing(Webhook("http://127.0.0.1:9/", timeout=1)))
    with pytest.raises(AuthUnavailable):
        await dead.resolve("k", "a")


async def test_webhook_cache_and_single_flight(hook: HookServer, closing: Closing) -> None:
    now = [100.0]
    gate = asyncio.Event()
    fail = {"on": False}

    async def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        await gate.wait()
        if fail["on"]:
            return 502, b""
        return (403, b"") if body["publickey"] == "bad" else (200, b'{"app": "t"}')

    hook.answer = answer
    webhook = closing(Webhook(hook.url(), timeout=2, ttl=10, clock=lambda: now[0]))
    auth = Auth(keys={}, open_mode=False, webhook=webhook)
    many = [asyncio.ensure_future(auth.resolve("k", "alice")) for _ in range(20)]
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.gather(*many) == ["t"] * 20
    assert len(hook.requests) == 1  # one request for twenty concurrent handshakes
    assert await auth.resolve("k", "alice") == "t"
    assert len(hook.requests) == 1  # cached
    with pytest.raises(AuthError):
        await auth.resolve("bad", "alice")
    with pytest.raises(AuthError):
        await auth.resolve("bad", "alice")
    assert len(hook.requests) == 2  # refusals are cached too
    assert await auth.resolve("k", "bob") == "t"  # per (key, id)
    now[0] += 11
    fail["on"] = True
    with pytest.raises(AuthUnavailable):
        await auth.resolve("k", "alice")
    fail["on"] = False
    assert await auth.resolve("k", "alice") == "t"  # failures are not cached


async def test_webhook_credentials_are_sent_but_never_logged(
        hook: HookServer, caplog: pytest.LogCaptureFixture, closing: Closing) -> None:
    caplog.set_level(logging.DEBUG)
    hook.answer = lambda body, headers: (200, b'{"app": "t"}')
    auth = Auth(keys={}, open_mode=False,
                webhook=closing(Webhook(hook.url("svc:s3cr%40t@"), timeout=1, ttl=0)))
    assert await auth.resolve("the-public-key-secret", "alice") == "t"
    sent = hook.requests[-1][1]["authorization"]
    assert base64.b64decode(sent.split()[1]) == b"svc:s3cr@t"
    hook.answer = lambda body, headers: (503, b"")
    with pytest.raises(AuthUnavailable):
        await auth.resolve("the-public-key-secret", "alice")
    with pytest.raises(AuthError):
        await Auth(keys={"x": "y"}, open_mode=False).resolve("the-public-key-secret", "a")
    text = caplog.text
    assert "auth webhook failed" in text and f"127.0.0.1:{hook.port}" in text
    for secret in ("s3cr", "svc:", "the-public-key-secret"):
        assert secret not in text


async def test_webhook_chunked_answers(hook: HookServer, caplog: pytest.LogCaptureFixture) -> None:
    def chunked(payload: bytes, size: int, end: bool = True) -> bytes:
        chunks = [payload[i:i + size] for i in range(0, len(payload), size)]
        body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + body + (b"0\r\n\r\n" if end else b"")

    answers = {
        "small": Raw(chunked(b'{"app": "tenant-c"}', 3)),
        # Exactly the cap, in uneven chunks: accepted.
        "at-cap": Raw(chunked(padded(b'{"app": "big"}', MAX_REPLY_BYTES), 1000)),
        # One byte over, and no end chunk: the client must stop reading at the cap.
        "over-cap": Raw(chunked(padded(b'{"app": "x"}', MAX_REPLY_BYTES + 1), 4096, end=False),
                        hold=True),
    }
    hook.answer = lambda body, headers: answers[body["publickey"]]
    webhook = Webhook(hook.url(), timeout=5, ttl=0)
    auth = Auth(keys={}, open_mode=False, webhook=webhook)
    try:
        assert await auth.resolve("small", "a") == "tenant-c"
        assert await auth.resolve("at-cap", "a") == "big"
        t0 = time.monotonic()
        with pytest.raises(AuthUnavailable):
            await auth.resolve("over-cap", "a")
        assert time.monotonic() - t0 < 2  # cut at the cap, not waited out to the timeout
        assert "error=answer over 64 KiB" in caplog.text
        assert (webhook.calls, webhook.failures) == (3, 1)
    finally:
        await auth.aclose()


async def test_webhook_answer_over_64_kib_is_503_unread(
        hook: HookServer, caplog: pytest.LogCaptureFixture) -> None:
    big = 10 * 1024 * 1024
    answers = {
        # Announced too large: refused on the header, without waiting for the body.
        "announced": Raw(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big
                         + b'{"app": "x"', hold=True),
        # No length, the body runs until the close: cut at the cap as well.
        "unsized": Raw(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
                       + padded(b'{"app": "x"}', MAX_REPLY_BYTES + 100)),
        "sized-at-cap": (200, padded(b'{"app": "ok"}', MAX_REPLY_BYTES)),
    }
    hook.answer = lambda body, headers: answers[body["publickey"]]
    webhook = Webhook(hook.url(), timeout=5, ttl=0)
    auth = Auth(keys={}, open_mode=False, webhook=webhook)
    try:
        for key in ("announced", "unsized"):
            t0 = time.monotonic()
            with pytest.raises(AuthUnavailable):
                await auth.resolve(key, "a")
            assert time.monotonic() - t0 < 2, key
        assert caplog.text.count("error=answer over 64 KiB") == 2
        assert await auth.resolve("sized-at-cap", "a") == "ok"
        assert webhook.failures == 2
    finally:
        await auth.aclose()


async def test_webhook_basic_auth_and_request_shape(
        hook: HookServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    webhook = Webhook(hook.url("b%C3%BCro:p%C3%A4ss%3Aw%20rd@"), timeout=2, ttl=0)
    auth = Auth(keys={}, open_mode=False, webhook=webhook)
    try:
        assert await auth.resolve("k1", "alice") == "hooked"
        body, headers = hook.requests[-1]
        scheme, token = headers["authorization"].split()
        assert scheme == "Basic"
        assert base64.b64decode(token).decode() == "büro:päss:w rd"  # UTF-8, percent-decoded
        assert body == {"publickey": "k1", "id": "alice"}
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"] == f"prscd/{__version__}"
        assert "accept-encoding" not in headers  # nothing compressed comes back to inflate
        assert hook.targets[-1] == "/auth?x=1"  # the credentials travel in the header only
        # No credentials in the URL: no Authorization header at all.
        plain = Webhook(hook.url(), timeout=2, ttl=0)
        assert await plain.app_for("k2", "bob") == "hooked"
        assert "authorization" not in hook.requests[-1][1]
        await plain.aclose()
        hook.answer = lambda body, headers: (500, b"")
        with pytest.raises(AuthUnavailable):
            await auth.resolve("k1", "alice")
    finally:
        await auth.aclose()
    assert "status=500" in caplog.text
    for secret in ("b%C3%BCro", "büro", "p%C3%A4ss", "päss", "w rd", "k1"):
        assert secret not in caplog.text
    assert "b%C3%BCro" not in repr(auth) and "p%C3%A4ss" not in repr(webhook)


async def test_webhook_connection_refused_is_503(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    webhook = Webhook(f"http://svc:hunter2@127.0.0.1:{port}/auth", timeout=2, ttl=10)
    auth = Auth(keys={}, open_mode=False, webhook=webhook)
    try:
        t0 = time.monotonic()
        for _ in range(2):
            with pytest.raises(AuthUnavailable):
                await auth.resolve("the-key", "a")
        assert time.monotonic() - t0 < 1.5  # refused at once, not waited out
        assert (webhook.calls, webhook.failures) == (2, 2)  # a failure is never cached
    finally:
        await auth.aclose()
    assert f"auth webhook failed url=http://127.0.0.1:{port} error=ClientConnectorError" \
        in caplog.text
    assert "hunter2" not in caplog.text and "the-key" not in caplog.text


async def test_webhook_redirects_are_not_followed(hook: HookServer) -> None:
    hook.answer = lambda body, headers: Raw(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/elsewhere\r\n"
        b"Content-Length: 0\r\n\r\n")
    webhook = Webhook(hook.url("svc:pw@"), timeout=2, ttl=0)
    try:
        with pytest.raises(AuthUnavailable):
            await webhook.app_for("k", "a")
        assert len(hook.requests) == 1
    finally:
        await webhook.aclose()


async def test_aclose_closes_the_session(hook: HookServer) -> None:
    webhook = Webhook(hook.url(), timeout=2, ttl=0)
    auth = Auth(keys={}, open_mode=False, webhook=webhook)
    await Webhook(hook.url()).aclose()  # never used: nothing to close, no error
    await Auth.from_keys({}).aclose()  # no webhook
    assert webhook._session is None  # made on first use, inside the running loop
    assert await auth.resolve("k", "a") == "hooked"
    session = webhook._session
    assert session is not None and not session.closed
    await auth.aclose()
    assert session.closed and webhook._session is None
    with pytest.raises(AuthUnavailable):  # a look-up during the node's stop: 503
        await auth.resolve("k", "a")
    assert webhook._session is None  # and no new session made behind aclose
    await auth.aclose()  # twice is fine


async def test_aclose_during_a_look_up_is_503(hook: HookServer) -> None:
    gate = asyncio.Event()

    async def held(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        await gate.wait()
        return 200, b'{"app": "late"}'

    hook.answer = held
    webhook = Webhook(hook.url(), timeout=5, ttl=0)
    pending = asyncio.ensure_future(webhook.app_for("k", "a"))
    await asyncio.sleep(0.1)
    await webhook.aclose()  # the node stops while a handshake waits on the webhook
    with pytest.raises(AuthUnavailable):
        await asyncio.wait_for(pending, 2)
    gate.set()


async def test_webhook_keeps_connections_alive_and_retries_a_stale_one() -> None:
    """The webhook closes an idle keep-alive connection just as the next look-up is sent
    on it: that look-up is sent again on a new connection, not failed."""
    connections: list[int] = []
    seen: list[tuple[int, str]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(connections)
        connections.append(n)
        try:
            while True:
                if not await reader.readline():
                    return
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                key = json.loads(await reader.readexactly(length))["publickey"]
                seen.append((n, key))
                if key == "stale" and n == 0:
                    return  # closed with the request unanswered: the keep-alive race
                writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"app": "t"}')
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    webhook = Webhook(f"http://127.0.0.1:{port}/", timeout=2, ttl=0)
    try:
        assert await webhook.app_for("a", "x") == "t"
        assert await webhook.app_for("b", "x") == "t"
        assert connections == [0]  # kept alive: one connection for both
        assert await webhook.app_for("stale", "x") == "t"
        assert seen == [(0, "a"), (0, "b"), (0, "stale"), (1, "stale")]
        assert webhook.failures == 0
    finally:
        await webhook.aclose()
        server.close()


async def test_webhook_connection_limit(hook: HookServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.auth, "MAX_WEBHOOK_CONNECTIONS", 3)
    gate = asyncio.Event()
    busy = {"now": 0, "most": 0}

    async def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        busy["now"] += 1
        busy["most"] = max(busy["most"], busy["now"])
        await gate.wait()
        busy["now"] -= 1
        return 200, b'{"app": "t"}'

    hook.answer = answer
    webhook = Webhook(hook.url(), timeout=5, ttl=0)
    try:
        many = [asyncio.ensure_future(webhook.app_for(f"k{i}", "a")) for i in range(10)]
        await asyncio.sleep(0.2)
        assert busy["now"] == 3  # the others wait for a connection
        gate.set()
        assert await asyncio.gather(*many) == ["t"] * 10
        assert busy["most"] == 3 and len(hook.requests) == 10
    finally:
        await webhook.aclose()


async def test_webhook_over_https_with_a_custom_ssl_context(
        dev_cert: CertInfo, caplog: pytest.LogCaptureFixture) -> None:
    h = HookServer()
    h.server = await asyncio.start_server(h._serve, "127.0.0.1", 0,
                                          ssl=server_context(dev_cert))
    url = f"https://svc:pw@127.0.0.1:{h.port}/auth"
    trusting = Webhook(url, timeout=2, ttl=0,
                       ssl_context=ssl.create_default_context(cafile=str(dev_cert.cert_file)))
    default = Webhook(url, timeout=2, ttl=0)  # verifies against the system CAs
    try:
        assert await trusting.app_for("k", "a") == "hooked"
        assert base64.b64decode(h.requests[-1][1]["authorization"].split()[1]) == b"svc:pw"
        with pytest.raises(AuthUnavailable):
            await default.app_for("k", "a")
        assert len(h.requests) == 1  # the unverified server was told nothing
        assert "error=ClientConnectorCertificateError" in caplog.text
    finally:
        await trusting.aclose()
        await default.aclose()
        h.server.close()
