"""Keys reloaded on SIGHUP (the Auth side) and the auth webhook client, against a small
local HTTP server: answers, refusals, failures, timeouts, the cache, no secrets in logs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from node.auth import Auth, AuthError, AuthUnavailable, Webhook
from node.config import ConfigError, Settings

Answer = Callable[[dict[str, Any], dict[str, str]], Any]


class HookServer:
    """A one-route HTTP/1.1 server; ``answer(body, headers)`` returns (status, bytes)
    or a coroutine that does (to be slow)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], dict[str, str]]] = []
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
            await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = json.loads(await reader.readexactly(int(headers["content-length"])))
            self.requests.append((body, headers))
            result = self.answer(body, headers)
            if asyncio.iscoroutine(result):
                result = await result
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


async def test_webhook_accepts_refuses_and_fails_closed(hook: HookServer) -> None:
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
                webhook=Webhook(hook.url(), timeout=1, ttl=0))
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


async def test_webhook_timeout_and_unreachable_are_503(hook: HookServer) -> None:
    async def slow(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        await asyncio.sleep(5)
        return 200, b'{"app": "late"}'

    hook.answer = slow
    auth = Auth(keys={}, open_mode=False, webhook=Webhook(hook.url(), timeout=0.3))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(AuthUnavailable):
        await auth.resolve("k", "a")
    assert loop.time() - t0 < 1.5
    dead = Auth(keys={}, open_mode=False, webhook=Webhook("http://127.0.0.1:9/", timeout=1))
    with pytest.raises(AuthUnavailable):
        await dead.resolve("k", "a")


async def test_webhook_cache_and_single_flight(hook: HookServer) -> None:
    now = [100.0]
    gate = asyncio.Event()
    fail = {"on": False}

    async def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        await gate.wait()
        if fail["on"]:
            return 502, b""
        return (403, b"") if body["publickey"] == "bad" else (200, b'{"app": "t"}')

    hook.answer = answer
    webhook = Webhook(hook.url(), timeout=2, ttl=10, clock=lambda: now[0])
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
        hook: HookServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hook.answer = lambda body, headers: (200, b'{"app": "t"}')
    auth = Auth(keys={}, open_mode=False,
                webhook=Webhook(hook.url("svc:s3cr%40t@"), timeout=1, ttl=0))
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
