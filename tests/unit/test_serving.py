"""What a server does to its own process once started."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from imagegraph.runtime import GC_YOUNG_THRESHOLD, settle_for_serving


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_startup_objects_leave_the_collector_s_passes_and_young_ones_wait_longer() -> None:
    tracked_before = len(gc.get_objects())  # what importing and building made
    settle_for_serving()
    assert gc.get_freeze_count() >= tracked_before // 2
    assert len(gc.get_objects()) < tracked_before // 10
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
