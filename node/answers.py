"""The server API's answers, as pure functions: what one node answers, how the answers of
many nodes merge, and member states (msgpack) as JSON.

Each node answers for its own local peers only (node/presence.py: ``channels``,
``members``, ``user``), so nothing is counted twice; the asking node merges what arrived
by the deadline (mesh/query.py). Every answer says whether the app has a channel on that
node (``app``) and the node's ``mesh_id``. A member connected to two nodes appears once per
node, with that node's ``mesh_id`` and ``node`` (docs/api.md explains why).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from mesh.query import Gathered, MeshQuery
    from node.presence import Presence

CHANNELS = "channels"
MEMBERS = "members"
USER = "user"
COUNT = "count"


# -- msgpack -> JSON ---------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """A decoded msgpack value as JSON: bytes as base64, a timestamp (ext -1) as ISO-8601
    UTC, another extension as ``{"ext": code, "base64": data}``, map keys as strings,
    NaN and infinities (which JSON lacks) as null."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {_key(k): to_json(v) for k, v in value.items()}
    if isinstance(value, msgpack.Timestamp):
        return _timestamp(value)
    if isinstance(value, msgpack.ExtType | _Ext):  # ExtType is a namedtuple: before tuples
        return {"ext": value.code, "base64": base64.b64encode(value.data).decode("ascii")}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return str(value)  # not produced by msgpack; never fails a whole answer


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return base64.b64encode(key).decode("ascii")
    if key is None or isinstance(key, bool):
        return "null" if key is None else str(key).lower()
    return str(key)


def _timestamp(ts: msgpack.Timestamp) -> Any:
    try:
        when = dt.datetime.fromtimestamp(ts.seconds, dt.UTC)
    except (OverflowError, ValueError, OSError):  # outside years 1..9999
        return {"seconds": ts.seconds, "nanoseconds": ts.nanoseconds}
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if ts.nanoseconds:
        text += f".{ts.nanoseconds:09d}".rstrip("0")
    return text + "Z"


class _Ext:
    """An extension type as decoded here: not a tuple, so json.dumps asks ``_default``."""

    __slots__ = ("code", "data")

    def __init__(self, code: int, data: bytes) -> None:
        self.code, self.data = code, data


def _default(value: Any) -> Any:
    if isinstance(value, bytes | msgpack.Timestamp | _Ext):
        return to_json(value)
    raise TypeError(type(value).__name__)


def _decode_state(pl: bytes) -> Any:
    try:
        return msgpack.unpackb(pl, raw=False, strict_map_key=False, ext_hook=_Ext)
    except Exception:  # protocol.decode checked it; never fail the answer over one state
        return {"base64": base64.b64encode(pl).decode("ascii")}


def state_json(pl: bytes | None) -> Any:
    """A member's state (the ``pl`` of its join or ``peer_state``) as JSON; None = none."""
    return None if pl is None else to_json(_decode_state(pl))


_ENCODER = json.JSONEncoder(default=_default, allow_nan=False, separators=(",", ":"))


def member_text(client_id: str, pl: bytes | None, mesh_id: str, node: str,
                connections: int) -> str:
    """One entry of the members answer as JSON text, made by the C encoder in the common
    case (a 1,000-member answer is mostly this): only NaN, infinities or binary map keys in
    the state take the slower ``to_json``."""
    entry = {"id": client_id, "state": None if pl is None else _decode_state(pl),
             "mesh_id": mesh_id, "node": node, "connections": connections}
    try:
        return _ENCODER.encode(entry)
    except (TypeError, ValueError):
        entry["state"] = to_json(entry["state"])
        return json.dumps(entry, separators=(",", ":"))


# -- what one node answers (the handlers mesh/query.py calls) ----------------------------


