"""publickey -> app id: static keys (reloadable) and an optional auth webhook.

With no keys and no webhook configured every non-empty key maps to one default app,
which is what a laptop wants. With keys configured only listed keys are accepted.

* ``PUBLIC_KEYS_FILE`` is re-read on SIGHUP (:meth:`Auth.reload`): new connections use
  the new keys at once, existing peers keep the app they were admitted with. A file that
  cannot be read or parsed leaves the old keys in place.
* ``AUTH_WEBHOOK_URL``: for a key not in the static keys, the node POSTs
  ``{"publickey": KEY, "id": CLIENT_ID}`` (JSON) and expects ``200 {"app": "APP"}``.
  401, 403, 404 or a 200 without a string ``app`` refuse the key (HTTP 403 to the
  client); anything else (a timeout after ``AUTH_WEBHOOK_TIMEOUT``, a 5xx, a connection
  error, a body that is not JSON) refuses the connection with 503: the client may try
  again later, nothing is cached. Answers (acceptances and refusals) are cached for
  ``AUTH_WEBHOOK_CACHE`` seconds per (key, id); concurrent look-ups of one pair share
  one request.

The key itself is a secret: it is never logged, only a short fingerprint of it. The
webhook URL may carry credentials (``https://user:pass@host/...``, sent as Basic auth):
only its scheme, host and port are ever logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from node import __version__

if TYPE_CHECKING:
    from node.config import Settings

log = logging.getLogger("prscd.auth")

#: Largest webhook answer read (headers and body each).
MAX_REPLY_BYTES = 64 * 1024
#: Cached webhook answers kept at most (expired ones are dropped first).
MAX_CACHE = 10_000


class AuthError(Exception):
    """The key was refused (HTTP 403)."""


class AuthUnavailable(Exception):
    """The key could not be checked right now (HTTP 503)."""


def fingerprint(key: str) -> str:
    """A log-safe stand-in for a key."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def redact_url(url: str) -> str:
    """A URL fit for logs: scheme, host and port only."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}"


class WebhookError(Exception):
    """The webhook did not give a usable answer."""


async def post_json(url: str, payload: dict[str, Any], timeout: float,
                    ssl_context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 POST with a JSON body; returns (status, body). Raises WebhookError."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    body = json.dumps(payload, separators=(",", ":")).encode()
    host_header = host if ":" not in host else f"[{host}]"
    if parts.port:
        host_header += f":{parts.port}"
    lines = [f"POST {path} HTTP/1.1", f"Host: {host_header}",
             "Content-Type: application/json", f"Content-Length: {len(body)}",
             "Connection: close", f"User-Agent: prscd/{__version__}"]
    if parts.username is not None:
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        lines.append("Authorization: Basic " + base64.b64encode(secret.encode()).decode())
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    writer = None
    try:
        async with asyncio.timeout(timeout):
            ctx = (ssl_context or ssl.create_default_context()) if https else None
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ctx, server_hostname=host if https else None,
                limit=MAX_REPLY_BYTES)
            writer.write(request)
            status_line = await reader.readline()
            try:
                status = int(status_line.split()[1])
            except (IndexError, ValueError):
                raise WebhookError("not an HTTP answer") from None
            headers: dict[str, str] = {}
            for _ in range(100):
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            reply = await _read_body(reader, headers)
    except TimeoutError:
        raise WebhookError(f"no answer within {timeout:g}s") from None
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        raise WebhookError(type(exc).__name__) from None
    finally:
        if writer is not None:
            writer.close()
    return status, reply


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0 or len(out) + size > MAX_REPLY_BYTES:
                break
            out += await reader.readexactly(size)
            await reader.readline()
        return bytes(out)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_REPLY_BYTES:
            raise ValueError("answer too large")
        return await reader.readexactly(length)
    return await reader.read(MAX_REPLY_BYTES)


@dataclass(slots=True)
class Webhook:
    """The auth webhook client with its short cache."""

    url: str
    timeout: float = 2.0
    ttl: float = 10.0
    clock: Callable[[], float] = time.monotonic
    ssl_context: ssl.SSLContext | None = None
    calls: int = 0
    failures: int = 0
    _cache: dict[tuple[str, str], tuple[float, str | None]] = field(default_factory=dict)
    _inflight: dict[tuple[str, str], asyncio.Future[str | None]] = field(default_factory=dict)

    async def app_for(self, publickey: str, client_id: str) -> str | None:
        """The app, or None when refused; raises AuthUnavailable."""
        key = (publickey, client_id)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self.clock():
            return hit[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            app = await self._ask(publickey, client_id)
        except AuthUnavailable as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            del self._inflight[key]
        future.set_result(app)
        self._remember(key, app)
        return app

    def _remember(self, key: tuple[str, str], app: str | None) -> None:
        if self.ttl <= 0:
            return
        now = self.clock()
        if len(self._cache) >= MAX_CACHE:
            for k in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[k]
            while len(self._cache) >= MAX_CACHE:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + self.ttl, app)

    async def _ask(self, publickey: str, client_id: str) -> str | None:
        self.calls += 1
        try:
            status, body = await post_json(self.url, {"publickey": publickey, "id": client_id},
                                           self.timeout, self.ssl_context)
        except WebhookError as exc:
            self.failures += 1
            log.warning("auth webhook failed url=%s error=%s", redact_url(self.url), exc)
            raise AuthUnavailable("auth webhook unavailable") from None
        if status in (401, 403, 404):
            return None
        if status != 200:
            self.failures += 1
            log.warning("auth webhook failed url=%s status=%d", redact_url(self.url), status)
            raise AuthUnavailable("auth webhook unavailable")
        try:
            answer = json.loads(body)
        except ValueError:
            self.failures += 1
            log.warning("auth webhook answered 200 without JSON url=%s", redact_url(self.url))
            raise AuthUnavailable("auth webhook unavailable") from None
        app = answer.get("app") if isinstance(answer, dict) else None
        return app if isinstance(app, str) and app else None


@dataclass(slots=True)
class Auth:
    keys: dict[str, str]
    default_app: str = "default"
    open_mode: bool = True
    #: The keys that come from PUBLIC_KEYS (kept on reload) and the file re-read on SIGHUP.
    env_keys: dict[str, str] = field(default_factory=dict)
    keys_file: str = ""
    webhook: Webhook | None = None

    @classmethod
    def from_keys(cls, keys: dict[str, str], default_app: str = "default") -> Auth:
        return cls(keys=dict(keys), default_app=default_app, open_mode=not keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        webhook = None
        if settings.auth_webhook_url:
            webhook = Webhook(settings.auth_webhook_url, settings.auth_webhook_timeout,
                              settings.auth_webhook_cache)
        return cls(keys=dict(settings.public_keys), default_app=settings.default_app,
                   open_mode=not settings.keys_configured,
                   env_keys=dict(settings.public_keys_env),
                   keys_file=settings.public_keys_file, webhook=webhook)

    def app_for(self, publickey: str) -> str:
        """The static answer (open mode or listed keys); raises AuthError."""
        if self.open_mode:
            return self.default_app
        app = self.keys.get(publickey)
        if app is None:
            raise AuthError(f"unknown publickey (fingerprint {fingerprint(publickey)})")
        return app

    async def resolve(self, publickey: str, client_id: str) -> str:
        """Static keys first, then the webhook. Raises AuthError (403) or
        AuthUnavailable (503)."""
        try:
            return self.app_for(publickey)
        except AuthError:
            if self.webhook is None:
                raise
        app = await self.webhook.app_for(publickey, client_id)
        if app is None:
            raise AuthError(f"publickey refused by the webhook "
                            f"(fingerprint {fingerprint(publickey)})")
        return app

    def reload(self) -> int:
        """Re-read ``PUBLIC_KEYS_FILE`` (SIGHUP). Returns how many keys are now active;
        on an error the old keys stay and the error is raised (ConfigError or OSError)."""
        from node.config import parse_keys

        keys = dict(self.env_keys)
        if self.keys_file:
            keys.update(parse_keys(Path(self.keys_file).read_text(), self.keys_file))
        self.keys = keys
        return len(keys)
