"""publickey -> app id: tokens, static keys (reloadable) and an optional auth webhook.

With no keys, no webhook and no token key configured every non-empty key maps to one
default app, which is what a laptop wants. With keys configured only listed keys are
accepted.

* Tokens (any of ``AUTH_TOKEN_SECRET``, ``AUTH_TOKEN_PUBLIC_KEY_FILE``, ``AUTH_JWKS_URL``):
  a ``publickey`` that is a JWT is verified by :mod:`node.tokens` and nothing else; its
  ``sub`` must be the client id; it may name the app and the channels the peer may join.
  Anything else goes the ways below; with token auth on and nothing else configured,
  that is a refusal (403), never the default app.

* ``PUBLIC_KEYS_FILE`` is re-read on SIGHUP (:meth:`Auth.reload`): new connections use
  the new keys at once, existing peers keep the app they were admitted with. A file that
  cannot be read or parsed leaves the old keys in place.
* ``AUTH_WEBHOOK_URL``: for a key not in the static keys, the node POSTs
  ``{"publickey": KEY, "id": CLIENT_ID}`` (JSON) and expects ``200 {"app": "APP"}``,
  optionally with ``"channels": [...]`` (as a token's claim; a malformed list refuses).
  401, 403, 404 or a 200 without a string ``app`` refuse the key (HTTP 403 to the
  client); anything else (a timeout after ``AUTH_WEBHOOK_TIMEOUT``, a 5xx, a connection
  error, a body that is not JSON) refuses the connection with 503: the client may try
  again later, nothing is cached. Answers (acceptances and refusals) are cached for
  ``AUTH_WEBHOOK_CACHE`` seconds per (key, id); concurrent look-ups of one pair share
  one request. The client is one aiohttp session per webhook (keep-alive, at most
  ``MAX_WEBHOOK_CONNECTIONS`` calls at once), released by :meth:`Auth.aclose` at the
  node's stop.

The key (or token) itself is a secret: it is never logged, only a short fingerprint. The
webhook URL may carry credentials (``https://user:pass@host/...``, sent as Basic auth):
only its scheme, host and port are ever logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import aiohttp

from node.limits import parse_channels
from node.outbound import client_session, redact_url, split_credentials
from node.tokens import KeysUnavailable, TokenExpired, TokenRefused, TokenVerifier, looks_like_jwt

if TYPE_CHECKING:
    from node.config import Settings

log = logging.getLogger("prscd.auth")

#: Largest webhook answer body read; a larger one is a failure (503), not read in full.
MAX_REPLY_BYTES = 64 * 1024
#: Webhook calls in flight at once per node; more wait for a connection within the same
#: timeout, up to WAITING_PER_CONNECTION times this many look-ups in all: past that a
#: look-up of another (key, id) is refused at once with 503 (``busy``). Look-ups are cached and
#: single-flighted per (key, id), so only a reconnect storm of distinct peers gets near
#: this: it bounds the node's sockets and its load on the webhook (64 calls of ~20 ms each
#: are ~3,000 look-ups a second).
MAX_WEBHOOK_CONNECTIONS = 64
WAITING_PER_CONNECTION = 4
#: Cached webhook answers kept at most (expired ones are dropped first).
MAX_CACHE = 10_000


class AuthError(Exception):
    """The key was refused: HTTP ``status`` with ``answer``, what the client is told;
    ``str(exc)`` (with a fingerprint, never the key) is for the log."""

    status = HTTPStatus.FORBIDDEN

    def __init__(self, message: str, answer: str = "publickey rejected") -> None:
        super().__init__(message)
        self.answer = answer


class AuthExpired(AuthError):
    """The token has expired (HTTP 401): the client needs a new one."""

    status = HTTPStatus.UNAUTHORIZED


class AuthUnavailable(Exception):
    """The key could not be checked right now (HTTP 503, ``answer`` to the client)."""

    def __init__(self, message: str, answer: str = "cannot check the publickey now") -> None:
        super().__init__(message)
        self.answer = answer


@dataclass(frozen=True, slots=True)
class Grant:
    """An admitted key: the app (realm) and the channels it may join (None = any)."""

    app: str
    channels: tuple[str, ...] | None = None


def fingerprint(key: str) -> str:
    """A log-safe stand-in for a key."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes | None:
    """The answer body, or None when it is over MAX_REPLY_BYTES (then not read in full)."""
    if (resp.content_length or 0) > MAX_REPLY_BYTES:
        return None
    out = bytearray()
    # One byte over the cap is enough to know; a chunked or unsized answer is cut there.
    while chunk := await resp.content.read(MAX_REPLY_BYTES + 1 - len(out)):
        out += chunk
        if len(out) > MAX_REPLY_BYTES:
            return None
    return bytes(out)


