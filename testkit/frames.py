"""The client's frames, as @yomo/presence builds them: msgpack maps, payloads msgpack too."""

from __future__ import annotations

from typing import Any

import msgpack


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def join_frame(channel: str, client_id: str, **state: Any) -> bytes:
    return pack({"t": "control", "op": "channel_join", "c": channel,
                 "pl": pack({"id": client_id, **state})})


def data_frame(channel: str, event: str, data: str) -> bytes:
    return pack({"t": "data", "c": channel, "pl": pack({"event": event, "data": data})})


def control(op: str, channel: str, pl: bytes | None = None) -> bytes:
    body: dict[str, Any] = {"t": "control", "op": op, "c": channel}
    if pl is not None:
        body["pl"] = pl
    return pack(body)
