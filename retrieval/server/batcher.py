"""Concurrent requests that ask the same thing share one call: one FAISS scan answers a batch of searches.

A flat index answers a query by reading all its vectors (100 MB at 100k items), so 32 clients each scanning
alone held a server at 126 QPS (issue 16); one call for a batch reads them once. A request joins the group
waiting with its key (the generation it answers from and every parameter of the call, so only requests that
one call can answer share it). At most `slots` calls run at once, each on a thread of the request pool; a call
takes the oldest group, up to `max_batch` of its requests, once the group is full or its first request has
waited `wait_s`. So the requests that arrive while a call runs, and those that come a moment later, share the
next call, and a request waits at most `wait_s` beyond the calls ahead of it (on an idle server, `wait_s`).
Slots that wait for the same group split it: 32 requests that arrive together while both cores are free are two
calls of 16 side by side, not one of 32 on one core (100k flat, 32 clients, GET /api/search on its lean route:
1,197-1,222 QPS without the split, 1,375-1,522 with it, in 15 s runs here).

`answer(key, queries)` gives each query its answer or the exception that is its answer, so one request's error
fails only that request; an exception raised by `answer` itself is every request's answer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from typing import Generic, TypeVar

MAX_BATCH = 64  # requests in one call at most: a flat scan costs little more for 64 queries than for 16
# The server runs a call on each request thread (a core each, single-threaded inside: server/threads.py). A flat
# batch on one core is bound by reading the vectors (100k x 256: 21 ms for 8 queries, 26 for 17), so one call at
# a time left the other core idle: 100k flat, 32 clients, one at a time 440 QPS (p99 87 ms), two 677 (p99 74 ms).
WAIT_S = 0.002  # a call starts at most this long after the first request it answers arrived, or when it is full

K = TypeVar("K", bound=Hashable)
Q = TypeVar("Q")
R = TypeVar("R")


class Batcher(Generic[K, Q, R]):
    """Answers `await batcher(key, query)` with `answer(key, [query, ...])` for the requests waiting together.

    Thread-safe and bound to no event loop: the groups are shared under a lock and answered through
    `concurrent.futures`, so requests from any loop or thread (a test client runs one loop per request) batch
    correctly; those on one loop, as under uvicorn, share calls."""

    def __init__(
        self,
        answer: Callable[[K, list[Q]], list[R | Exception]],
        pool: Executor,
        slots: int,
        max_batch: int = MAX_BATCH,
        wait_s: float = WAIT_S,
    ):
        self.answer, self.pool, self.slots, self.max_batch, self.wait_s = answer, pool, slots, max_batch, wait_s
        self._lock = threading.Condition()  # notified as a request joins a group: a full one need not wait
        self._waiting: dict[K, list[tuple[Q, Future[R], float]]] = {}  # in order of each group's oldest request
        self._running = 0  # batches taken or queued on the pool, at most `slots`
        self._idle = 0  # slots waiting for a group to be ready: they split it

    async def __call__(self, key: K, query: Q) -> R:
        answered: Future[R] = Future()
        with self._lock:
            self._waiting.setdefault(key, []).append((query, answered, time.monotonic()))
            self._lock.notify()
            start = self._running < self.slots
            if start:
                self._running += 1
        if start:
            self.pool.submit(self._run_one)
        return await asyncio.wrap_future(answered)

    def _run_one(self) -> None:
        """On a pool thread: answer this slot's share of the oldest group (its requests split between the slots
        waiting for it, `max_batch` at most) once the group is full or its first request has waited `wait_s`, then
        queue the next batch behind the other work queued on the pool meanwhile (a thumbnail, an upload's decode);
        with no request waiting, free the slot."""
        with self._lock:
            self._idle += 1
            try:
                while True:
                    if not self._waiting:
                        self._running -= 1
                        return
                    key, group = next(iter(self._waiting.items()))
                    wait = 0.0 if len(group) >= self.max_batch else group[0][2] + self.wait_s - time.monotonic()
                    if wait <= 0:
                        break
                    self._lock.wait(wait)
                batch = self._take(key, -(-len(group) // self._idle))  # its share: the idle slots split the group
                self._lock.notify()  # an idle slot takes the rest now
            finally:
                self._idle -= 1
        try:
            self._answer(key, batch)
        finally:
            self.pool.submit(self._run_one)

    def _take(self, key: K, share: int) -> list[tuple[Q, Future[R]]]:
        """A group's first `share` requests, `max_batch` at most (under the lock). The rest keep their place and are
        ready now, as their group was (full, or its first request waited `wait_s`): an idle slot takes them at once."""
        group, n = self._waiting[key], min(share, self.max_batch)
        batch, rest = group[:n], group[n:]
        if rest:
            query, answered, _ = rest[0]
            rest[0] = (query, answered, time.monotonic() - self.wait_s)  # as if it had waited its wait out
            self._waiting[key] = rest
        else:
            del self._waiting[key]
        return [(query, answered) for query, answered, _ in batch]

    def _answer(self, key: K, batch: list[tuple[Q, Future[R]]]) -> None:
        live = [(q, f) for q, f in batch if f.set_running_or_notify_cancel()]  # a cancelled request is skipped
        if not live:
            return
        try:
            answers = self.answer(key, [q for q, _ in live])
        except Exception as e:  # not one request's fault: every request's answer
            answers = [e] * len(live)
        for (_, answered), a in zip(live, answers, strict=True):
            if isinstance(a, Exception):
                answered.set_exception(a)
            else:
                answered.set_result(a)
