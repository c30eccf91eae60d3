"""Settings, read ONCE at start-up from ``.env`` and the environment, then passed down.

No other module reads ``os.environ``. Every setting is written once, as a field of
``Settings`` that carries its environment key, how its text is read, its default, its
section and a one-line meaning. ``from_env``, ``.env.example`` and docs/configuration.md
are all made from those fields: ``python -m node.config --env-example`` / ``--markdown``.
Malformed values fail start-up with a message naming the key (never a secret's value),
rather than running with a surprise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values


class ConfigError(ValueError):
    """A setting is malformed; the message names the key."""


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
class Key:
    """One row of the settings table (the field it belongs to is filled in below)."""

    section: str
    env: str
    kind: str  # how the text is read: a key of _KINDS
    default: Any
    meaning: str
    secret: bool = False  # never echoed: not in errors, repr, logs or dumps
    choices: tuple[str, ...] = ()
    #: For a default that depends on the environment: the function, and how docs show it.
    compute: Callable[[Mapping[str, str]], Any] | None = None
    shown: str = ""
    name: str = ""  # the Settings field


def _S(section: str, env: str, kind: str, default: Any, meaning: str, *,
       secret: bool = False, choices: tuple[str, ...] = (),
       compute: Callable[[Mapping[str, str]], Any] | None = None, shown: str = "") -> Any:
    """One row of the table, as the ``Settings`` field that carries it (a short name: the
    rows read better short). Secrets are left out of repr."""
    key = Key(section, env, kind, default, meaning, secret, choices, compute, shown)
    meta = {"key": key}
    if compute is not None:
        return field(default_factory=lambda: compute({}), repr=not secret, metadata=meta)
    if isinstance(default, dict):  # a mutable default: each Settings gets its own
        return field(default_factory=dict, repr=not secret, metadata=meta)
    return field(default=default, repr=not secret, metadata=meta)



@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, one field per row of the table: section, environment key, kind,
    default, meaning. ``TABLE`` (below) lists the rows; ``from_env`` reads them."""

    port: int = _S("node", "PORT", "port", 8443,
                   "TCP (WebSocket, HTTP) and UDP (WebTransport) port; 0 = any free port.")
    host: str = _S("node", "HOST", "text", "", "Bind address; empty = all interfaces.")
    mesh_id: str = _S("node", "MESH_ID", "name", "local",
                      "This node's region (letters, digits, '-', '_'); several nodes may "
                      "share one.")
    domain: str = _S("node", "DOMAIN", "text", "",
                     "Public host name of this node; added to the generated dev certificate.")
    debug: bool = _S("node", "DEBUG", "bool", False, "Per-message debug logs.")

    tls: bool = _S("TLS", "TLS", "bool", True,
                   "false = plain TCP (ws://, http://) behind a TLS-terminating proxy.")
    cert_file: str = _S("TLS", "CERT_FILE", "path", "",
                        "PEM certificate chain, with KEY_FILE; neither = generated dev cert.",
                        shown="generated")
    key_file: str = _S("TLS", "KEY_FILE", "path", "",
                       "PEM private key of CERT_FILE (both or neither).", shown="generated")
    # RUF009: _S returns a dataclasses.field, so each instance gets its own default.
    cert_cache_dir: Path = _S("TLS", "CERT_CACHE_DIR", "dir", "",  # noqa: RUF009
                              "Where the generated dev certificate is cached.",
                              compute=default_cache_dir,
                              shown="`$XDG_CACHE_HOME/prscd`, else `~/.cache/prscd`")

    public_keys: dict[str, str] = _S(  # noqa: RUF009
        "auth", "PUBLIC_KEYS", "keys", {},
        "Comma-separated KEY:APP pairs; when set, only listed keys connect.",
        secret=True)
    public_keys_file: str = _S("auth", "PUBLIC_KEYS_FILE", "path", "",
                               "A file of KEY:APP lines ('#' comments); re-read on SIGHUP.")
    default_app: str = _S("auth", "DEFAULT_APP", "text", "default",
                          "The app every key joins when no keys are configured (development).")
    auth_webhook_url: str = _S(
        "auth", "AUTH_WEBHOOK_URL", "url", "",
        "Asked about keys not listed: POST {publickey, id}, 200 {\"app\": ...} admits.",
        secret=True)
    auth_webhook_timeout: float = _S("auth", "AUTH_WEBHOOK_TIMEOUT", "seconds", 2.0,
                                     "Seconds to wait for the webhook; then 503.")
    auth_webhook_cache: float = _S("auth", "AUTH_WEBHOOK_CACHE", "seconds", 10.0,
                                   "Seconds an answer (admit or refuse) is cached per (key, id).")
    auth_token_secret: str = _S("tokens", "AUTH_TOKEN_SECRET", "password", "",
                                "HS256 secret: publickeys that are JWTs signed with it are "
                                "tokens (sub = id).", secret=True)
    auth_token_public_key_file: str = _S("tokens", "AUTH_TOKEN_PUBLIC_KEY_FILE", "path", "",
                                         "PEM public key verifying ES256 / RS256 tokens.")
    auth_jwks_url: str = _S("tokens", "AUTH_JWKS_URL", "url", "",
                            "JWKS of the token issuer: fetched, cached, refreshed on an "
                            "unknown kid.")
    auth_token_leeway: float = _S("tokens", "AUTH_TOKEN_LEEWAY", "seconds", 30.0,
                                  "Clock skew allowed on a token's exp / nbf / iat.")

    api_port: int = _S("server API", "API_PORT", "port", 8444,
                       "HTTPS port of the server API (node certificate); on when API_KEYS is set.")
    api_keys: str = _S("server API", "API_KEYS", "password", "",
                       "Comma-separated bearer keys for the server API; empty = API off.",
                       secret=True)
    api_query_timeout: float = _S("server API", "API_QUERY_TIMEOUT", "positive", 1.0,
                                  "Seconds a mesh-wide answer waits for the other nodes.")
    admin_local: bool = _S("server API", "ADMIN_LOCAL", "bool", True,
                           "With API_KEYS empty: /admin on PORT for loopback clients; false "
                           "behind a proxy on this host (docs/operations.md).")

    webhook_url: str = _S("webhooks", "WEBHOOK_URL", "url", "",
                          "Where batched, signed membership events are POSTed; empty = off.",
                          secret=True)
    webhook_secret: str = _S("webhooks", "WEBHOOK_SECRET", "password", "",
                             "HMAC-SHA256 key of the X-Prscd-Signature header.", secret=True)
    webhook_grace: float = _S("webhooks", "WEBHOOK_GRACE", "seconds", 5.0,
                              "A member back within this many seconds never left (no events).")
    webhook_queue: int = _S("webhooks", "WEBHOOK_QUEUE", "int", 10000,
                            "Events waiting for delivery at most; more are dropped (counted).")
    webhook_timeout: float = _S("webhooks", "WEBHOOK_TIMEOUT", "positive", 5.0,
                                "Seconds one delivery may take before it is retried.")

    max_message_bytes: int = _S("limits", "MAX_MESSAGE_SIZE", "int", 64 * 1024,
                                "Largest message in bytes; a bigger one closes with 1009.")
    ping_interval: float = _S("limits", "PING_INTERVAL", "seconds", 1.0,
                              "Seconds between server pings; 0 = off (docs/presence.md).")
    ping_silent_timeout: float = _S("limits", "PING_SILENT_TIMEOUT", "seconds", 2.0,
                                    "A peer not answering a ping this long is silent: offline "
                                    "for the others after PRESENCE_GRACE, still connected; a "
                                    "late pong or frame brings it back.")
    ping_timeout: float = _S("limits", "PING_TIMEOUT", "seconds", 30.0,
                             "A peer not answering a ping this long is closed (1011; offline "
                             "after PRESENCE_GRACE unless silent already).")
    presence_grace: float = _S("limits", "PRESENCE_GRACE", "seconds", 1.5,
                               "A vanished peer (keepalive or idle timeout, no close) stays a "
                               "member this long; its id joining again meanwhile hides the "
                               "drop; 0 = offline at once.")
    ws_compression: bool = _S("limits", "WS_COMPRESSION", "bool", False,
                              "permessage-deflate for WebSocket (about 50 KiB more per peer).")
    write_buffer_limit: int = _S("limits", "WRITE_BUFFER_LIMIT", "int", 1024 * 1024,
                                 "Bytes queued to a peer that does not read before closing it "
                                 "with 1008.")
    dedupe_peer_state: bool = _S("limits", "DEDUPE_PEER_STATE", "bool", True,
                                 "Forward an unchanged peer_state only to members lacking it.")
    rate_limit: float = _S("limits", "RATE_LIMIT", "float", 200.0,
                           "Messages per second per connection (token bucket); 0 = no limit.")
    rate_burst: int = _S("limits", "RATE_BURST", "int", 400,
                         "Messages one connection may send at once above RATE_LIMIT.")
    max_channels_per_peer: int = _S("limits", "MAX_CHANNELS_PER_PEER", "int", 64,
                                    "Channels one connection may join (4008); 0 = no limit.")
    max_peers_per_channel: int = _S("limits", "MAX_PEERS_PER_CHANNEL", "int", 1000,
                                    "Peers of one channel connected to this node process, "
                                    "not mesh-wide: peers on other nodes (or workers) do not "
                                    "count; the next join gets 4008; 0 = no limit.")
    max_connections: int = _S("limits", "MAX_CONNECTIONS", "int", 10000,
                              "Connections per node process, half-open ones included: a peer "
                              "past it gets HTTP 503, a half-open connection closes the "
                              "oldest half-open one; 0 = no limit.")
    handshake_timeout: float = _S("limits", "HANDSHAKE_TIMEOUT", "positive", 10.0,
                                  "Seconds for TLS, then for the upgrade or WebTransport session.")
    max_handshakes: int = _S("limits", "MAX_HANDSHAKES", "int", 1000,
                             "Connections in their handshake at once (TCP from its accept until "
                             "its upgrade, QUIC without a session); past it the oldest is "
                             "closed; 0 = no limit.")
    http_max_line: int = _S("limits", "HTTP_MAX_LINE", "int", 8192,
                            "Longest HTTP request or header line in bytes (414 / 431).")
    http_max_headers: int = _S("limits", "HTTP_MAX_HEADERS", "int", 64,
                               "Most HTTP header lines (431).")
    malloc_trim_interval: float = _S("limits", "MALLOC_TRIM_INTERVAL", "seconds", 30.0,
                                     "Seconds between giving free heap memory back to the "
                                     "system (glibc malloc_trim: RSS stays flat under "
                                     "connection churn, docs/soak.md); 0 = never.")

    webtransport: bool = _S("WebTransport", "WEBTRANSPORT", "bool", True,
                            "HTTP/3 on UDP PORT, same certificate (needs TLS); false = off.")
    wt_idle_timeout: float = _S("WebTransport", "WT_IDLE_TIMEOUT", "seconds", 30.0,
                                "Seconds without a packet from a peer before its session ends.")
    wt_silent_timeout: float = _S("WebTransport", "WT_SILENT_TIMEOUT", "seconds", 2.0,
                                  "No packet this long after a server PING: the peer is "
                                  "silent (as PING_SILENT_TIMEOUT).")
    wt_ping_interval: float = _S("WebTransport", "WT_PING_INTERVAL", "seconds", 1.0,
                                 "Seconds between server QUIC PINGs; 0 = off; keep well under "
                                 "the idle timeout.")
    wt_stop_close: str = _S("WebTransport", "WT_STOP_CLOSE", "choice", "connection",
                            "How a stopping node ends sessions: connection (the client "
                            "reconnects) or capsule.", choices=("connection", "capsule"))

    drain_seconds: float = _S("operations", "DRAIN_SECONDS", "seconds", 0.0,
                              "On SIGTERM, fail /ready and keep serving peers up to this long "
                              "(over once none is left); 0 = stop now.")
    pid_file: str = _S("operations", "PID_FILE", "path", "", "Pid file path.",
                       shown="`$TMPDIR/prscd-PORT.pid`")
    metrics: bool = _S("operations", "METRICS", "bool", True,
                       "Keep the latency histograms of /metrics (docs/metrics.md); counters "
                       "and gauges stay either way.")
    metrics_port: int = _S("operations", "METRICS_PORT", "port", 0,
                           "A plain-HTTP /metrics listener on HOST (with --workers N, worker "
                           "n on METRICS_PORT+n); 0 = /metrics on PORT only.")

    nats_url: str = _S("mesh", "NATS_URL", "text", "",
                       "NATS servers, comma-separated, this region's first; empty = embedded bus.",
                       secret=True)
    sndr_name: str = _S("mesh", "YOMO_SNDR_NAME", "text", "prscd-source",
                        "Name of the Source (sender) bus connection (NATS /connz).")
    rcvr_name: str = _S("mesh", "YOMO_RCVR_NAME", "text", "prscd-stream-function",
                        "Name of the Stream Function (receiver) bus connection.")
    nats_user: str = _S("mesh", "NATS_USER", "text", "", "NATS user (with NATS_PASSWORD).")
    nats_password: str = _S("mesh", "NATS_PASSWORD", "password", "", "NATS password.",
                            secret=True)
    nats_token: str = _S("mesh", "NATS_TOKEN", "text", "", "NATS token.", secret=True)
    nats_nkey_file: str = _S("mesh", "NATS_NKEY_FILE", "path", "",
                             "NKey seed file (needs `pip install 'nats-py[nkeys]'`).")
    nats_creds_file: str = _S("mesh", "NATS_CREDS_FILE", "path", "",
                              "NATS .creds file: JWT + seed (needs nats-py[nkeys] too).")
    nats_ca_file: str = _S("mesh", "NATS_CA_FILE", "path", "",
                           "CA bundle to verify NATS servers (tls:// URLs, or servers "
                           "requiring TLS).")
    nats_cert_file: str = _S("mesh", "NATS_CERT_FILE", "path", "",
                             "Client certificate for NATS, with NATS_KEY_FILE (both or neither).")
    nats_key_file: str = _S("mesh", "NATS_KEY_FILE", "path", "",
                            "Private key of NATS_CERT_FILE.")
    nats_ping_interval: float = _S("mesh", "NATS_PING_INTERVAL", "positive", 2.0,
                                   "Seconds between pings to NATS; two unanswered = reconnect.")
    nats_reconnect_wait: float = _S("mesh", "NATS_RECONNECT_WAIT", "seconds", 0.25,
                                    "First reconnect wait once every server failed; doubles.")
    nats_reconnect_max_wait: float = _S("mesh", "NATS_RECONNECT_MAX_WAIT", "seconds", 2.0,
                                        "Longest reconnect wait (reconnects go on forever).")
    nats_failback_after: float = _S("mesh", "NATS_FAILBACK_AFTER", "seconds", 30.0,
                                    "Away from NATS_URL's first server, move back once it has "
                                    "been healthy this long (x1-1.5 per node); 0 = stay.")
    heartbeat_interval: float = _S("mesh", "HEARTBEAT_INTERVAL", "positive", 1.0,
                                   "Seconds between this node's heartbeats on the bus.")
    node_timeout: float = _S("mesh", "NODE_TIMEOUT", "seconds", 3.0,
                             "Silence after which a node is dead; must exceed "
                             "HEARTBEAT_INTERVAL (3x is good).")
    public_url: str = _S("mesh", "PUBLIC_URL", "text", "",
                         "This node's client URL, carried in its heartbeats (node directory).")

    jaeger_endpoint: str = _S("tracing", "YOMO_TRACE_JAEGER_ENDPOINT", "text", "",
                              "Where spans go (OTLP/HTTP); empty = the OTEL_EXPORTER_OTLP_* "
                              "endpoint, or off.")
    trace_data_ratio: float = _S("tracing", "TRACE_DATA_RATIO", "ratio", 0.01,
                                 "Share of `data` messages (cursor moves) traced; presence "
                                 "changes are always traced (1 = every message).")

    # Not read from a key of their own:
    #: The PUBLIC_KEYS part of public_keys (kept when the file is re-read on SIGHUP).
    public_keys_env: dict[str, str] = field(default_factory=dict, repr=False)
    #: Every key not in the table, for the adapters that want them (``OTEL_*``); never logged.
    extra: dict[str, str] = field(default_factory=dict, repr=False)
    #: The process environment ``load()`` read, for starting workers (``{}`` from
    #: ``from_env``); never logged.
    environ: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def keys_configured(self) -> bool:
        return bool(self.public_keys or self.public_keys_file or self.auth_webhook_url)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from a mapping (the environment merged over ``.env``)."""
        values = {key.name: _read(key, env) for key in TABLE}
        values["public_keys_env"] = dict(values["public_keys"])
        keys_file = values["public_keys_file"]
        if keys_file:
            try:
                values["public_keys"].update(parse_keys(Path(keys_file).read_text(), keys_file))
            except OSError as exc:
                raise ConfigError(f"PUBLIC_KEYS_FILE={keys_file}: {exc.strerror}") from None
        for cert, key in (("CERT_FILE", "KEY_FILE"), ("NATS_CERT_FILE", "NATS_KEY_FILE")):
            if bool(values[BY_ENV[cert].name]) != bool(values[BY_ENV[key].name]):
                raise ConfigError(f"{cert} and {key} must be given together")
        if values["node_timeout"] <= values["heartbeat_interval"]:
            raise ConfigError(f"NODE_TIMEOUT={values['node_timeout']}: "
                              "must exceed HEARTBEAT_INTERVAL")
        return cls(**values, extra={k: v for k, v in env.items() if k not in BY_ENV})

    def pid_path(self) -> Path:
        if self.pid_file:
            return Path(self.pid_file)
        return Path(tempfile.gettempdir()) / f"prscd-{self.port}.pid"


#: The table: one row per key, in the order of the Settings fields.
TABLE: tuple[Key, ...] = tuple(replace(f.metadata["key"], name=f.name)
                               for f in fields(Settings) if "key" in f.metadata)
BY_ENV: dict[str, Key] = {key.env: key for key in TABLE}


# ---- keys of the Go prscd that mean nothing here ---------------------------------------------

_MESH_ADVICE = ("the mesh here is NATS: set NATS_URL (this region's NATS servers); without it "
                "this node runs alone on an embedded bus")
_LOG_ADVICE = "logs here are logfmt lines on stderr only; redirect them where you start prscd"

#: Go key -> (what it did in the Go prscd, what to set here instead). Values are never shown:
#: YOMO_CREDENTIAL is a secret, and the others are not needed to give the advice.
LEGACY: dict[str, tuple[str, str]] = {
    "WITH_YOMO_ZIPPER": ("true started a YoMo zipper inside the process (./yomo.yaml)",
                         _MESH_ADVICE),
    "AS_YOMO_ZIPPER": ("older name of WITH_YOMO_ZIPPER", _MESH_ADVICE),
    "YOMO_ZIPPER": ("host:port of the YoMo zipper the node's source and stream function joined",
                    _MESH_ADVICE),
    "YOMO_CREDENTIAL": ("credential the node presented to the YoMo zipper",
                        "set the NATS credential instead: NATS_CREDS_FILE, NATS_TOKEN, or "
                        "NATS_USER with NATS_PASSWORD (NATS_NKEY_FILE for an NKey seed)"),
    "YOMO_LOG_LEVEL": ("log level of the YoMo SDK (debug, info, warn, error)", ""),
    "YOMO_LOG_OUTPUT": ("file for the YoMo SDK's log", _LOG_ADVICE),
    "YOMO_LOG_ERROR_OUTPUT": ("file for the YoMo SDK's error log", _LOG_ADVICE),
    "YOMO_LOG_FORMAT": ("text or json for the YoMo SDK's log", _LOG_ADVICE),
    "YOMO_LOG_VERBOSE": ("source lines in the YoMo SDK's log", _LOG_ADVICE),
}

#: YOMO_LOG_LEVEL -> advice. There is no level below info here: DEBUG=true or the default.
_GO_LEVELS: dict[str, str] = {
    "debug": "set DEBUG=true for debug logs",
    "info": "nothing to set: info is the default here",
    "warn": "nothing to set: this node logs at info (no quieter level)",
    "error": "nothing to set: this node logs at info (no quieter level)",
}


def legacy_warnings(extra: Mapping[str, str]) -> list[str]:
    """One line per key of the Go prscd that is set (non-blank) in ``extra``: what it did
    there and what to set here. Only YOMO_LOG_LEVEL's value is shown, and only when it is
    one of the Go levels (docs/coming-from-go.md)."""
    lines = []
    for env, (did, advice) in LEGACY.items():
        raw = extra.get(env)
        if raw is None or not raw.strip():
            continue
        shown = env
        if env == "YOMO_LOG_LEVEL":
            level = raw.strip().lower()
            level = "warn" if level == "warning" else level
            if level in _GO_LEVELS:
                shown, advice = f"{env}={level}", _GO_LEVELS[level]
            else:
                advice = "not a Go level (debug, info, warn, error); DEBUG=true gives debug logs"
        lines.append(f"legacy Go prscd key {shown} is ignored (there: {did}); {advice}. "
                     "See docs/coming-from-go.md")
    return lines


# How a key's text becomes a value. Each reader gets the key's non-blank text.

def _bad(key: Key, raw: str, why: str) -> ConfigError:
    # A secret is named, never shown.
    return ConfigError(f"{key.env}: {why}" if key.secret else f"{key.env}={raw!r}: {why}")


def _number(key: Key, raw: str, kind: type[int] | type[float]) -> Any:
    try:
        value = kind(raw.strip())
    except ValueError:
        raise _bad(key, raw.strip(), f"expected a {kind.__name__}") from None
    if value < 0:
        raise _bad(key, raw.strip(), "must not be negative")
    return value


def _positive(key: Key, raw: str) -> float:
    value = _number(key, raw, float)
    if value <= 0:
        raise ConfigError(f"{key.env}={value}: must be positive")
    return float(value)


def _ratio(key: Key, raw: str) -> float:
    value = _number(key, raw, float)
    if value > 1:
        raise ConfigError(f"{key.env}={value}: must be between 0 and 1")
    return float(value)


def _port(key: Key, raw: str) -> int:
    value = _number(key, raw, int)
    if value > 65535:
        raise ConfigError(f"{key.env}={value}: not a port number")
    return int(value)


def _bool(key: Key, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise _bad(key, raw, "expected true or false")


def _name(key: Key, raw: str) -> str:
    value = raw.strip()
    if not all(ch.isalnum() or ch in "-_" for ch in value):
        raise _bad(key, value, "use letters, digits, '-' and '_'")
    return value


def _choice(key: Key, raw: str) -> str:
    value = raw.strip().lower()
    if value not in key.choices:
        raise _bad(key, value, "expected " + " or ".join(key.choices))
    return value


def _url(key: Key, raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("http://", "https://")):
        raise _bad(key, value, "expected an http:// or https:// URL")
    return value


#: kind -> (reader, what docs/configuration.md calls it).
_KINDS: dict[str, tuple[Callable[[Key, str], Any], str]] = {
    "bool": (_bool, "true / false"),
    "int": (lambda key, raw: _number(key, raw, int), "integer >= 0"),
    "float": (lambda key, raw: _number(key, raw, float), "number >= 0"),
    "seconds": (lambda key, raw: _number(key, raw, float), "seconds >= 0"),
    "positive": (_positive, "seconds > 0"),
    "ratio": (_ratio, "0 to 1"),
    "port": (_port, "0-65535"),
    "text": (lambda key, raw: raw.strip(), "text"),
    "password": (lambda key, raw: raw, "text, kept as is"),  # spaces may be part of it
    "name": (_name, "letters, digits, `-`, `_`"),
    "path": (lambda key, raw: raw.strip(), "file path"),
    "dir": (lambda key, raw: Path(raw.strip()), "directory"),
    "url": (_url, "http(s) URL"),
    "keys": (lambda key, raw: parse_keys(raw, key.env), "`KEY:APP`, ..."),
    "choice": (_choice, ""),  # the choices themselves
}


def _read(key: Key, env: Mapping[str, str]) -> Any:
    raw = env.get(key.env)
    # Missing or blank means the default, except that a blank bool is false and a password
    # is taken as is (as they always were).
    if raw is None or (not raw.strip() and key.kind not in ("bool", "password")):
        if key.compute is not None:
            return key.compute(env)
        return dict(key.default) if isinstance(key.default, dict) else key.default
    return _KINDS[key.kind][0](key, raw)


def load(dotenv_path: str | os.PathLike[str] = ".env") -> Settings:
    """Read ``.env`` (if present) with the real environment taking precedence."""
    environ = dict(os.environ)
    merged: dict[str, str] = {
        k: v for k, v in dotenv_values(dotenv_path).items() if v is not None
    }
    merged.update(environ)
    return replace(Settings.from_env(merged), environ=environ)


# ---- .env.example and docs/configuration.md, generated from the table -----------------------

#: Per section, what does not fit the keys' one-line meanings (docs/configuration.md only).
NOTES: dict[str, str] = {
    "TLS": """\
