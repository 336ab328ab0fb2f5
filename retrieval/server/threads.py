"""The threads a request's work runs on: a pool of one thread per core, each single-threaded inside.

The work of a request (embedding, FAISS, SQLite, decoding) runs on this pool; the event loop only parses and
answers. A batch of searches (batcher.py) runs on one of these threads, single-threaded too: with two OpenMP
threads, a flat batch beside other jobs took QPS from 300 to 76 (100k, 32 clients; threads spin at barriers).
The threads share each `Index` with no lock of theirs: after `warm` it holds no lazy state but the searchers a
weight or `exact` makes on first use, which the store makes under its own lock; FAISS searches are read-only
(their parameters, which FAISS changes during a search, are made per call), and Python's sqlite3 is built
serialized here (threadsafety 3: threads may share a connection), which `request_pool` checks.
"""

from __future__ import annotations

import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_limits

from retrieval.errors import RetrievalError


def request_pool(threads: int | None = None) -> ThreadPoolExecutor:
    """`threads` (default: one per CPU core) requests do their work at once; the rest wait their turn.

    Idle pool threads cost nothing and exit with the process; an app's lifespan may run more than once (test
    clients start and stop it per use), so the pool is not tied to it."""
    if sqlite3.threadsafety != 3:
        raise RetrievalError(
            "this Python's sqlite3 is not built serialized (threadsafety 3); the server shares one "
            "connection between threads, so use a Python built with a threadsafe SQLite"
        )
    return ThreadPoolExecutor(pool_threads(threads), "request", initializer=single_threaded)


def pool_threads(threads: int | None = None) -> int:
    """The request pool's size: `threads`, or one per CPU core."""
    return threads or os.cpu_count() or 1


def single_threaded() -> None:
    """One core per request thread: concurrent requests are the parallelism. Left at two threads, OpenMP
    (FAISS) and OpenBLAS (the numpy text tower) made a text search 4x slower here while another process was
    busy (p50 8 ms -> 1.9 ms on 300 items). OpenMP's limit holds per thread, so each thread sets it."""
    threadpool_limits(1)
