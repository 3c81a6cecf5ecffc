"""Background threads for the compress loop: read ahead, write behind, with bounded queues.

An exception in either thread is re-raised in the caller at its next call, never lost.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def prefetch(it: Iterable, depth: int = 2) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead; exceptions re-raise in the consumer."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in it:
                if not put(x):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the consumer)
            put(_Failure(exc))

    t = threading.Thread(target=run, name="tokensel-read", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Failure):
                raise x.exc
            yield x
    finally:
        stop.set()
        t.join(timeout=5)


class BackgroundWriter:
    """Runs `fn(item)` for queued items in one background thread, in order; bounded queue."""

    def __init__(self, fn: Callable, depth: int = 2, enabled: bool = True):
        self.fn = fn
        self.enabled = enabled
        self.error: BaseException | None = None
        if enabled:
            self.q: queue.Queue = queue.Queue(depth)
            self.t = threading.Thread(target=self._run, name="tokensel-write", daemon=True)
            self.t.start()

    def _run(self) -> None:
        while True:
            x = self.q.get()
            if x is _DONE:
                return
            if self.error is None:
                try:
                    self.fn(x)
                except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
                    self.error = exc

    def submit(self, x) -> None:
        if not self.enabled:
            self.fn(x)
            return
        if self.error is not None:
            raise self.error
        self.q.put(x)

    def close(self, raise_error: bool = True) -> None:
        if self.enabled and self.t.is_alive():
            self.q.put(_DONE)
            self.t.join()
        if raise_error and self.error is not None:
            raise self.error
