"""Settings, read ONCE at start-up from ``.env`` and the environment, then passed down.

No other module reads ``os.environ``. Unknown or malformed values fail start-up with
a message naming the key, rather than running with a surprise.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values


class ConfigError(ValueError):
    """A setting is malformed; the message names the key."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class _Reading(dict[str, str]):
    """The environment, remembering which keys the parser asked for."""

    def __init__(self, env: Mapping[str, str]) -> None:
        super().__init__(env)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{key}={raw!r}: expected true or false")


def _number(env: Mapping[str, str], key: str, default: float, kind: type = float) -> Any:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: expected a {kind.__name__}") from None
    if value < 0:
        raise ConfigError(f"{key}={raw!r}: must not be negative")
    return value


def parse_keys(text: str, source: str) -> dict[str, str]:
    """``KEY:APP`` pairs separated by commas or newlines; ``#`` starts a comment."""
    keys: dict[str, str] = {}
    for lineno, line in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, app = line.partition(":")
        if not sep or not key.strip() or not app.strip():
            # Never echo the line: it holds a secret.
            raise ConfigError(f"{source}: entry {lineno} is not KEY:APP")
        keys[key.strip()] = app.strip()
    return keys


def default_cache_dir(env: Mapping[str, str]) -> Path:
    home = Path(env.get("HOME") or tempfile.gettempdir())
    base = env.get("XDG_CACHE_HOME") or str(home / ".cache")
    return Path(base) / "prscd"


