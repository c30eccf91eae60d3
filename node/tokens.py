"""Tokens: a JWT in the ``publickey`` query parameter binds the client ``id`` and may
name the app and the channels its holder may join (docs/tokens.md).

The published client sends its ``publicKey`` option as ``publickey=`` on the connection
URL, unmodified; a JWT is URL-safe, so it can carry one. PyJWT verifies, never code of
ours. The algorithms a key accepts come from the key's configured type only, never from
the token's header: HS256 for ``AUTH_TOKEN_SECRET``; ES256 (P-256) or RS256 for the PEM
of ``AUTH_TOKEN_PUBLIC_KEY_FILE`` and each key of ``AUTH_JWKS_URL``. The header only
picks which configured key to try (``alg``, and ``kid`` for the JWKS).

The JWKS is fetched with aiohttp on first use and kept. A token whose ``kid`` is unknown
makes one refresh (single flight, at most one every ``min_interval`` seconds, so a flood of
made-up kids costs the issuer one request per interval); a set older than ``max_age`` is
refreshed in the background while its keys keep serving. A failed fetch keeps the old
keys: known kids still work, unknown ones are answered 503 until a fetch succeeds.

Nothing here logs or raises the token itself: reasons are short and fixed, and
:mod:`node.auth` adds a fingerprint.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.utils import base64url_decode

from node.config import ConfigError
from node.limits import parse_channels
from node.outbound import client_session, redact_url

if TYPE_CHECKING:
    from node.config import Settings

log = logging.getLogger("prscd.tokens")

#: Seconds one JWKS fetch may take (connect and read).
JWKS_TIMEOUT = 5.0
#: Least seconds between two JWKS fetches caused by unknown kids.
JWKS_MIN_INTERVAL = 5.0
#: Seconds after which a JWKS is fetched again in the background (keys the issuer dropped
#: stop working within this).
JWKS_MAX_AGE = 300.0
#: Largest JWKS document read, and most keys kept from it.
MAX_JWKS_BYTES = 64 * 1024
MAX_JWKS_KEYS = 64
#: RFC 7518 3.2: an HS256 key must be at least as long as the hash (32 bytes).
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
MAX_APP_BYTES = 128
MAX_KID_CHARS = 256

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


class TokenRefused(Exception):
    """The token is refused (HTTP 403); ``str(exc)`` is a short reason, safe to show."""


class TokenExpired(TokenRefused):
    """The token's ``exp`` has passed, leeway included (HTTP 401)."""


class KeysUnavailable(Exception):
    """The JWKS could not be fetched, and the token's kid is not among the keys (503)."""


class Claims(NamedTuple):
    """What a verified token grants: its app (None = DEFAULT_APP) and channels (None = any)."""

    app: str | None
    channels: tuple[str, ...] | None


def looks_like_jwt(publickey: str) -> bool:
    """Three base64url segments whose first is a JSON object: a token, not a key. (The
    signature may be empty, as in ``alg: none``, which is then refused, not taken as a key.)"""
    parts = publickey.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return False
    if not all(_SEGMENT.fullmatch(part) for part in parts):
        return False
    try:
        header = json.loads(base64url_decode(parts[0]))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict)


def load_public_key(path: str) -> tuple[Any, str]:
    """The PEM public key of AUTH_TOKEN_PUBLIC_KEY_FILE and the one algorithm it verifies."""
    where = f"AUTH_TOKEN_PUBLIC_KEY_FILE={path}"
    try:
        with open(path, "rb") as f:
            key = load_pem_public_key(f.read())
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{where}: not a PEM public key") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return key, "RS256"
    raise ConfigError(f"{where}: need an EC P-256 (ES256) or RSA >= {MIN_RSA_BITS} bit "
                      f"(RS256) public key")


def _usable(jwk: dict[str, Any]) -> jwt.PyJWK | None:
    """A JWKS entry as a verifying key, or None: signing keys with a kid, EC P-256 or
    RSA >= 2048 bits, whose own ``alg`` (if any) agrees with their type."""
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
        return None
    if jwk.get("use", "sig") != "sig":
        return None
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "EC" and crv == "P-256":
        algorithm = "ES256"
    elif kty == "RSA":
        algorithm = "RS256"
    else:
        return None
    if jwk.get("alg", algorithm) != algorithm:
        return None
    try:
        key = jwt.PyJWK(jwk, algorithm)
    except jwt.PyJWTError:
        return None
    if algorithm == "RS256" and key.key.key_size < MIN_RSA_BITS:
        return None
    return key


