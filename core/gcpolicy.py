"""The garbage collector's settings for a long-running hub process.

CPython's cyclic collector walks every container object it tracks in a full
collection. After start a hub holds about 130,000 of them that live as long as the
process (modules, the classifier's model, the workflows, pydantic and scikit-learn
internals); a full collection walking them measured 100-250 ms on a busy 2-core
machine, during which the event loop stood still: every turn in flight waited, which
is a turn's worst tail latency. :func:`settle_after_start` moves them out of the
collector's reach (``gc.freeze``) once the process has started, and collects the
young generation less often (a turn allocates a few thousand short-lived objects,
nearly all freed by reference counting when the turn ends).

Objects made after the start are collected as usual, so cycles made while serving
are still freed. Call it once, on the main thread, after the start; it is not for
processes that keep starting and stopping hubs (tests), whose garbage from earlier
hubs it would keep.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle_after_start"]

YOUNG_THRESHOLD = 10_000  # CPython's default is 700 net allocations


def settle_after_start() -> None:
    """Collect what the start left, then freeze the survivors and raise the young
    generation's threshold (the older generations' stay as they were)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
