"""Mesh fixtures: real nats-server processes (always stopped), real clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.puppet import Puppet, puppets
from tests.mesh_helpers import NatsServer

NatsFactory = Callable[..., NatsServer]


@pytest.fixture
def nats_factory(tmp_path: Path) -> Iterator[NatsFactory]:
    """``nats_factory(name="a", args=[...])`` starts a nats-server on free ports."""
    started: list[NatsServer] = []

    def start(name: str = "nats", **kw: Any) -> NatsServer:
        server = NatsServer(tmp_path, name, **kw)
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.kill()


@pytest.fixture
def nats_server(nats_factory: NatsFactory) -> NatsServer:
    return nats_factory("nats")


@pytest.fixture
async def make_puppet() -> AsyncIterator[Callable[..., Any]]:
    async with puppets() as make:
        yield make


PuppetFactory = Callable[..., Any]
__all__ = ["NatsFactory", "Puppet", "PuppetFactory"]