class Jwks:
    """The issuer's key set: fetched on first use, refreshed on an unknown kid (single
    flight, rate-limited) and when old; see the module docstring."""

    def __init__(self, url: str, *, timeout: float = JWKS_TIMEOUT,
                 min_interval: float = JWKS_MIN_INTERVAL, max_age: float = JWKS_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.timeout = timeout
        self.min_interval = min_interval
        self.max_age = max_age
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        #: Did the last fetch succeed? (False before the first one.)
        self.ok = False
        self.fetches = 0
        self.failures = 0
        self._fetched_at: float | None = None
        self._tried_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key named ``kid``; raises TokenRefused (unknown) or KeysUnavailable."""
        now = self.clock()
        found = self.keys.get(kid)
        if found is not None:
            if self._fetched_at is not None and now - self._fetched_at > self.max_age:
                self._refresh(now)  # in the background: this key serves meanwhile
            return found
        task = self._refresh(now)
        if task is not None:
            await asyncio.shield(task)
        found = self.keys.get(kid)
        if found is not None:
            return found
        if not self.ok:
            raise KeysUnavailable("JWKS unavailable")
        raise TokenRefused("unknown token kid")

    def _refresh(self, now: float) -> asyncio.Task[None] | None:
        """The fetch under way, a new one, or None (too soon after the last, or closed)."""
        if self._task is not None:
            return self._task
        if self._closed or (self._tried_at is not None
                            and now - self._tried_at < self.min_interval):
            return None
        self._tried_at = now
        self._task = asyncio.get_running_loop().create_task(self._fetch())
        return self._task

    async def _fetch(self) -> None:
        self.fetches += 1
        where = redact_url(self.url)
        try:
            async with asyncio.timeout(self.timeout):
                keys = await self._get()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            # Only the type or our own words: aiohttp's messages name hosts and paths.
            self.ok = False
            self.failures += 1
            why = str(exc) if isinstance(exc, _JwksError) else type(exc).__name__
            log.warning("jwks fetch failed url=%s error=%s keys_kept=%d", where, why,
                        len(self.keys))
        except Exception:
            self.ok = False
            self.failures += 1
            log.exception("jwks fetch failed url=%s keys_kept=%d", where, len(self.keys))
        else:
            self.keys, self.ok, self._fetched_at = keys, True, self.clock()
            log.info("jwks fetched url=%s keys=%d", where, len(keys))
        finally:
            self._task = None

    async def _get(self) -> dict[str, jwt.PyJWK]:
        session = self._open()
        async with session.get(self.url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise _JwksError(f"status {resp.status}")
            if (resp.content_length or 0) > MAX_JWKS_BYTES:
                raise _JwksError(f"over {MAX_JWKS_BYTES // 1024} KiB")
            body = bytearray()
            while chunk := await resp.content.read(MAX_JWKS_BYTES + 1 - len(body)):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise _JwksError(f"over {MAX_JWKS_BYTES // 1024} KiB")
        try:
            document = json.loads(body)
        except ValueError:
            raise _JwksError("not JSON") from None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise _JwksError("no keys list")
        keys: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            key = _usable(entry) if isinstance(entry, dict) else None
            if key is not None and len(keys) < MAX_JWKS_KEYS:
                keys[key.key_id] = key  # type: ignore[index]
        if not keys:
            raise _JwksError("no usable ES256 / RS256 key with a kid")
        return keys

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use: it belongs to the running loop."""
        if self._session is None:
            self._session = client_session(self.timeout, limit=4,
                                           headers={"Accept": "application/json"})
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _JwksError(ValueError):
    """A JWKS answer we cannot use; ``str(exc)`` is log-safe."""


class TokenVerifier:
    """Verifies tokens against the configured keys (any of the three may be set)."""

    def __init__(self, *, secret: str = "", public_key: Any = None, public_alg: str = "",
                 jwks: Jwks | None = None, leeway: float = 30.0) -> None:
        self.secret = secret.encode()
        self.public_key = public_key
        self.public_alg = public_alg
        self.jwks = jwks
        self.leeway = leeway

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier | None:
        """None when token auth is off. Raises ConfigError for an unusable key."""
        secret = settings.auth_token_secret
        if not (secret or settings.auth_token_public_key_file or settings.auth_jwks_url):
            return None
        if secret and len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"AUTH_TOKEN_SECRET: at least {MIN_SECRET_BYTES} bytes "
                              f"(an HS256 key as long as the hash, RFC 7518 3.2)")
        public_key, public_alg = None, ""
        if settings.auth_token_public_key_file:
            public_key, public_alg = load_public_key(settings.auth_token_public_key_file)
        jwks = Jwks(settings.auth_jwks_url) if settings.auth_jwks_url else None
        return cls(secret=secret, public_key=public_key, public_alg=public_alg, jwks=jwks,
                   leeway=settings.auth_token_leeway)

    async def verify(self, token: str, client_id: str) -> Claims:
        """The claims of a valid token for ``client_id``. Raises TokenExpired (401),
        TokenRefused (403) or KeysUnavailable (503)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("malformed token") from None
        key, algorithm = await self._key_for(header.get("alg"), header.get("kid"))
        try:
            claims = jwt.decode(token, key, algorithms=[algorithm], leeway=self.leeway,
                                options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise TokenExpired("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("token not yet valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f"token has no {exc.claim}") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("bad token signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRefused("token algorithm not accepted") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused("token has an aud claim: not accepted here") from None
        except jwt.PyJWTError:
            raise TokenRefused("malformed token") from None
        if claims["sub"] != client_id:
            raise TokenRefused("token sub does not match id")
        return Claims(_app(claims), _channels(claims))

    async def _key_for(self, alg: object, kid: object) -> tuple[Any, str]:
        """The configured key the header names, with the one algorithm that key verifies."""
        if alg == "HS256" and self.secret:
            return self.secret, "HS256"
        if alg in ("ES256", "RS256"):
            if kid is not None and self.jwks is not None:
                if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
                    raise TokenRefused("malformed token kid")
                jwk = await self.jwks.key(kid)
                return jwk, jwk.algorithm_name
            if self.public_key is not None:
                return self.public_key, self.public_alg
            if self.jwks is not None:
                raise TokenRefused("token has no kid")
        raise TokenRefused("token algorithm not accepted")

    async def aclose(self) -> None:
        if self.jwks is not None:
            await self.jwks.aclose()


def _app(claims: dict[str, Any]) -> str | None:
    if "app" not in claims:
        return None
    app = claims["app"]
    if (not isinstance(app, str) or not app or len(app.encode()) > MAX_APP_BYTES
            or any(ord(ch) < 0x20 or ch == "\x7f" for ch in app)):
        raise TokenRefused("malformed app claim")
    return app


def _channels(claims: dict[str, Any]) -> tuple[str, ...] | None:
    if "channels" not in claims:
        return None
    try:
        return parse_channels(claims["channels"])
    except ValueError as exc:
        raise TokenRefused(f"malformed channels claim: {exc}") from None
