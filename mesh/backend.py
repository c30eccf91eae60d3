"""Backend data (tag 0x21): a service pushes an event into a channel, on every node.

    from mesh.backend import publish
    await publish("nats://127.0.0.1:4222", "default", "room", "alert", {"level": 2})

Every node with peers in the channel delivers it to all of them (no sender to exclude)
as a ``data`` message, which the real client hands to ``channel.subscribe("alert", fn)``
as ``fn(data, {id: "backend"})``: ``p`` is the *sender* name, ``"backend"`` unless you
pass another (``--sender`` on the command line). Pick one no real client uses as its id.

The same module holds the formatting of ``prscd observe``, which prints what crosses the
bus, one line per message.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

import msgpack

from mesh.bridge import (
    PREFIX,
    TAG_BACKEND,
    channel_subject,
    event_subject,
    pack,
    token,
    unpack,
)
from mesh.bus import Bus, BusMessage
from mesh.liveness import ROOT as SYS_ROOT
from node import protocol
from node.protocol import ProtocolError, Signalling

if TYPE_CHECKING:
    from node.config import Settings

DEFAULT_SENDER = "backend"
BACKEND_MESH = "backend"


def backend_signal(app: str, channel: str, event: str, data: Any, *,
                   sender: str = DEFAULT_SENDER, data_is_json: bool = False) -> Signalling:
    """Build (and check) the message; ``data`` is any JSON value, or JSON text."""
    if not app:
        raise ProtocolError("app must not be empty")
    if not channel or len(channel.encode()) > protocol.MAX_CHANNEL_BYTES:
        raise ProtocolError(f"channel must be 1..{protocol.MAX_CHANNEL_BYTES} UTF-8 bytes")
    if not event:
        raise ProtocolError("event must not be empty")
    protocol.check_client_id(sender)
    try:
        value = json.loads(data) if data_is_json else data
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"data is not JSON: {exc}") from None
    pl = msgpack.packb({"event": event, "data": text}, use_bin_type=True)
    return Signalling(t=protocol.DATA, c=channel, p=sender, pl=pl, app=app, mesh=BACKEND_MESH)


async def publish_on(bus: Bus, app: str, channel: str, event: str, data: Any, *,
                     sender: str = DEFAULT_SENDER, data_is_json: bool = False,
                     publisher_id: str | None = None) -> str:
    """Publish on an open bus (a node's own, or a NatsBus); returns the subject."""
    sig = backend_signal(app, channel, event, data, sender=sender, data_is_json=data_is_json)
    publisher = publisher_id or f"{BACKEND_MESH}-{secrets.token_hex(4)}"
    subject = event_subject(app, channel, TAG_BACKEND, BACKEND_MESH, publisher)
    await bus.publish(subject, pack(sig, publisher, TAG_BACKEND))
    return subject


async def publish(target: Bus | Settings | str, app: str, channel: str, event: str,
                  data: Any, *, sender: str = DEFAULT_SENDER, data_is_json: bool = False,
                  timeout: float = 5.0) -> str:
    """Publish once. ``target``: an open Bus, Settings with ``NATS_URL``, or a NATS URL."""
    if isinstance(target, Bus):
        return await publish_on(target, app, channel, event, data, sender=sender,
                                data_is_json=data_is_json)
    from mesh.nats import NatsBus
    from node.config import Settings

    settings = target if isinstance(target, Settings) else Settings(nats_url=target)
    if not settings.nats_url:
        raise ValueError("NATS_URL is not set: backend data travels over the NATS mesh")
    # Check the message before connecting.
    backend_signal(app, channel, event, data, sender=sender, data_is_json=data_is_json)
    bus = NatsBus(settings, receive=False, connect_wait=timeout)
    try:
        await bus.connect()
        if not bus.up:
            raise ConnectionError(f"NATS not reachable within {timeout:.0f}s")
        return await publish_on(bus, app, channel, event, data, sender=sender,
                                data_is_json=data_is_json)
    finally:
        await bus.close()


# -- observe -----------------------------------------------------------------------


def observe_subject(app: str | None, channel: str | None) -> str:
    if app and channel:
        return channel_subject(app, channel)
    if app:
        return f"{PREFIX}.{token(app)}.>"
    if channel:
        return f"{PREFIX}.*.{token(channel)}.>"
    return f"{PREFIX}.>"


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(message: BusMessage) -> str:
    """One line for a bus message: subject, mesh, node, op, channel, p, payload summary."""
    if message.subject.startswith(SYS_ROOT + "."):
        try:
            body = json.loads(message.data)
        except ValueError:
            return f"{message.subject} malformed bytes={len(message.data)}"
        op = "heartbeat" if body.get("state") == "alive" else str(body.get("state"))
        return (f"{message.subject} mesh={body.get('mesh')} node={body.get('node')} op={op} "
                f"peers={body.get('peers')} channels={body.get('channels')} "
                f"url={body.get('url') or '-'}")
    try:
        sig, node, tag = unpack(message.data)
    except ProtocolError as exc:
        return f"{message.subject} malformed ({exc}) bytes={len(message.data)}"
    op = sig.op or sig.t
    summary = "-"
    if sig.pl is not None:
        try:
            body = msgpack.unpackb(sig.pl, raw=False, strict_map_key=False)
            if sig.t == protocol.DATA and isinstance(body, dict):
                summary = f"event={body.get('event')} data={_short(body.get('data'))}"
            else:
                summary = _short(body)
        except Exception:
            summary = f"pl={len(sig.pl)}B"
    return (f"{message.subject} mesh={sig.mesh} node={node} op={op} tag=0x{tag:x} "
            f"app={sig.app} channel={sig.c!r} p={sig.p!r} {summary}")
