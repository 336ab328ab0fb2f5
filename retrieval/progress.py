"""Progress for long jobs: tqdm's bar in a terminal, a plain line every few seconds in a log.

tqdm redraws its bar with \r on every update; piped into a log that is thousands of lines of \r (the demo's
log was 50 KB of them). When the stream is not a terminal, `progress_bar` returns `PlainProgress` instead,
which writes a readable line ("indexing: 1200/5000 items (24%), 85 item/s") at most every `interval`
seconds and one at the end. Both answer the part of tqdm's API this package uses: iteration, update,
set_postfix, close, and `with`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

PLAIN_INTERVAL = 5.0  # seconds between two lines in a log


def progress_bar(
    iterable: Iterable[Any] | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    file: IO[str] | None = None,
    interval: float = PLAIN_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """tqdm(iterable, total=..., desc=..., unit=..., disable=..., leave=...) on a terminal; a PlainProgress
    writing to `file` (default: stderr, looked up now, so a redirected stderr is honoured) anywhere else."""
    file = sys.stderr if file is None else file
    if disable or _is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, file=file)
    return PlainProgress(iterable, total, desc, unit, file, interval, clock)


def _is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """Counts like tqdm; writes a whole line per report, never \r, at most one per `interval` seconds."""

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        total: int | None,
        desc: str,
        unit: str,
        file: IO[str],
        interval: float,
        clock: Callable[[], float],
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit, self.file = iterable, total, desc, unit, file
        self.interval, self.clock = interval, clock
        self.n, self.shown, self.postfix = 0, 0, ""
        self.start = self.last = clock()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "iterate a progress_bar made with an iterable"
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        """The last count, unless the last line already said it."""
        if self.n != self.shown:
            self._write(self.clock())

    def line(self, now: float) -> str:
        """ "desc: n/total units (pct%), rate unit/s[, postfix]"; no rate before any time has passed."""
        units = self.unit if self.unit == "it" or self.unit.endswith("s") else self.unit + "s"
        done = (
            f"{self.n}/{self.total} {units} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n} {units}"
        )
        parts = [f"{self.desc}: {done}"]
        if now > self.start:
            rate = self.n / (now - self.start)
            parts.append(f"{rate:.1f} {self.unit}/s" if rate < 10 else f"{rate:.0f} {self.unit}/s")
        return ", ".join(parts + ([self.postfix] if self.postfix else []))

    def _write(self, now: float) -> None:
        self.file.write(self.line(now) + "\n")
        self.file.flush()
        self.shown, self.last = self.n, now
