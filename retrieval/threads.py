"""How many threads our CPU work runs on when other jobs share the machine, and how those threads wait.

A training run at 88 pairs/s on 2 cores fell to 9 pairs/s when another process took one core: each OpenMP
parallel region ends at a barrier, so a team of two threads runs at the pace of the one that shares its core,
while the other spins there (GNU OpenMP spins 300,000 rounds before it sleeps), taking the CPU the late one
needs. Two remedies, both here (scripts/bench_shared.py measures them, idle and with one core busy):
- `prepare_openmp`, before torch or FAISS loads its OpenMP runtime (it reads the environment once, as it loads):
  a 30x shorter spin, so a waiting thread soon sleeps and gives its core back;
- `ThreadFit`, during a job: every few seconds, the cores other processes used (Linux's /proc/stat less this
  process's own CPU time), and as many threads as cores they leave free (elsewhere it changes nothing);
  `FreeCores`, the same count for a search that splits one query's scan (index/scan.py), renewed as it asks.
RETRIEVAL_THREADS=off leaves OpenMP as it is (to measure what this gains), and a flat scan to FAISS's one thread
per query (index/scan.py); a number fixes the thread count.
No heavy imports: the CLI calls `prepare_openmp` before anything loads torch.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Collection, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError

SETTING = "RETRIEVAL_THREADS"  # "auto" (the default), "off", or a fixed thread count
SPIN_COUNT = "10000"  # GNU OpenMP's spin rounds before a waiting thread sleeps (default 300,000; 0 cost idle speed)
OPENMP_RUNTIMES = ("torch", "faiss")  # modules that load an OpenMP runtime, which reads the environment once
CHECK_EVERY_S = 3.0  # how often a job re-counts the free cores: other jobs come and go
SCAN_CHECK_EVERY_S = 1.0  # how often a split scan's count is renewed: a read of /proc/stat a second at most
FIRST_WINDOW_S = 0.25  # the shortest window the first count is made over
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat: user, nice, system, irq, softirq, steal (time the host took)


def setting(environ: MutableMapping[str, str] = os.environ) -> int | str:
    """RETRIEVAL_THREADS: "auto", "off", or a thread count; anything else is refused with what it takes."""
    value = environ.get(SETTING, "auto").strip().lower() or "auto"
    if value in ("auto", "off"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise RetrievalError(f"{SETTING}={value!r}: use auto (the default), off, or a number of threads such as 2")


def prepare_openmp(environ: MutableMapping[str, str] = os.environ, loaded: Collection[str] = sys.modules) -> bool:
    """Make OpenMP threads sleep soon when they wait, unless the user chose a wait policy or RETRIEVAL_THREADS=off.
    Only before torch or FAISS is imported: their runtime reads this once, as it loads. Returns whether it set it.

    GOMP_SPINCOUNT is GNU OpenMP's (torch's and FAISS's Linux wheels); OMP_WAIT_POLICY=PASSIVE would sleep at
    once, which costs a wake-up per parallel region when the machine is idle."""
    if setting(environ) == "off" or any(m in loaded for m in OPENMP_RUNTIMES):
        return False
    if any(k in environ for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")):
        return False  # the user's choice
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


@dataclass(frozen=True)
class CpuSample:
    """Counters read at one moment: CPU time all processes used on our cores, the time this process used."""

    busy_s: float
    own_s: float
    at_s: float  # time.monotonic()


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """Cores other processes kept busy between two samples (0 when no time passed)."""
    wall = after.at_s - before.at_s
    if wall <= 0:
        return 0.0
    others = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / wall)


def choose_threads(cores: int, busy_elsewhere: float) -> int:
    """One thread per core that other processes leave free, at least one. A core counts as taken once they use
    more than half of it: a thread that shares its core holds every barrier of the team up."""
    return max(1, min(cores, math.floor(cores - busy_elsewhere + 0.5)))


def our_cores() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def parse_proc_stat(text: str, cores: Collection[int], ticks_per_s: float) -> float:
    """Seconds of CPU time spent busy on `cores`, from the text of /proc/stat (its cpuN lines)."""
    busy = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            fields = rest.split()
            busy += sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields))
    return busy / ticks_per_s


def read_sample(cores: Collection[int]) -> CpuSample | None:
    """Now's counters; None where there is no /proc/stat (macOS, Windows): the thread count then stays as it is."""
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return None
    times = os.times()
    return CpuSample(
        parse_proc_stat(text, cores, os.sysconf("SC_CLK_TCK")), times.user + times.system, time.monotonic()
    )


