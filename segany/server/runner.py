"""Model work off the event loop: a thread pool with a bounded queue and a waiting limit."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ServerBusy(Exception):
    """The queue is full, or the request waited too long: answered with 503."""


class ModelRunner:
    """Runs blocking model calls in ``workers`` threads.

    At most ``workers + max_queue`` calls are admitted at a time; the next one raises
    :class:`ServerBusy` at once. An admitted call that has not started after ``timeout_s``
    (all workers busy) is dropped from the queue and raises :class:`ServerBusy` too. A call
    that has started runs to the end: the work a request may ask for is bounded by the
    server's limits, and a thread cannot be interrupted anyway.
    """

    def __init__(self, workers: int = 1, max_queue: int = 64, timeout_s: float = 60.0) -> None:
        self.workers = workers
        self.max_pending = workers + max_queue
        self.timeout_s = timeout_s
        self._pool: ThreadPoolExecutor | None = None  # started on first use, again after shutdown
        self._pending = 0
        self._lock = threading.Lock()
        self.rejected = self.timed_out = 0

    @property
    def pending(self) -> int:
        """Calls admitted and not finished (queued + running)."""
        return self._pending

    def stats(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "pending": self._pending,
            "max_pending": self.max_pending,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
        }

    def _release(self, _: Future[Any]) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """``fn(*args)`` in a worker thread, under ``torch.no_grad``."""
        with self._lock:
            if self._pending >= self.max_pending:
                self.rejected += 1
                raise ServerBusy(
                    f"server busy: {self._pending} requests are queued or running; retry later"
                )
            self._pending += 1
        try:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=self.workers, thread_name_prefix="segany-model"
                    )
                future = self._pool.submit(_no_grad, fn, *args)
        except RuntimeError as exc:  # the interpreter is shutting down
            with self._lock:
                self._pending -= 1
            raise ServerBusy("server is shutting down") from exc
        future.add_done_callback(self._release)
        limit = self.timeout_s if timeout_s is None else timeout_s
        result = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(result), limit)
        except asyncio.TimeoutError:
            if not future.cancel():  # already running: let it finish
                return await result
            with self._lock:
                self.timed_out += 1
            raise ServerBusy(
                f"server busy: the request waited more than {limit:g} s for the model; "
                "retry later"
            ) from None

    def shutdown(self) -> None:
        """Stops the worker threads (queued calls are cancelled); a later call starts new ones,
        so an app can be started again (tests, servers that restart the app)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _no_grad(fn: Callable[..., T], *args: Any) -> T:
    with torch.no_grad():  # grad mode is per thread
        return fn(*args)
