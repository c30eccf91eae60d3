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

import unicodedata
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
#: Most msgpack objects one ``pl`` may hold (the map itself, each key, value and array
#: item, at any depth). Decoding costs about one allocation per object and a frame of
#: MAX_MESSAGE_SIZE bytes could hold 65,536 of them (6 ms of CPU): the count is checked
#: while decoding (each container's declared length before its items are built, the
#: running total after each container), so a payload costs at most about twice this.
#: A presence state or a data event is a handful of objects (SECURITY.md, cost model).
MAX_PAYLOAD_ITEMS: Final = 1024
#: A frame's own map: the client keys plus the server-internal ones; more is refused on the
#: map's header, before any key is read.
MAX_FRAME_KEYS: Final = 8
#: Longest string read in a frame's head (a key, ``t``, ``op``, ``c``, ``p``) before the
#: frame is refused; only ``pl`` may be longer.
MAX_HEAD_STRING: Final = 512


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


class _Budget:
    """Counts the objects a payload decode has built; past the limit it stops the decode
    (msgpack calls the hooks after each container is built, so the work done is at most
    the limit plus one container, itself at most the limit long)."""

    __slots__ = ("left",)

    def __init__(self, items: int) -> None:
        self.left = items

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ProtocolError(f"pl holds more than {MAX_PAYLOAD_ITEMS} msgpack objects")

    def on_list(self, value: list[Any]) -> list[Any]:
        self.spend(len(value) + 1)
        return value

    def on_map(self, value: dict[Any, Any]) -> dict[Any, Any]:
        self.spend(2 * len(value) + 1)
        return value


def _unpack(data: bytes, what: str, **limits: Any) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, ext_hook=_reject_ext, use_list=True,
            **limits,
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData:
        raise ProtocolError(f"{what}: more than one msgpack value") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        if "exceeds max_" in str(exc):  # a declared length over a limit, seen on its header
            raise ProtocolError(f"{what}: {_limit_reason(str(exc))}") from None
        # UnicodeDecodeError is a ValueError; say which part was broken.
        raise ProtocolError(f"{what}: not valid msgpack ({type(exc).__name__})") from None
    except RecursionError:
        raise ProtocolError(f"{what}: nested too deeply") from None


def _limit_reason(message: str) -> str:
    """msgpack's "N exceeds max_array_len(M)" in words."""
    kind = message.partition("max_")[2].partition("_len")[0] or "value"
    return f"a msgpack {kind} longer than {message.partition('(')[2].rstrip(')')}"


def decode_payload(pl: bytes) -> dict[Any, Any]:
    """Decode and check a ``pl`` that peers will decode as a map, within
    MAX_PAYLOAD_ITEMS objects (refused as soon as the count is over)."""
    budget = _Budget(MAX_PAYLOAD_ITEMS)
    value = _unpack(pl, "pl", max_array_len=MAX_PAYLOAD_ITEMS, max_map_len=MAX_PAYLOAD_ITEMS,
                    list_hook=budget.on_list, object_hook=budget.on_map)
    if not isinstance(value, dict):
        raise ProtocolError("pl must encode a msgpack map")
    _check_payload(value)
    return value


#: msgpack header bytes of arrays and maps: a container where the head wants a scalar.
_ARRAYS: Final = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_CONTAINERS: Final = _ARRAYS | frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_NOT_A_SCALAR: Final = object()


def _head_value(unpacker: msgpack.Unpacker, frame: bytes) -> Any:
    """The next value of a frame's head; a container is skipped (walked in C, nothing
    built) and stands as a marker that fails every type check."""
    pos = unpacker.tell()
    if pos < len(frame) and frame[pos] in _CONTAINERS:
        unpacker.skip()
        return _NOT_A_SCALAR
    return unpacker.unpack()


def _read_head(frame: bytes) -> dict[Any, Any]:
    """A frame's top-level map with scalar values only, at a bounded cost: at most
    MAX_FRAME_KEYS keys, strings of at most MAX_HEAD_STRING bytes (``pl`` is copied, not
    decoded); what it holds is not looked at yet."""
    if frame and frame[0] in _ARRAYS:
        raise ProtocolError("frame must be a msgpack map, got list")
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, ext_hook=_reject_ext,
        max_buffer_size=max(len(frame), 1), max_str_len=MAX_HEAD_STRING,
        max_bin_len=len(frame), max_ext_len=len(frame), max_array_len=MAX_FRAME_KEYS,
        max_map_len=MAX_FRAME_KEYS)
    unpacker.feed(frame)
    what = "frame"
    try:
        try:
            size = unpacker.read_map_header()
        except (ValueError, msgpack.UnpackException):
            # Not a map: decoded within the head's limits, only to name what it is.
            value = _unpack(frame, "frame", max_str_len=MAX_HEAD_STRING, max_array_len=0,
                            max_map_len=0)
            raise ProtocolError(
                f"frame must be a msgpack map, got {type(value).__name__}") from None
        if size > MAX_FRAME_KEYS:  # (read_map_header does not apply max_map_len)
            raise ProtocolError(f"frame map has more than {MAX_FRAME_KEYS} keys")
        head: dict[Any, Any] = {}
        for _ in range(size):
            what = "frame"
            key = _head_value(unpacker, frame)
            if isinstance(key, str):
                what = key if key in CLIENT_KEYS else "frame"
            head_key = key if key is not _NOT_A_SCALAR else "<container>"
            try:
                hash(head_key)
            except TypeError:
                head_key = repr(head_key)
            head[head_key] = _head_value(unpacker, frame)
    except ProtocolError:
        raise
    except msgpack.OutOfData:
        raise ProtocolError("frame: not valid msgpack (truncated)") from None
    except UnicodeDecodeError:
        raise ProtocolError(f"{_part(what)} is not valid UTF-8") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        if "exceeds max_" in str(exc):
            raise ProtocolError(f"{_part(what)}: {_limit_reason(str(exc))}") from None
        raise ProtocolError(f"frame: not valid msgpack ({type(exc).__name__})") from None
    if unpacker.tell() != len(frame):
        raise ProtocolError("frame: more than one msgpack value")
    return head


