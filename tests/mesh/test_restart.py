"""A node restarted with the same MESH_ID while its clients come straight back: nobody
stale, nobody missing, new peers visible. Real @yomo/presence clients, real processes.

NODE_TIMEOUT is 8 s here so the clients are surely back (same id) before the old node is
declared dead: the dead node's peer_offline for an id that is back must not remove it."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.cluster import Cluster
from tests.faults.test_partition import presence_changes
from tests.mesh.conftest import PuppetFactory, cluster_ports
from tests.mesh.test_supercluster import client, marker

CH = "restart"


@pytest.fixture
def slow_timeout_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", cluster_ports(), node_env={"NODE_TIMEOUT": "8"})
    c.up()
    try:
        yield c
    finally:
        c.down()


async def test_restart_with_the_same_mesh_id_keeps_returning_clients_listed(
        slow_timeout_cluster: Any, make_puppet: PuppetFactory) -> None:
    cluster = slow_timeout_cluster
    alice = await client(make_puppet, cluster, "us-east", "alice", CH)
    carol = await client(make_puppet, cluster, "eu-west", "carol", CH)
    bob = await client(make_puppet, cluster, "ap-south", "bob", CH)
    await alice.wait_peers(CH, {"bob", "carol"})
    await carol.wait_peers(CH, {"alice", "bob"})
    old_id = cluster.node_health("ap-south")["node_id"]
    since = {p.name: p.mark() for p in (alice, carol)}
    t0 = time.monotonic()
    cluster.send_signal("node", "ap-south", signal.SIGKILL)
    bob.kill()  # its page is reloaded: a new client, the same id
    cluster.stop("node", "ap-south")  # reap
    cluster.start_node("ap-south")
    cluster.wait_nodes(regions=["ap-south"])
    assert cluster.node_health("ap-south")["node_id"] != old_id  # same MESH_ID, new node
    bob2 = await client(make_puppet, cluster, "ap-south", "bob", CH)
    dave = await client(make_puppet, cluster, "ap-south", "dave", CH)
    back = time.monotonic() - t0
    assert back < 8, f"clients came back after {back:.1f} s: the test needs them earlier"
    await bob2.wait_peers(CH, {"alice", "carol", "dave"}, timeout=10)
    for p in (alice, carol):
        others = {"alice", "carol"} - {p.name} | {"bob", "dave"}
        await p.wait_peers(CH, others, timeout=10)
    # The old node is declared dead (8 s after the kill): bob stays listed.
    await asyncio.sleep(max(0.0, 8 + 1.5 - (time.monotonic() - t0)))
    await marker(bob2, alice, CH)
    await marker(dave, carol, CH)
    for p in (alice, carol):
        others = {"alice", "carol"} - {p.name} | {"bob", "dave"}
        assert p.peer_ids(CH) == others, p.name
        # bob was listed throughout: the stale offline never removed him.
        assert "-" not in presence_changes(p, CH, "bob", since[p.name]), p.name
        assert {m["id"]: m.get("region") for m in p.peers(CH)}["bob"] == "ap-south"
    # And when bob really leaves, he goes, once.
    await bob2.leave(CH)
    for p in (alice, carol, dave):
        others = {"alice", "carol", "dave"} - {p.name}
        await p.wait_peers(CH, others, timeout=5)
