"""The Bus interface, and the embedded in-process bus (the single-node default).

The node only ever talks to a :class:`Bus`; the embedded bus and the NATS bus are
interchangeable. Subjects follow NATS rules (``.``-separated tokens, ``*`` matches
one token, ``>`` the rest) so what works on one node works on the mesh.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# The bus states /health reports; /ready is 503 unless the bus is "up".
EMBEDDED = "embedded"
CONNECTED = "connected"
CONNECTING = "connecting"
RECONNECTING = "reconnecting"
CLOSED = "closed"
UP_STATES = frozenset({EMBEDDED, CONNECTED})


@dataclass(frozen=True, slots=True)
class BusMessage:
    subject: str
    data: bytes
    headers: dict[str, str] | None = None
    #: Where an answer goes (request/reply, mesh/query.py); empty for a plain message.
    reply: str = ""


Handler = Callable[[BusMessage], Awaitable[None]]
StateListener = Callable[[str], None]


class Subscription(abc.ABC):
    @abc.abstractmethod
    async def unsubscribe(self) -> None: ...


class Bus(abc.ABC):
    """What the bridge needs from a message bus."""

    kind: str = "abstract"

    def __init__(self) -> None:
        self._state = CLOSED
        self._listeners: list[StateListener] = []

    @property
    def state(self) -> str:
        return self._state

    @property
    def up(self) -> bool:
        return self._state in UP_STATES

    def on_state(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            for listener in list(self._listeners):
                listener(state)

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def publish(self, subject: str, data: bytes,
                      headers: dict[str, str] | None = None, *, reply: str = "") -> None:
        """Send; ``reply`` names the subject an answer should go to (request/reply)."""

    @abc.abstractmethod
    async def subscribe(self, subject: str, handler: Handler) -> Subscription: ...

    @abc.abstractmethod
    def new_inbox(self) -> str:
        """A subject nobody else uses, for answers: subscribe ``<inbox>.*`` to get them."""

    def where(self) -> dict[str, Any]:
        """Which server the bus is on and whether that is home (/health, /metrics); empty
        for a bus without servers."""
        return {}

    @abc.abstractmethod
    async def close(self) -> None: ...


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


@dataclass(eq=False, slots=True)
class _EmbeddedSubscription(Subscription):
    bus: EmbeddedBus
    pattern: str
    handler: Handler
    active: bool = field(default=True)

    async def unsubscribe(self) -> None:
        self.active = False
        if self in self.bus._subs:
            self.bus._subs.remove(self)


class EmbeddedBus(Bus):
    """In-process delivery: publish awaits each matching handler, in order."""

    kind = "embedded"

    def __init__(self) -> None:
        super().__init__()
        self._subs: list[_EmbeddedSubscription] = []
        self.published = 0

    async def connect(self) -> None:
        self._set_state(EMBEDDED)

    async def publish(self, subject: str, data: bytes,
                      headers: dict[str, str] | None = None, *, reply: str = "") -> None:
        self.published += 1
        message = BusMessage(subject, data, headers, reply)
        for sub in list(self._subs):
            if sub.active and subject_matches(sub.pattern, subject):
                await sub.handler(message)

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        sub = _EmbeddedSubscription(self, subject, handler)
        self._subs.append(sub)
        return sub

    def new_inbox(self) -> str:
        return f"_INBOX.{secrets.token_hex(11)}"

    async def close(self) -> None:
        self._subs.clear()
        self._set_state(CLOSED)
