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


def cluster_ports() -> Any:
    """Free ports for infra.cluster: one block of 12 (3 regions x 4 kinds)."""
    from infra.cluster import Ports
    from tests.mesh_helpers import free_port_block

    base = free_port_block(12)
    return Ports(nats=base, http=base + 3, gateway=base + 6, node=base + 9)


def gateway_cluster(tmp_path_factory: pytest.TempPathFactory, name: str,
                    node_env: dict[str, str]) -> Iterator[Any]:
    """For a module fixture: three nats-servers, one per region, joined by gateways
    (infra/cluster.py's topology, NATS only); nodes are up to each test."""
    from infra.cluster import REGIONS, Cluster

    c = Cluster(tmp_path_factory.mktemp(name), cluster_ports(), node_env=node_env)
    try:
        for r in REGIONS:
            c.start_nats(r)
        c.wait_nats()
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The three-region topology of `python -m infra.cluster up`, on free ports."""
    from infra.cluster import Cluster

    c = Cluster(tmp_path_factory.mktemp("cluster"), cluster_ports())
    c.up()
    try:
        yield c
    finally:
        c.down()