With neither `CERT_FILE` nor `KEY_FILE` the node makes an ECDSA P-256 certificate for
`localhost`, `127.0.0.1`, `::1` (and `DOMAIN`), valid 14 days, cached in `CERT_CACHE_DIR` and
renewed when under two days remain; it logs its hash (`spki_sha256=...`). In production give
real files (e.g. from Let's Encrypt), or run with `TLS=false` behind a TLS-terminating proxy:
then only WebSocket runs, since HTTP/3 needs the node's own certificate. More:
[deployment.md](deployment.md).""",
    "auth": """\
With none of `PUBLIC_KEYS`, `PUBLIC_KEYS_FILE` and `AUTH_WEBHOOK_URL` set, any non-empty key
joins `DEFAULT_APP` (development). Once one is set, only listed or webhook-admitted keys
connect, each to its app, and apps never see each other. `kill -HUP PID` re-reads
`PUBLIC_KEYS_FILE`: new connections use the new keys, existing peers keep their app, and a
broken file keeps the old keys (only counts are logged).

The webhook gets `POST {"publickey": KEY, "id": ID}` (JSON) for every key not listed.
`200 {"app": "APP"}` admits; 401, 403, 404 or no `app` refuses (HTTP 403); a timeout or any
other answer refuses with 503 (fail closed, not cached). The URL may carry credentials
(`https://user:pass@host/path`, sent as Basic auth); it is never logged. More:
[SECURITY.md](../SECURITY.md).""",
    "tokens": """\
Any of the first three keys turns token auth on: a `publickey` that is a JWT is verified
(PyJWT) with the configured keys, whose type alone sets the algorithm (HS256 for the secret,
which must be at least 32 bytes; ES256 or RS256 for the PEM and JWKS keys). Its `sub` must be
the `id` (else 403), `exp` is required (expired: 401), `app` picks the app and `channels` the
channels it may join (a join outside them closes 4003). Keys that are not JWTs go the way of
the auth section; with token auth on and none of its keys set, they are refused (403), not
let into `DEFAULT_APP`. The JWKS is refetched on an unknown `kid` at most every 5 s; while it
is unreachable, unknown kids get 503. A token is checked only when a connection opens. More:
[tokens.md](tokens.md).""",
    "server API": """\
With `API_KEYS` set the node serves the server API on `API_PORT` (HTTPS with the node's
certificate, plain HTTP when `TLS=false`): channels, members with their state, a user's
presence, and publish into a channel, each mesh-wide. Every node answers the other nodes'
questions whether or not it has keys; a node that has not answered within
`API_QUERY_TIMEOUT` is listed under `nodes.missing`. Requests carry
`Authorization: Bearer KEY`; keys are never logged. More: [api.md](api.md).""",
    "webhooks": """\
With `WEBHOOK_URL` set, each node POSTs `{"events": [...]}` batches (100 events, or 1 s after
the first) of `member_joined` / `member_left` (an id's first / last connection in a channel
on that node) and `channel_occupied` / `channel_vacated` (mesh-wide, decided by asking the
other nodes), signed `X-Prscd-Signature: t=...,v1=<HMAC-SHA256 of t.body>`. 5xx, 408, 429,
timeouts and connection errors are retried with backoff until the node stops; other answers
refuse the batch (dropped, counted). Queueing never waits: past `WEBHOOK_QUEUE` events are
dropped and counted (`webhook_queue_full`). The URL may carry credentials; it is never
logged. More: [webhooks.md](webhooks.md).""",
    "limits": """\
Server pings carry 8 random bytes (a client cannot answer them blindly). A peer without a pong
for `PING_SILENT_TIMEOUT` is offline for the others after `PRESENCE_GRACE` but stays
connected until `PING_TIMEOUT` (a vanished peer: offline within `PING_INTERVAL` +
`PING_SILENT_TIMEOUT` + `PRESENCE_GRACE`, 4.5 s by default; docs/presence.md). The real client
answers every `peer_online` with its state, to the whole channel, so N peers joining at once
cost N^3/2 deliveries; with `DEDUPE_PEER_STATE` an unchanged `peer_state` goes only to the
members that lack it (about 2N^2), and everyone still lists everyone with the latest state.
Messages over `RATE_LIMIT` (after the `RATE_BURST`) are dropped and counted; a peer sending
more than twice the rate for a while is closed with 1008. Answers the server asks for
(`peer_state` after a `peer_online`, announce after a join ack) are not charged, per
channel; a join costs one token per channel it makes announce (SECURITY.md, the cost model).
A join over `MAX_CHANNELS_PER_PEER` or `MAX_PEERS_PER_CHANNEL` closes the connection with
4008 and the reason: the real client would otherwise wait for the ack forever, and it does
not retry codes >= 4000. A peer over `WRITE_BUFFER_LIMIT` is counted too.
`HANDSHAKE_TIMEOUT` applies to the TLS handshake, then to the WebSocket upgrade; a QUIC
connection that opens no WebTransport session in that time is closed.""",
    "WebTransport": """\
A killed browser sends nothing: a PING goes one `WT_PING_INTERVAL` after its last packet,
and `WT_SILENT_TIMEOUT` later without an answer it is offline for the others (after
`PRESENCE_GRACE`), its connection closed only at `WT_IDLE_TIMEOUT` (docs/presence.md); with
`WT_PING_INTERVAL=0` a live but quiet browser is cut after `WT_IDLE_TIMEOUT`.
`WT_STOP_CLOSE=connection` closes each QUIC connection (H3_NO_ERROR, "node stopping"):
`@yomo/presence` in Chromium reports a lost connection and reconnects 10 s later, to the
next healthy region. `capsule` sends a close capsule (1001) instead: the
cleanest goodbye for other clients, but the real client then never reconnects (the page must
be reloaded). More: [webtransport.md](webtransport.md).""",
    "operations": """\
On SIGTERM with `DRAIN_SECONDS` > 0 the node answers `/ready` with 503 and keeps serving its
peers, then closes them with 1001 (the client reconnects, landing on the next healthy
region); a second SIGTERM ends the drain early. Behind a load balancer use more than its
health-check interval times its unhealthy threshold (e.g. 30). With `--workers N` the
supervisor writes `PID_FILE` and worker n `PID_FILE.n`. More: [operations.md](operations.md).""",
    "mesh": """\
The node tries the `NATS_URL` servers in their listed order (put this region's first),
failing over to the next; once every one failed it waits `NATS_RECONNECT_WAIT`, doubling
(with jitter) up to `NATS_RECONNECT_MAX_WAIT`, forever. Use one kind of NATS credential:
user and password, token, NKey seed or `.creds` file. A node not heard from (heartbeat or
event) for `NODE_TIMEOUT` is dead, and its peers go offline on every other node: offline is
announced within about `NODE_TIMEOUT` + 0.25 s of a crash. `PUBLIC_URL` is what clients are
given, e.g. `https://eu-west.example.com:8443/v1`. More: [mesh.md](mesh.md).""",
    "tracing": """\
Jaeger ingests OTLP/HTTP natively, e.g. `http://jaeger:4318/v1/traces`; the legacy form
`http://HOST:14268/api/traces` is mapped to `http://HOST:4318/v1/traces` with one log line.
Keys not in these tables reach the tracing adapter: with `YOMO_TRACE_JAEGER_ENDPOINT` empty,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` sets the endpoint;
`OTEL_TRACES_SAMPLER` (default `parentbased_always_on`), `OTEL_TRACES_SAMPLER_ARG` and
`OTEL_SERVICE_NAME` are honoured. The OpenTelemetry SDK's own `OTEL_BSP_*` batch settings are
read by the SDK from the process environment only (not from `.env`). More:
[tracing.md](tracing.md).""",
}


def _env_text(key: Key) -> str:
    """The default as a ``.env`` line writes it (blank for a computed one)."""
    if key.compute is not None or isinstance(key.default, dict):
        return ""
    if isinstance(key.default, bool):
        return "true" if key.default else "false"
    if isinstance(key.default, float):
        return format(key.default, "g")
    return str(key.default)


def _sections() -> dict[str, list[Key]]:
    grouped: dict[str, list[Key]] = {}
    for key in TABLE:
        grouped.setdefault(key.section, []).append(key)
    return grouped


def env_example() -> str:
    lines = [
        "# prscd settings. Copy to .env (read from the working directory); the environment wins.",
        "# Every key is optional: with none, `prscd` runs one node on https://127.0.0.1:8443 with",
        "# an embedded bus and a generated dev certificate. Each value below is the default.",
        "# More: docs/configuration.md. Generated: python -m node.config --env-example",
    ]
    for section, keys in _sections().items():
        lines += ["", f"# --- {section} ".ljust(92, "-")]
        for key in keys:
            lines += [f"# {key.meaning}" + (" Secret: never logged." if key.secret else ""),
                      f"{key.env}={_env_text(key)}"]
    return "\n".join(lines) + "\n"


def markdown() -> str:
    out = [
        "# Configuration",
        "",
        "*Generated from the table in `node/config.py` (edit it there) by",
        "`python -m node.config --markdown > docs/configuration.md`.*",
        "",
        "prscd reads its settings once, at start-up, from `.env` in the working directory",
        "(`prscd --env-file PATH` names another file) and from the environment; the",
        "environment wins. Every key is optional. A malformed value stops start-up with exit",
        "code 2 and a message naming the key; a secret's value is never echoed, there or in",
        "the logs. Keys not in these tables are left to the adapters that want them (`OTEL_*`,",
        "see [tracing](#tracing)). [`.env.example`](../.env.example) lists every key with its",
        "default (`python -m node.config --env-example > .env.example`). Coming from the Go",
        "prscd: [coming-from-go.md](coming-from-go.md) (its keys get a warning at start-up).",
    ]
    for section, keys in _sections().items():
        out += ["", f"## {section}", "", "| key | default | type | meaning |",
                "|---|---|---|---|"]
        for key in keys:
            default = key.shown or (f"`{_env_text(key)}`" if _env_text(key) else "")
            kind = _KINDS[key.kind][1] or " or ".join(f"`{c}`" for c in key.choices)
            if key.secret:
                kind += ", secret"
            meaning = key.meaning.replace("|", "\\|")
            out.append(f"| `{key.env}` | {default} | {kind} | {meaning} |")
        if section in NOTES:
            out += ["", NOTES[section]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.config",
                                     description="Print a file generated from the settings table")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--env-example", action="store_true", help="print .env.example")
    what.add_argument("--markdown", action="store_true", help="print docs/configuration.md")
    args = parser.parse_args(argv)
    sys.stdout.write(env_example() if args.env_example else markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
