"""Run one worker in several threads at once and collect what they raised: the thread
safety checks of the dispatcher, the plans and the shared state."""

from __future__ import annotations

import threading


def errors_in_threads(worker, count: int) -> list[tuple[int, str]]:
    """Run ``worker(k)`` for k < count, each in its own thread, all released together by a
    barrier; ``(k, repr(exception))`` for each that raised."""
    errors: list[tuple[int, str]] = []
    start = threading.Barrier(count)

    def guarded(k):
        try:
            start.wait()
            worker(k)
        except Exception as exc:  # pragma: no cover - reported by the caller's assert
            errors.append((k, repr(exc)))

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
