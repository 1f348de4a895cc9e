"""After its start a hub process keeps its long-lived objects out of the garbage
collector's full collections and collects the young generation less often."""

from __future__ import annotations

import gc

from commhub.core.gcpolicy import YOUNG_THRESHOLD, settle_after_start


def test_settling_freezes_what_the_start_made_and_keeps_collecting_new_garbage() -> None:
    before = gc.get_threshold()
    made_at_start = [{"model": list(range(10))} for _ in range(1000)]
    try:
        settle_after_start()
        assert gc.get_freeze_count() >= len(made_at_start)
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])

        class Node:
            other: object = None

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made while serving is still collected
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
