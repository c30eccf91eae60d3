"""The grace window: something gone is held a while; back within it, it never went.

Used by presence's grace period (node/server.py: a vanished peer held in its channels for
PRESENCE_GRACE, docs/presence.md) and by the membership webhooks (node/webhooks.py,
node/occupancy.py: a member's ``member_left``, a channel's local vacancy). One small
piece on purpose, with no I/O but the event loop's timer.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Grace(Generic[K, V]):
    """Something gone is held for ``seconds`` before ``release(key, value)``; coming back
    within them (:meth:`cancel`) means it never went. A vanished peer, a member's
    ``member_left`` and a channel's local vacancy all go through here.

    The period is the same for everything, so release order is hold order: one dict in
    insertion order and one timer, O(1) per hold and per cancel."""

    def __init__(self, seconds: float, release: Callable[[K, V], None]) -> None:
        self.seconds = seconds
        self._release = release
        self._held: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def hold(self, key: K, value: V) -> None:
        if self.seconds <= 0:
            self._release(key, value)
            return
        loop = asyncio.get_running_loop()
        self._held.pop(key, None)
        self._held[key] = (loop.time() + self.seconds, value)
        if self._timer is None:
            self._timer = loop.call_at(loop.time() + self.seconds, self._due)

    def cancel(self, key: K) -> bool:
        """``key`` is back: True if it was held (then nothing is released for it)."""
        return self._held.pop(key, None) is not None

    def flush(self) -> None:
        """Release everything held now (the node stops: nobody comes back to it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._held:
            key, (_, value) = self._held.popitem(last=False)
            self._release(key, value)

    def _due(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._held:
            key, (deadline, value) = next(iter(self._held.items()))
            if deadline > now:
                self._timer = loop.call_at(deadline, self._due)
                return
            del self._held[key]
            self._release(key, value)
