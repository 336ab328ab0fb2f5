"""The index a server answers from: the newest generation on disk, loaded and warmed before any request sees it.

The model and index load once, at start-up, and are warmed with one query of each kind, so no request waits
for a load. A re-index, `remove` or `calibrate` by another process is picked up with no restart: the app holds
a `LiveIndex`, which loads the new generation on a thread of its own when manifest.json (written last,
atomically) changes, keeping the loaded model, and swaps it in once warm; each request takes one generation at
its start and answers from it throughout, and none waits for a load.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from retrieval.errors import shown
from retrieval.index.format import MANIFEST_FILE
from retrieval.index.handle import Index
from retrieval.server.threads import single_threaded

RELOAD_CHECK_S = 0.5  # a request looks at manifest.json's stat at most this often
RELOAD_RETRY_S = 5.0  # a generation that failed to load is tried again after this, or when the manifest next changes
Stamp = tuple[int, int, int] | None  # manifest.json's (inode, mtime, size); None: no manifest
logger = logging.getLogger("retrieval.server")  # one logger for the server, whichever module logs


@dataclass(frozen=True)
class Generation:
    """A loaded generation of the index and its counts, swapped in as one reference, so /api/health and /api/info
    count the index the request searches."""

    index: Index
    counts: dict[str, int]


def load(index: Index) -> Generation:
    """A freshly opened index, warmed and counted before any request sees it, and set aside from the garbage
    collector's full passes (`settle`)."""
    warm(index)
    generation = Generation(index, loaded_counts(index))
    settle()
    return generation


def settle() -> None:
    """Keep what is loaded out of the garbage collector's full passes (gc.freeze). A 100k-item index is about 150k
    Python objects, and a full pass over them took 190 ms, every request waiting: under load one came about every
    second (HNSW, 32 clients: p99 176 ms where p90 was 54). A reload hands back what the last freeze kept and
    collects it first (one full pass), so the cycles of a generation replaced since are freed, not kept."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
    gc.freeze()


def warm(index: Index) -> None:
    """Load the text tower, the image model, the FAISS index (a flat index's searches read no FAISS index: its
    combined vectors for each target, 1.5x the fused vectors in memory within --max-memory, and for other weights
    and the max/min rules the memory-mapped fused vectors) and the item filters now, not on a request."""
    for target in ("item", "image", "text"):
        index.search(text="warm up", k=1, target=target)
    index.search(image=Image.new("RGB", (64, 64)), k=1)


def loaded_counts(index: Index) -> dict[str, int]:
    """The counts of the generation loaded: its manifest's, written with the files loaded, and not the database's
    now, which a writer changes batch by batch until it publishes (hours on a big run). A store that rebuilt its
    FAISS index from a database ahead of the manifest (a writer was part way through as it opened) counts that
    database, here, once. Counted from the vectors, not the FAISS index: a flat index's searches load no FAISS
    index unless an item filter needs one (IndexStore._new_searcher)."""
    counts = index.store.manifest.counts
    return dict(counts) if counts.get("items") == len(index.store.vectors[0]) else index.store.counts()


class LiveIndex:
    """The index a server answers from, reloaded by itself when another process publishes a new generation.

    `index`, `remove`, `merge` and `calibrate` end by replacing manifest.json atomically, so a new (inode,
    mtime, size) of it means a complete new generation. At most every `check_s` a request looks (one stat); the
    one that sees a change starts a thread that opens the new generation (its loaded model kept: see
    Index.reopen), warms it and swaps it in. Until then every request, that one too, answers from the old
    generation, so none waits for a load (seconds for a big FAISS file) or holds a request thread for one.
    A load that fails, whatever the reason (the manifest names another model, a second writer committed while
    it warmed, a FAISS read error, no memory), keeps the old generation, logs one line, and is tried again
    after `retry_s`, or as soon as the manifest changes again.
    """

    retry_s = RELOAD_RETRY_S

    def __init__(self, current: Generation, stamp: Stamp, check_s: float = RELOAD_CHECK_S):
        self.current, self.check_s = current, check_s
        self._manifest = current.index.store.path / MANIFEST_FILE
        self._stamp = stamp  # the manifest's, taken before the current generation was opened
        self._failed: tuple[Stamp, float] | None = None  # a stamp that failed to load, and when to try it again
        self._checked = time.monotonic()
        self._loading = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, model: str | Path | None = None, check_s: float = RELOAD_CHECK_S) -> LiveIndex:
        """Open and warm the index. The manifest's stamp is taken first, so a generation published while the
        index opens and warms (seconds on a big one) is not taken for the one loaded, and loads next."""
        stamp = _stamp(Path(path) / MANIFEST_FILE)
        return cls(load(Index.open(path, model)), stamp, check_s)

    def poll(self) -> Generation:
        """The generation a request answers from; never waits (it runs on the event loop). A new one on disk
        starts loading in the background, unless a load is under way."""
        if self._due() and self._loading.acquire(blocking=False):
            threading.Thread(target=self._reload, name="reload", daemon=True).start()
        return self.current

    def _due(self) -> bool:
        """Is there a generation on disk to load? Cheap: one stat, at most every check_s."""
        now = time.monotonic()
        if now - self._checked < self.check_s:
            return False
        self._checked = now
        stamp = _stamp(self._manifest)
        return stamp != self._stamp and not (
            self._failed is not None and self._failed[0] == stamp and now < self._failed[1]
        )

    def _reload(self) -> None:
        """Load the generation on disk and swap it in (on its own thread; holds `_loading` until done)."""
        try:
            single_threaded()
            stamp = _stamp(self._manifest)  # before opening: one published meanwhile is loaded after
            try:
                fresh = load(self.current.index.reopen())
            except Exception as e:  # whatever failed, the loaded generation still answers correctly
                self._failed_to_load(stamp, e)
                return
            self._stamp, self._failed, self.current = stamp, None, fresh
        finally:
            self._loading.release()

    def _failed_to_load(self, stamp: Stamp, e: Exception) -> None:
        """Try it again after retry_s; say so once for each manifest, not on every try."""
        again = self._failed is not None and self._failed[0] == stamp
        self._failed = (stamp, time.monotonic() + self.retry_s)
        logger.log(
            logging.DEBUG if again else logging.WARNING,
            "still serving generation %d of %s: loading the new one failed (%s); trying again every %g s",
            self.current.index.store.manifest.generation,
            self._manifest.parent,
            shown(e) or type(e).__name__,
            self.retry_s,
        )


def _stamp(file: Path) -> Stamp:
    try:
        st = file.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
