"""node/memory.py: the periodic malloc_trim is a task only when asked for, trims on time
and stops cleanly."""

from __future__ import annotations

import pytest

from node.config import Settings
from node.memory import HeapTrim, malloc_trim
from tests.mesh_helpers import wait_until

pytestmark = pytest.mark.unit


async def test_off_means_no_task_and_no_library() -> None:
    trim = HeapTrim(0)
    trim.start()
    assert trim.trim is None and trim._task is None
    await trim.stop()


@pytest.mark.skipif(malloc_trim() is None, reason="not glibc")
async def test_trims_every_interval_until_stopped() -> None:
    trim = HeapTrim(0.01)
    trim.start()
    await wait_until(lambda: trim.trims >= 3, what="three trims")
    task = trim._task
    await trim.stop()
    assert task is not None and task.cancelled() and trim._task is None
    assert 0 <= trim.last_ms <= trim.max_ms


def test_the_setting() -> None:
    assert Settings.from_env({}).malloc_trim_interval == 30.0
    assert Settings.from_env({"MALLOC_TRIM_INTERVAL": "0"}).malloc_trim_interval == 0.0