@dataclass(slots=True)
class Webhook:
    """The auth webhook client with its short cache."""

    url: str = field(repr=False)  # may carry credentials
    timeout: float = 2.0
    ttl: float = 10.0
    clock: Callable[[], float] = time.monotonic
    ssl_context: ssl.SSLContext | None = None
    calls: int = 0
    failures: int = 0
    #: Look-ups refused because MAX_WEBHOOK_CONNECTIONS were in flight.
    busy: int = 0
    _cache: dict[tuple[str, str], tuple[float, Grant | None]] = field(default_factory=dict)
    _inflight: dict[tuple[str, str], asyncio.Future[Grant | None]] = field(
        default_factory=dict)
    _target: str = field(init=False, repr=False)
    _headers: dict[str, str] = field(init=False, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._target, self._headers = split_credentials(self.url)

    async def app_for(self, publickey: str, client_id: str) -> str | None:
        """The app of :meth:`grant_for`, or None when refused."""
        grant = await self.grant_for(publickey, client_id)
        return grant.app if grant is not None else None

    async def grant_for(self, publickey: str, client_id: str) -> Grant | None:
        """The app and channels, or None when refused; raises AuthUnavailable."""
        key = (publickey, client_id)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self.clock():
            return hit[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        if len(self._inflight) >= WAITING_PER_CONNECTION * MAX_WEBHOOK_CONNECTIONS:
            # A burst queues for a connection; a flood of distinct ids would hold a waiting
            # handshake each: refused at once (503, the client retries).
            self.busy += 1
            log.warning("auth webhook busy: %d look-ups in flight or waiting, refusing (503)",
                        len(self._inflight))
            raise AuthUnavailable("auth webhook busy",
                                  "cannot check the publickey now: try again")
        future: asyncio.Future[Grant | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            grant = await self._ask(publickey, client_id)
        except AuthUnavailable as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            del self._inflight[key]
        future.set_result(grant)
        self._remember(key, grant)
        return grant

    def _remember(self, key: tuple[str, str], grant: Grant | None) -> None:
        if self.ttl <= 0:
            return
        now = self.clock()
        if len(self._cache) >= MAX_CACHE:
            for k in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[k]
            while len(self._cache) >= MAX_CACHE:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + self.ttl, grant)

    async def _ask(self, publickey: str, client_id: str) -> Grant | None:
        self.calls += 1
        if self._closed:
            self._fail("client closed")
        body = json.dumps({"publickey": publickey, "id": client_id},
                          separators=(",", ":")).encode()
        try:
            # One budget for the whole look-up, a retry on a stale connection included.
            async with asyncio.timeout(self.timeout):
                status, reply = await self._post(body)
        except TimeoutError:
            self._fail(f"no answer within {self.timeout:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            # Only the type: aiohttp's messages name hosts and paths; the log line names
            # the webhook once, redacted.
            self._fail(type(exc).__name__)
        if status in (401, 403, 404):
            return None
        if status != 200:
            self.failures += 1
            log.warning("auth webhook failed url=%s status=%d", redact_url(self.url), status)
            raise AuthUnavailable("auth webhook unavailable")
        if reply is None:
            self._fail(f"answer over {MAX_REPLY_BYTES // 1024} KiB")
        try:
            answer = json.loads(reply)
        except ValueError:
            self.failures += 1
            log.warning("auth webhook answered 200 without JSON url=%s", redact_url(self.url))
            raise AuthUnavailable("auth webhook unavailable") from None
        app = answer.get("app") if isinstance(answer, dict) else None
        if not isinstance(app, str) or not app:
            return None
        if "channels" not in answer:
            return Grant(app)
        try:
            return Grant(app, parse_channels(answer["channels"]))
        except ValueError as exc:
            # The webhook's mistake, not the client's: refuse (fail closed) and say why.
            log.warning("auth webhook answered a malformed channels list url=%s error=%s",
                        redact_url(self.url), exc)
            return None

    def _fail(self, reason: str) -> NoReturn:
        self.failures += 1
        log.warning("auth webhook failed url=%s error=%s", redact_url(self.url), reason)
        raise AuthUnavailable("auth webhook unavailable") from None

    async def _post(self, body: bytes) -> tuple[int, bytes | None]:
        """One POST: (status, body); the body is read for a 200 only, None if too large."""
        session = self._open()
        for attempt in (1, 2):
            try:
                async with session.post(self._target, data=body, headers=self._headers,
                                        allow_redirects=False) as resp:
                    if resp.status != 200:
                        return resp.status, b""
                    return resp.status, await _read_capped(resp)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled keep-alive connection the webhook closed as we sent on it: try
                # once more on a new one (a look-up is safe to repeat; aiohttp retries
                # only idempotent methods itself).
                # A failed connect is not retried, nor anything once aclose() has begun.
                if (attempt == 2 or session.closed
                        or isinstance(exc, aiohttp.ClientConnectorError)):
                    raise
        raise AssertionError("unreachable")

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use: it belongs to the running loop."""
        if self._session is None:
            self._session = client_session(
                self.timeout, limit=MAX_WEBHOOK_CONNECTIONS,
                headers={"Content-Type": "application/json"}, ssl_context=self.ssl_context)
        return self._session

    async def aclose(self) -> None:
        """Close the HTTP client (the node's stop); later look-ups fail with 503."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


@dataclass(slots=True)
class Auth:
    keys: dict[str, str]
    default_app: str = "default"
    open_mode: bool = True
    #: The keys that come from PUBLIC_KEYS (kept on reload) and the file re-read on SIGHUP.
    env_keys: dict[str, str] = field(default_factory=dict)
    keys_file: str = ""
    webhook: Webhook | None = None
    tokens: TokenVerifier | None = None

    @classmethod
    def from_keys(cls, keys: dict[str, str], default_app: str = "default") -> Auth:
        return cls(keys=dict(keys), default_app=default_app, open_mode=not keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        webhook = None
        if settings.auth_webhook_url:
            webhook = Webhook(settings.auth_webhook_url, settings.auth_webhook_timeout,
                              settings.auth_webhook_cache)
        tokens = TokenVerifier.from_settings(settings)
        return cls(keys=dict(settings.public_keys), default_app=settings.default_app,
                   # Token auth on: a key that is not a token is no way into the default app.
                   open_mode=not settings.keys_configured and tokens is None,
                   env_keys=dict(settings.public_keys_env),
                   keys_file=settings.public_keys_file, webhook=webhook, tokens=tokens)

    def app_for(self, publickey: str) -> str:
        """The static answer (open mode or listed keys); raises AuthError."""
        if self.open_mode:
            return self.default_app
        app = self.keys.get(publickey)
        if app is None:
            raise AuthError(f"unknown publickey (fingerprint {fingerprint(publickey)})")
        return app

    async def resolve(self, publickey: str, client_id: str) -> str:
        """The app of :meth:`grant`."""
        return (await self.grant(publickey, client_id)).app

    async def grant(self, publickey: str, client_id: str) -> Grant:
        """A token (when token auth is on and the key is a JWT), else static keys, then
        the webhook. Raises AuthExpired (401), AuthError (403) or AuthUnavailable (503)."""
        if self.tokens is not None and looks_like_jwt(publickey):
            return await self._token(publickey, client_id)
        try:
            return Grant(self.app_for(publickey))
        except AuthError:
            if self.webhook is None:
                raise
        grant = await self.webhook.grant_for(publickey, client_id)
        if grant is None:
            raise AuthError(f"publickey refused by the webhook "
                            f"(fingerprint {fingerprint(publickey)})")
        return grant

    async def _token(self, token: str, client_id: str) -> Grant:
        assert self.tokens is not None
        try:
            claims = await self.tokens.verify(token, client_id)
        except TokenExpired as exc:
            raise AuthExpired(f"{exc} (token fingerprint {fingerprint(token)})",
                              str(exc)) from None
        except TokenRefused as exc:
            raise AuthError(f"{exc} (token fingerprint {fingerprint(token)})",
                            str(exc)) from None
        except KeysUnavailable:
            raise AuthUnavailable("JWKS unavailable", "cannot check the token now") from None
        return Grant(claims.app or self.default_app, claims.channels)

    async def aclose(self) -> None:
        """Release the webhook's and the JWKS client's connections (the node's stop)."""
        if self.webhook is not None:
            await self.webhook.aclose()
        if self.tokens is not None:
            await self.tokens.aclose()

    def reload(self) -> int:
        """Re-read ``PUBLIC_KEYS_FILE`` (SIGHUP). Returns how many keys are now active;
        on an error the old keys stay and the error is raised (ConfigError or OSError)."""
        from node.config import parse_keys

        keys = dict(self.env_keys)
        if self.keys_file:
            keys.update(parse_keys(Path(self.keys_file).read_text(), self.keys_file))
        self.keys = keys
        return len(keys)