def _part(key: str) -> str:
    return "c (channel)" if key == "c" else key


def decode(frame: bytes, *, max_channel_bytes: int = MAX_CHANNEL_BYTES) -> Signalling:
    """Decode one client frame, or raise :class:`ProtocolError` with a specific reason:
    :func:`decode_head` then :func:`check_payload`. The node runs the rate check and the
    joined-channel check between the two, so a frame it drops is never decoded in full.

    Whatever the client put in ``p`` is discarded: the server sets it on forward.
    """
    sig = decode_head(frame, max_channel_bytes=max_channel_bytes)
    check_payload(sig)
    return sig


def decode_head(frame: bytes, *, max_channel_bytes: int = MAX_CHANNEL_BYTES) -> Signalling:
    """Everything of a frame but its payload, at a bounded cost (:func:`_read_head`):
    ``t``, ``op`` and ``c`` checked; ``pl`` is the raw bin, not decoded yet."""
    obj = _read_head(frame)
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
    if bad := name_problem(c):
        raise ProtocolError(f"channel name {bad}")
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
        return Signalling(t=DATA, c=c, pl=pl)

    if not isinstance(op, str) or op not in CONTROL_OPS:
        raise ProtocolError(f"unknown control op {str(op)[:32]!r}")
    if op == PEER_STATE and pl is None:
        raise ProtocolError("peer_state without pl")
    if op in (PEER_ONLINE, PEER_OFFLINE):
        # peer_online / peer_offline carry nothing a peer reads; do not forward bytes.
        pl = None
    return Signalling(t=CONTROL, op=op, c=c, pl=pl)


def check_payload(sig: Signalling) -> None:
    """Decode and check the ``pl`` of a frame :func:`decode_head` accepted (what other
    peers' readers will decode), within MAX_PAYLOAD_ITEMS objects."""
    if sig.pl is None:
        return
    body = decode_payload(sig.pl)
    if sig.t == DATA and not isinstance(body.get("event"), str):
        raise ProtocolError("data pl must be a map with a string 'event'")


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
    encode ids, and ``peer_offline`` must match the id exactly); the first value wins.
    Bytes that are not UTF-8 stay as lone surrogates (not U+FFFD, which would make two
    different raw ids one): :func:`check_client_id` refuses them."""
    params: dict[str, str] = {}
    for part in query.split("&"):
        key, _, value = part.partition("=")
        params.setdefault(unquote(key, errors="surrogateescape"),
                          unquote(value, errors="surrogateescape"))
    return params


#: Characters that show nothing (or look like a space) though not Unicode "format"
#: characters: Hangul fillers, the braille blank, the Mongolian vowel separator.
_INVISIBLE: Final = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")
#: Unicode categories refused in names: control (Cc), format (Cf: the bidi overrides and
#: isolates, zero-width joiners, the BOM), surrogates (Cs: bytes that were not UTF-8),
#: private use (Co), unassigned (Cn), line and paragraph separators (Zl, Zp).
_REFUSED_CATEGORIES: Final = {"Cc": "control", "Cf": "format", "Cs": "", "Co": "private-use",
                              "Cn": "unassigned", "Zl": "line separator",
                              "Zp": "paragraph separator"}


def name_problem(name: str) -> str:
    """Why ``name`` (a client id, a channel, an app) cannot be shown as a name, or ``""``.

    Members are listed by id and channels by name in other people's pages: a name may not
    hold characters that hide or reorder what is shown (a right-to-left override can make
    one id look like another), nor bytes that are not UTF-8. Spaces (U+0020) and every
    visible character of every script are fine; other spaces (Zs) only when visible
    between other characters, so a name may not start or end with one."""
    for i, ch in enumerate(name):
        if ch.isascii() and ch.isprintable():
            continue
        category = unicodedata.category(ch)
        if category == "Cs":  # what parse_query kept of bytes that were not UTF-8
            return "is not valid UTF-8"
        kind = _REFUSED_CATEGORIES.get(category)
        if kind is None and ch in _INVISIBLE:
            kind = "invisible"
        if kind is not None:
            return f"contains {kind} characters (U+{ord(ch):04X})"
        if category == "Zs" and (i == 0 or i == len(name) - 1):
            return f"starts or ends with a space other than U+0020 (U+{ord(ch):04X})"
    return ""


def is_utf8(value: str) -> bool:
    """False for what :func:`parse_query` kept of bytes that were not UTF-8."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_client_id(raw: str) -> str:
    """Validate the (already percent-decoded) ``id`` query parameter."""
    if not raw:
        raise ProtocolError("missing id")
    if bad := name_problem(raw):
        raise ProtocolError(f"id {bad}")
    if len(raw.encode()) > MAX_CLIENT_ID_BYTES:
        raise ProtocolError(f"id longer than {MAX_CLIENT_ID_BYTES} bytes")
    return raw