def openmp_threads() -> int | None:
    """The thread count OpenMP runs with now (torch's and FAISS's runtimes, the lower); None before one loads."""
    from threadpoolctl import threadpool_info

    counts = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "openmp"]
    return min(counts) if counts else None


class ThreadFit:
    """A job's thread count kept at the free cores: `update()` between steps re-counts every CHECK_EVERY_S.

    Never above the count in force at the first update (torch.set_num_threads, OMP_NUM_THREADS: the caller's
    limit), so call that once torch is imported, from the thread that runs the work (OpenMP's limit is per
    thread). Leaving the `with` block restores the limits it found. RETRIEVAL_THREADS=off does nothing; a
    number sets that count."""

    def __init__(self, check_every_s: float = CHECK_EVERY_S) -> None:
        self.mode = setting()
        self.cores = our_cores()
        self.check_every_s = check_every_s
        self.threads: int | None = None  # what it last set; None before the first update
        self.history: list[tuple[float, int]] = []  # (cores busy elsewhere, threads chosen) at each change
        self._cap = len(self.cores)
        self._limits: list[Any] = []  # threadpoolctl's limiters, each able to restore what it changed
        self._last = read_sample(self.cores) if self.mode == "auto" else None

    def __enter__(self) -> ThreadFit:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._limits:
            self._limits.pop().restore_original_limits()

    def update(self) -> int | None:
        """Re-count if it is time (the first call waits until FIRST_WINDOW_S has passed); returns the count."""
        if isinstance(self.mode, int):
            if self.threads is None:
                self._set(self.mode)
            return self.threads
        if self._last is None:  # off, or no /proc/stat
            return self.threads
        first = self.threads is None
        wait = self._last.at_s + (FIRST_WINDOW_S if first else self.check_every_s) - time.monotonic()
        if wait > 0 and not first:
            return self.threads
        if first:
            time.sleep(max(0.0, wait))
            self._cap = min(self._cap, openmp_threads() or self._cap)
        now = read_sample(self.cores)
        if now is None:
            return self.threads
        busy, self._last = others_busy(self._last, now), now
        threads = min(self._cap, choose_threads(len(self.cores), busy))
        if threads != self.threads:
            self._set(threads)
            self.history.append((round(busy, 2), threads))
        return threads

    def _set(self, n: int) -> None:
        """n threads for every OpenMP and BLAS runtime loaded now (torch's, FAISS's, numpy's)."""
        from threadpoolctl import threadpool_limits

        self._limits.append(threadpool_limits(n))
        self.threads = n


class FreeCores:
    """The cores other processes leave free, for work that asks on every call and cannot wait for a window of its
    own (a split scan: a query takes milliseconds). A call re-counts over the time since the last count once
    `every_s` has passed, else answers the last count; until there are two samples, every core. Queries minutes
    apart count over those minutes: a long job beside them is counted, one that just started or ended is seen a
    query late."""

    def __init__(self, every_s: float = SCAN_CHECK_EVERY_S) -> None:
        self.cores, self.every_s = our_cores(), every_s
        self.free, self.readable = len(self.cores), True
        self._last: CpuSample | None = None

    def count(self) -> int:
        last = self._last  # read once: threads may count at once, and the last to store its sample wins
        if not self.readable or (last is not None and time.monotonic() - last.at_s < self.every_s):
            return self.free
        cores = our_cores()  # the process may have been moved to other cores since
        now = read_sample(cores)
        if now is None:  # no /proc/stat (macOS, Windows): every core, and no more reads
            self.readable = False
            return self.free
        if cores != self.cores:  # a window over other cores counts nothing: start anew
            self.cores, self.free, last = cores, len(cores), None
        if last is not None:
            self.free = choose_threads(len(cores), others_busy(last, now))
        self._last = now
        return self.free
