"""Signalling: the msgpack wire format of Presence.js v2 (no I/O).

Every frame (WebSocket binary message, WebTransport datagram, or one map of a
reliable stream) is exactly one msgpack map::

    {t: 'control'|'data', op?: 'channel_join'|'peer_online'|'peer_state'|'peer_offline',
     c: channel, p?: client id, pl?: bin}

plus the server-internal keys ``sid`` (the connection that sent it), ``app`` and
``mesh``, which travel between nodes and are never sent to a client.

Validation is strict because the real client is fragile: a frame that is not one
map, a ``pl`` that is not bin, or a ``pl`` that does not decode to a map silently
kills the reader of *every other* peer that receives it. So anything we forward
has been checked to be something the client can read.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Final
from urllib.parse import unquote

import msgpack

CONTROL: Final = "control"
DATA: Final = "data"

CHANNEL_JOIN: Final = "channel_join"
PEER_ONLINE: Final = "peer_online"
PEER_STATE: Final = "peer_state"
PEER_OFFLINE: Final = "peer_offline"

CONTROL_OPS: Final = frozenset({CHANNEL_JOIN, PEER_ONLINE, PEER_STATE, PEER_OFFLINE})
CLIENT_KEYS: Final = frozenset({"t", "op", "c", "p", "pl"})
INTERNAL_KEYS: Final = frozenset({"sid", "app", "mesh"})

#: Longest channel name accepted, in UTF-8 bytes. Channel names become bus
#: subject tokens and map keys; a bound keeps both cheap.
MAX_CHANNEL_BYTES: Final = 128
#: Longest client id accepted (the ``id`` query parameter), in UTF-8 bytes.
MAX_CLIENT_ID_BYTES: Final = 128
#: Deepest nesting accepted inside a payload (the JS decoder recurses).
MAX_PAYLOAD_DEPTH: Final = 32


#: Close codes: a WebSocket close frame's code, and the 32-bit code of a WebTransport
#: CLOSE_WEBTRANSPORT_SESSION capsule (one vocabulary on both transports). The real client
#: reconnects after 1001-3999 and 1006, never after 1000 or >= 4000 (docs/client.md).
CLOSE_GOING_AWAY: Final = 1001


class Fault(Enum):
    """Why the node closes a peer: the close code it sends and the drop counter.

    The one close-code table. The rules (decode, limits) and the transports (a text
    frame, a ping timeout, a write backlog) name a fault; the node closes the peer with
    its code on whichever transport it uses, and counts it under ``dropped.<counter>``.
    """

    TEXT_FRAME = (1003, "text_frame")  # binary frames only
    INVALID = (1007, "invalid")  # a message the rules refuse; the reason says which
    RATE_FLOOD = (1008, "rate_flood")  # over twice RATE_LIMIT for a while
    SLOW_READER = (1008, "slow_reader")  # more than WRITE_BUFFER_LIMIT bytes queued
    TOO_BIG = (1009, "too_big")  # a message over MAX_MESSAGE_SIZE
    PING_TIMEOUT = (1011, "ping_timeout")  # no pong within PING_TIMEOUT
    INTERNAL = (1011, "internal_error")  # a bug: the peer may reconnect
    OVERLOADED = (1013, "wt_backlog")  # sends on a stream faster than the node handles
    TOO_MANY_CHANNELS = (4008, "too_many_channels")  # >= 4000: the client does not retry
    CHANNEL_FULL = (4008, "channel_full")
    CHANNEL_FORBIDDEN = (4003, "channel_forbidden")  # a join outside the token's channels

    def __init__(self, code: int, counter: str) -> None:
        self.code = code
        self.counter = counter


class ProtocolError(ValueError):
    """A frame the server refuses; ``str(err)`` is the reason sent to the peer."""

    fault: Fault = Fault.INVALID


class MessageTooBig(ProtocolError):
    """A message larger than MAX_MESSAGE_SIZE (found while reading a stream)."""

    fault = Fault.TOO_BIG


@dataclass(frozen=True, slots=True)
class Signalling:
    """One decoded message. ``p``/``sid``/``app``/``mesh`` are set by the server."""

    t: str
    c: str
    op: str | None = None
    p: str | None = None
    pl: bytes | None = None
    sid: str | None = None
    app: str | None = None
    mesh: str | None = None


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} not allowed")


def _check_payload(value: Any, depth: int = 0) -> None:
    """Reject what @msgpack/msgpack cannot decode: keys other than str/int, deep nesting."""
    if depth > MAX_PAYLOAD_DEPTH:
        raise ProtocolError("payload nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise ProtocolError("payload map keys must be strings or integers")
            _check_payload(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_payload(item, depth + 1)


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, ext_hook=_reject_ext, use_list=True
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData:
        raise ProtocolError(f"{what}: more than one msgpack value") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # UnicodeDecodeError is a ValueError; say which part was broken.
        raise ProtocolError(f"{what}: not valid msgpack ({type(exc).__name__})") from None
    except RecursionError:
        raise ProtocolError(f"{what}: nested too deeply") from None


def decode_payload(pl: bytes) -> dict[Any, Any]:
    """Decode and check a ``pl`` that peers will decode as a map."""
    value = _unpack(pl, "pl")
    if not isinstance(value, dict):
        raise ProtocolError("pl must encode a msgpack map")
    _check_payload(value)
    return value


def decode(frame: bytes, *, max_channel_bytes: int = MAX_CHANNEL_BYTES) -> Signalling:
    """Decode one client frame, or raise :class:`ProtocolError` with a specific reason.

    Whatever the client put in ``p`` is discarded: the server sets it on forward.
    """
    obj = _unpack(frame, "frame")
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must be a msgpack map, got {type(obj).__name__}")
    for key in obj:
        if key in INTERNAL_KEYS:
            raise ProtocolError(f"key {key!r} is server-internal")
        if key not in CLIENT_KEYS:
            raise ProtocolError(f"unknown key {str(key)[:32]!r}")

    t = obj.get("t")
    if t not in (CONTROL, DATA):
        raise ProtocolError("t must be 'control' or 'data'")
    c = obj.get("c")
    if not isinstance(c, str) or not c:
        raise ProtocolError("c (channel) must be a non-empty string")
    if len(c.encode()) > max_channel_bytes:
        raise ProtocolError(f"channel name longer than {max_channel_bytes} bytes")
    p = obj.get("p")
    if p is not None and not isinstance(p, str):
        raise ProtocolError("p must be a string")
    pl = obj.get("pl")
    if pl is not None and not isinstance(pl, bytes):
        raise ProtocolError("pl must be msgpack bin")
    op = obj.get("op")

    if t == DATA:
        if op is not None:
            raise ProtocolError("data messages carry no op")
        if pl is None:
            raise ProtocolError("data message without pl")
        body = decode_payload(pl)
        if not isinstance(body.get("event"), str):
            raise ProtocolError("data pl must be a map with a string 'event'")
        return Signalling(t=DATA, c=c, pl=pl)

    if not isinstance(op, str) or op not in CONTROL_OPS:
        raise ProtocolError(f"unknown control op {str(op)[:32]!r}")
    if op in (CHANNEL_JOIN, PEER_STATE):
        if pl is None:
            if op == PEER_STATE:
                raise ProtocolError("peer_state without pl")
        else:
            decode_payload(pl)
    else:
        # peer_online / peer_offline carry nothing a peer reads; do not forward bytes.
        pl = None
    return Signalling(t=CONTROL, op=op, c=c, pl=pl)


def encode(sig: Signalling) -> bytes:
    """Encode for a client: only ``t op c p pl``, absent keys omitted."""
    out: dict[str, Any] = {"t": sig.t, "c": sig.c}
    if sig.op is not None:
        out["op"] = sig.op
    if sig.p is not None:
        out["p"] = sig.p
    if sig.pl is not None:
        out["pl"] = sig.pl
    return msgpack.packb(out, use_bin_type=True)


def encode_join_ack(channel: str, mesh_id: str) -> bytes:
    """The answer to ``channel_join``, sent to the joiner alone."""
    return msgpack.packb(
        {"t": CONTROL, "op": CHANNEL_JOIN, "c": channel, "mesh": mesh_id}, use_bin_type=True
    )


def encode_data(channel: str, event: str, data_json: str, p: str | None = None) -> bytes:
    """A ``data`` frame as the client's ``channel.subscribe(event)`` reads it."""
    pl = msgpack.packb({"event": event, "data": data_json}, use_bin_type=True)
    return encode(Signalling(t=DATA, c=channel, p=p, pl=pl))


def split_target(target: str) -> tuple[str, str]:
    """A request target (``/v1?publickey=..``) as (path, query). Not ``urlsplit``: that
    reads ``//host/v1`` as an authority and would take it for ``/v1``."""
    path, _, query = target.partition("?")
    return path, query


def parse_query(query: str) -> dict[str, str]:
    """The connection URL's query: percent-decoded, but '+' kept (the client does not
    encode ids, and ``peer_offline`` must match the id exactly); the first value wins."""
    params: dict[str, str] = {}
    for part in query.split("&"):
        key, _, value = part.partition("=")
        params.setdefault(unquote(key), unquote(value))
    return params


def check_client_id(raw: str) -> str:
    """Validate the (already percent-decoded) ``id`` query parameter."""
    if not raw:
        raise ProtocolError("missing id")
    if len(raw.encode()) > MAX_CLIENT_ID_BYTES:
        raise ProtocolError(f"id longer than {MAX_CLIENT_ID_BYTES} bytes")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in raw):
        raise ProtocolError("id contains control characters")
    return raw