def register(query: MeshQuery, presence: Presence, mesh_id: str) -> None:
    """Answer the server API's questions from this node's presence state."""

    def app_of(body: dict[str, Any]) -> str:
        return str(body["app"])

    def channels(body: dict[str, Any]) -> dict[str, Any]:
        app = app_of(body)
        return {"mesh_id": mesh_id, "app": app in presence.realms,
                "channels": presence.channels(app)}

    def members(body: dict[str, Any]) -> dict[str, Any]:
        # The ids, and each entry as JSON text: the asking node splices the texts into its
        # answer instead of decoding and encoding every member again (see merge_members).
        app, node = app_of(body), query.node_id
        listed = presence.members(app, str(body["channel"]))
        return {"mesh_id": mesh_id, "app": app in presence.realms,
                "ids": [m["id"] for m in listed],
                "members": [member_text(m["id"], m["state"], mesh_id, node, m["connections"])
                            for m in listed]}

    def user(body: dict[str, Any]) -> dict[str, Any]:
        app = app_of(body)
        return {"mesh_id": mesh_id, "app": app in presence.realms,
                **presence.user(app, str(body["id"]))}

    def count(body: dict[str, Any]) -> dict[str, Any]:
        app = app_of(body)
        realm = presence.realms.get(app)
        channel = realm.channels.get(str(body["channel"])) if realm else None
        n = len({p.client_id for p in channel.peers.values()}) if channel else 0
        return {"mesh_id": mesh_id, "app": realm is not None, "members": n}

    query.handle(CHANNELS, channels)
    query.handle(MEMBERS, members)
    query.handle(USER, user)
    query.handle(COUNT, count)


# -- merging what the nodes answered -----------------------------------------------------


def usable(g: Gathered) -> Iterator[tuple[str, dict[str, Any]]]:
    """(node, answer) of the nodes whose answer is not an error, this node first."""
    for node in g.answered:
        answer = g.answers[node]
        if "error" not in answer:
            yield node, answer


def nodes_view(g: Gathered) -> dict[str, list[str]]:
    """``answered``: the nodes merged; ``missing``: live nodes that did not answer in time,
    or answered with an error (the node logs why)."""
    good = [node for node, _ in usable(g)]
    failed = [node for node in g.answered if node not in set(good)]
    return {"answered": good, "missing": sorted({*g.missing, *failed})}


def app_known(g: Gathered) -> bool:
    return any(answer.get("app") for _, answer in usable(g))


def merge_channels(g: Gathered) -> list[dict[str, Any]]:
    """One entry per channel name; ``members`` summed over nodes (per node, distinct ids)."""
    totals: dict[str, int] = {}
    for _, answer in usable(g):
        for ch in answer.get("channels", []):
            totals[ch["name"]] = totals.get(ch["name"], 0) + int(ch["members"])
    return [{"name": name, "members": n} for name, n in sorted(totals.items())]


def merge_members(g: Gathered) -> list[str]:
    """One entry per (id, node) as JSON text, with the node's ``mesh_id``, sorted by id.

    The states arrive as JSON text and are spliced in as they are: the nodes of a mesh are
    trusted (they share its NATS credentials, as for every event they relay); a malformed
    answer fails the request (500, logged), it is not passed on."""
    keys: list[str] = []
    texts: list[str] = []
    for node, answer in usable(g):
        ids, entries = answer.get("ids", []), answer.get("members", [])
        if len(ids) != len(entries) or not all(isinstance(x, str) for x in (*ids, *entries)):
            raise ValueError(f"malformed members answer from {node}")
        # Sort keys as strings, not tuples: a query makes thousands, and strings are not
        # tracked by the cyclic GC (whose full collections were the long tail of the
        # bench). Ids hold no control characters (protocol.check_client_id).
        suffix = f"\0{answer.get('mesh_id', '')}\0{node}"
        keys += [client_id + suffix for client_id in ids]
        texts += entries
    return [texts[i] for i in sorted(range(len(keys)), key=keys.__getitem__)]


def merge_user(g: Gathered, client_id: str) -> dict[str, Any]:
    channels: set[str] = set()
    mesh_ids: set[str] = set()
    connections = 0
    for _, answer in usable(g):
        n = int(answer.get("connections", 0))
        if n:
            connections += n
            mesh_ids.add(str(answer.get("mesh_id", "")))
        channels.update(answer.get("channels", []))
    return {"id": client_id, "online": connections > 0, "connections": connections,
            "channels": sorted(channels), "mesh_ids": sorted(mesh_ids)}


def total_members(g: Gathered) -> tuple[int, int]:
    """(members summed over nodes, nodes with members) of a ``count`` ask."""
    counts = [int(answer.get("members", 0)) for _, answer in usable(g)]
    return sum(counts), sum(1 for n in counts if n)