@dataclass(frozen=True, slots=True)
class Settings:
    debug: bool = False
    host: str = ""
    port: int = 8443
    mesh_id: str = "local"
    domain: str = ""
    tls: bool = True
    cert_file: str = ""
    key_file: str = ""
    cert_cache_dir: Path = field(default_factory=lambda: default_cache_dir({}))
    #: Comma-separated NATS servers, in order of preference; may embed credentials.
    nats_url: str = field(default="", repr=False)
    sndr_name: str = "prscd-source"
    rcvr_name: str = "prscd-stream-function"
    # NATS credentials and TLS (mesh/nats.py); secrets are never logged.
    nats_user: str = ""
    nats_password: str = field(default="", repr=False)
    nats_token: str = field(default="", repr=False)
    nats_nkey_file: str = ""
    nats_creds_file: str = ""
    nats_ca_file: str = ""
    nats_cert_file: str = ""
    nats_key_file: str = ""
    nats_ping_interval: float = 2.0
    nats_reconnect_wait: float = 0.25
    nats_reconnect_max_wait: float = 2.0
    # Mesh liveness (mesh/liveness.py).
    heartbeat_interval: float = 1.0
    node_timeout: float = 3.0
    public_url: str = ""
    jaeger_endpoint: str = ""
    public_keys: dict[str, str] = field(default_factory=dict, repr=False)
    public_keys_file: str = ""
    #: The PUBLIC_KEYS part of public_keys (kept when the file is re-read on SIGHUP).
    public_keys_env: dict[str, str] = field(default_factory=dict, repr=False)
    default_app: str = "default"
    max_message_bytes: int = 64 * 1024
    ping_interval: float = 10.0
    ping_timeout: float = 20.0
    ws_compression: bool = False
    webtransport: bool = True
    #: WebTransport: QUIC idle timeout and server PING interval (seconds). A killed
    #: browser sends nothing, so it is noticed only when pings go unanswered for this long.
    wt_idle_timeout: float = 10.0
    wt_ping_interval: float = 4.0
    #: How a stopping node ends WebTransport sessions: "connection" or "capsule".
    wt_stop_close: str = "connection"
    write_buffer_limit: int = 1024 * 1024
    #: Forward an unchanged peer_state only to members that lack it (node/presence.py).
    dedupe_peer_state: bool = True
    # Limits (node/limits.py); 0 = no limit.
    rate_limit: float = 200.0
    rate_burst: int = 400
    max_channels_per_peer: int = 64
    max_peers_per_channel: int = 1000
    max_connections: int = 10000
    #: Seconds a client may take from TCP/QUIC connect to an open WebSocket/WebTransport.
    handshake_timeout: float = 10.0
    http_max_line: int = 8192
    http_max_headers: int = 64
    #: POST {publickey, id} -> {app}; may embed credentials (never logged).
    auth_webhook_url: str = field(default="", repr=False)
    auth_webhook_timeout: float = 2.0
    auth_webhook_cache: float = 10.0
    pid_file: str = ""
    drain_seconds: float = 0.0
    #: Everything else read from the environment, for the adapters that need it
    #: (``OTEL_*``, NATS credentials); never logged.
    extra: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def keys_configured(self) -> bool:
        return bool(self.public_keys or self.public_keys_file or self.auth_webhook_url)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from a mapping (the environment merged over ``.env``)."""
        env = seen = _Reading(env)
        port = _number(env, "PORT", 8443, int)
        if port > 65535:
            raise ConfigError(f"PORT={port}: not a port number")
        env_keys = parse_keys(env.get("PUBLIC_KEYS", ""), "PUBLIC_KEYS")
        keys = dict(env_keys)
        keys_file = env.get("PUBLIC_KEYS_FILE", "").strip()
        if keys_file:
            try:
                keys.update(parse_keys(Path(keys_file).read_text(), keys_file))
            except OSError as exc:
                raise ConfigError(f"PUBLIC_KEYS_FILE={keys_file}: {exc.strerror}") from None
        mesh_id = env.get("MESH_ID", "").strip() or "local"
        if not all(ch.isalnum() or ch in "-_" for ch in mesh_id):
            raise ConfigError(f"MESH_ID={mesh_id!r}: use letters, digits, '-' and '_'")
        cert, key = env.get("CERT_FILE", "").strip(), env.get("KEY_FILE", "").strip()
        if bool(cert) != bool(key):
            raise ConfigError("CERT_FILE and KEY_FILE must be given together")
        nats_cert, nats_key = (env.get("NATS_CERT_FILE", "").strip(),
                               env.get("NATS_KEY_FILE", "").strip())
        if bool(nats_cert) != bool(nats_key):
            raise ConfigError("NATS_CERT_FILE and NATS_KEY_FILE must be given together")
        heartbeat = _number(env, "HEARTBEAT_INTERVAL", 1.0)
        node_timeout = _number(env, "NODE_TIMEOUT", 3.0)
        if heartbeat <= 0:
            raise ConfigError(f"HEARTBEAT_INTERVAL={heartbeat}: must be positive")
        if node_timeout <= heartbeat:
            raise ConfigError(f"NODE_TIMEOUT={node_timeout}: must exceed HEARTBEAT_INTERVAL")
        wt_stop_close = env.get("WT_STOP_CLOSE", "").strip().lower() or "connection"
        if wt_stop_close not in ("connection", "capsule"):
            raise ConfigError(f"WT_STOP_CLOSE={wt_stop_close!r}: expected connection or capsule")
        nats_ping = _number(env, "NATS_PING_INTERVAL", 2.0)
        if nats_ping <= 0:
            raise ConfigError(f"NATS_PING_INTERVAL={nats_ping}: must be positive")
        handshake_timeout = _number(env, "HANDSHAKE_TIMEOUT", 10.0)
        if handshake_timeout <= 0:
            raise ConfigError(f"HANDSHAKE_TIMEOUT={handshake_timeout}: must be positive")
        webhook = env.get("AUTH_WEBHOOK_URL", "").strip()
        if webhook and not webhook.startswith(("http://", "https://")):
            # Never echo the value: it may hold credentials.
            raise ConfigError("AUTH_WEBHOOK_URL: expected an http:// or https:// URL")
        settings = cls(
            debug=_bool(env, "DEBUG", False),
            host=env.get("HOST", "").strip(),
            port=port,
            mesh_id=mesh_id,
            domain=env.get("DOMAIN", "").strip(),
            tls=_bool(env, "TLS", True),
            cert_file=cert,
            key_file=key,
            cert_cache_dir=Path(env.get("CERT_CACHE_DIR", "").strip() or default_cache_dir(env)),
            nats_url=env.get("NATS_URL", "").strip(),
            sndr_name=env.get("YOMO_SNDR_NAME", "").strip() or "prscd-source",
            rcvr_name=env.get("YOMO_RCVR_NAME", "").strip() or "prscd-stream-function",
            nats_user=env.get("NATS_USER", "").strip(),
            nats_password=env.get("NATS_PASSWORD", ""),
            nats_token=env.get("NATS_TOKEN", "").strip(),
            nats_nkey_file=env.get("NATS_NKEY_FILE", "").strip(),
            nats_creds_file=env.get("NATS_CREDS_FILE", "").strip(),
            nats_ca_file=env.get("NATS_CA_FILE", "").strip(),
            nats_cert_file=nats_cert,
            nats_key_file=nats_key,
            nats_ping_interval=nats_ping,
            nats_reconnect_wait=_number(env, "NATS_RECONNECT_WAIT", 0.25),
            nats_reconnect_max_wait=_number(env, "NATS_RECONNECT_MAX_WAIT", 2.0),
            heartbeat_interval=heartbeat,
            node_timeout=node_timeout,
            public_url=env.get("PUBLIC_URL", "").strip(),
            jaeger_endpoint=env.get("YOMO_TRACE_JAEGER_ENDPOINT", "").strip(),
            public_keys=keys,
            public_keys_file=keys_file,
            public_keys_env=env_keys,
            default_app=env.get("DEFAULT_APP", "").strip() or "default",
            max_message_bytes=_number(env, "MAX_MESSAGE_SIZE", 64 * 1024, int),
            ping_interval=_number(env, "PING_INTERVAL", 10.0),
            ping_timeout=_number(env, "PING_TIMEOUT", 20.0),
            ws_compression=_bool(env, "WS_COMPRESSION", False),
            webtransport=_bool(env, "WEBTRANSPORT", True),
            wt_idle_timeout=_number(env, "WT_IDLE_TIMEOUT", 10.0),
            wt_ping_interval=_number(env, "WT_PING_INTERVAL", 4.0),
            wt_stop_close=wt_stop_close,
            write_buffer_limit=_number(env, "WRITE_BUFFER_LIMIT", 1024 * 1024, int),
            dedupe_peer_state=_bool(env, "DEDUPE_PEER_STATE", True),
            rate_limit=_number(env, "RATE_LIMIT", 200.0),
            rate_burst=_number(env, "RATE_BURST", 400, int),
            max_channels_per_peer=_number(env, "MAX_CHANNELS_PER_PEER", 64, int),
            max_peers_per_channel=_number(env, "MAX_PEERS_PER_CHANNEL", 1000, int),
            max_connections=_number(env, "MAX_CONNECTIONS", 10000, int),
            handshake_timeout=handshake_timeout,
            http_max_line=_number(env, "HTTP_MAX_LINE", 8192, int),
            http_max_headers=_number(env, "HTTP_MAX_HEADERS", 64, int),
            auth_webhook_url=webhook,
            auth_webhook_timeout=_number(env, "AUTH_WEBHOOK_TIMEOUT", 2.0),
            auth_webhook_cache=_number(env, "AUTH_WEBHOOK_CACHE", 10.0),
            pid_file=env.get("PID_FILE", "").strip(),
            drain_seconds=_number(env, "DRAIN_SECONDS", 0.0),
            extra={},
        )
        # Everything the parser did not ask for: OTEL_* and other adapters' keys.
        return replace(settings, extra={k: v for k, v in env.items() if k not in seen.asked})

    def pid_path(self) -> Path:
        if self.pid_file:
            return Path(self.pid_file)
        return Path(tempfile.gettempdir()) / f"prscd-{self.port}.pid"


def load(dotenv_path: str | os.PathLike[str] = ".env") -> Settings:
    """Read ``.env`` (if present) with the real environment taking precedence."""
    merged: dict[str, str] = {
        k: v for k, v in dotenv_values(dotenv_path).items() if v is not None
    }
    merged.update(os.environ)
    return Settings.from_env(merged)
