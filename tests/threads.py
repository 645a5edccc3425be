"""Calls started together on threads, for races (the broker's row locks, concurrent admins)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def at_once(calls: list[Callable[[], object]], timeout: float = 30) -> list[object]:
    """Run ``calls`` in threads released together by a barrier; each one's result or exception
    (BaseException too). A call still running after ``timeout`` seconds fails the test."""
    go = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        go.wait()
        try:
            results[i] = calls[i]()
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a call never returned (a lock cycle?)"
    return results
