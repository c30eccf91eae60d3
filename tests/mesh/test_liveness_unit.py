"""Liveness rules with a fake clock: who is declared dead, when, and when not."""

from __future__ import annotations

import json

import pytest

from mesh.bus import CONNECTED, RECONNECTING, BusMessage, EmbeddedBus
from mesh.liveness import Liveness, heartbeat_subject

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeBus(EmbeddedBus):
    def go(self, state: str) -> None:
        self._set_state(state)


def hb(node: str, state: str = "alive", mesh: str = "m") -> BusMessage:
    body = {"node": node, "mesh": mesh, "state": state, "peers": 1, "channels": 1}
    return BusMessage(heartbeat_subject(mesh, node), json.dumps(body).encode())


def make() -> tuple[Liveness, Clock, FakeBus, list[tuple[str, str]], list[str]]:
    clock, bus = Clock(), FakeBus()
    bus.go(CONNECTED)
    downs: list[tuple[str, str]] = []
    resyncs: list[str] = []
    lv = Liveness(bus, "me", "m", interval=1.0, timeout=3.0, clock=clock,
                  on_down=lambda n, why: downs.append((n, why)), on_resync=resyncs.append,
                  stats=lambda: {"peers": 0})
    return lv, clock, bus, downs, resyncs


async def tick(lv: Liveness, clock: Clock, seconds: float, *alive: str,
               echo: bool = True) -> None:
    """Advance time in 0.25 s steps; ``alive`` nodes (and we) heartbeat every second."""
    steps = int(seconds / 0.25)
    for _ in range(steps):
        clock.now += 0.25
        if abs(clock.now % 1.0) < 1e-9:
            if echo:
                await lv._receive(hb("me"))
            for node in alive:
                await lv._receive(hb(node))
        lv.check(clock.now)


async def test_a_silent_node_dies_after_the_timeout_and_only_then() -> None:
    lv, clock, _, downs, _ = make()
    await lv._receive(hb("me"))
    await lv._receive(hb("other"))
    lv.check(clock.now)  # our link is proven at t=0
    await tick(lv, clock, 2.75)
    assert downs == []
    await tick(lv, clock, 0.5)
    assert downs == [("other", "timeout")]
    await tick(lv, clock, 5)
    assert downs == [("other", "timeout")]  # once


async def test_events_keep_a_node_alive_and_goodbye_is_immediate() -> None:
    lv, clock, _, downs, _ = make()
    await lv._receive(hb("me"))
    await lv._receive(hb("other"))
    for _ in range(8):
        await tick(lv, clock, 1)
        lv.seen("other")  # traffic without heartbeats (a slow heartbeat path) still counts
    assert downs == []
    await lv._receive(hb("other", "bye"))
    assert downs == [("other", "bye")]
    lv.seen("other")  # a straggler does not bring it back
    assert "other" not in lv.nodes


async def test_our_own_outage_kills_nobody_and_vanished_nodes_die_after_recovery() -> None:
    lv, clock, bus, downs, resyncs = make()
    await lv._receive(hb("me"))
    for node in ("stays", "vanishes"):
        await lv._receive(hb(node))
    await tick(lv, clock, 2, "stays", "vanishes")
    bus.go(RECONNECTING)
    await tick(lv, clock, 10, echo=False)  # nothing comes in while our bus is down
    assert downs == [] and lv.link_ok is False
    bus.go(CONNECTED)
    await tick(lv, clock, 2, "stays")
    assert downs == []  # a fresh timeout for everybody after our link came back
    assert resyncs and "link back" in resyncs[0]  # others may have dropped our peers
    await tick(lv, clock, 2.5, "stays")
    assert downs == [("vanishes", "timeout")]
    assert set(lv.nodes) == {"stays"}


async def test_a_silent_link_while_the_bus_looks_up_kills_nobody() -> None:
    lv, clock, _, downs, _ = make()
    await lv._receive(hb("me"))
    await lv._receive(hb("other"))
    await tick(lv, clock, 8, echo=False)  # our own heartbeat stopped coming back
    assert downs == [] and not lv.link_ok
    await tick(lv, clock, 1, "other")
    assert lv.link_ok and downs == []


async def test_a_node_declared_dead_that_speaks_again_triggers_a_resync() -> None:
    lv, clock, _, downs, resyncs = make()
    await lv._receive(hb("me"))
    await lv._receive(hb("other"))
    await tick(lv, clock, 4)  # partition: only we heartbeat
    assert downs == [("other", "timeout")]
    assert resyncs == []
    await lv._receive(hb("other"))
    assert resyncs == ["node other back"]
    assert "other" in lv.nodes
