"""Build or update an index from a source folder or manifest: diff, encode what is new, commit in batches.

A re-run encodes only new or changed items (a file is unchanged when its path, mtime, size and captions
are), reuses the stored vector of any content seen before (by sha256), and removes items that left the
source. Each batch is committed on its own, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.choices import INDEX_TYPES, check_params
from retrieval.data.pairs import Pair, read_pairs
from retrieval.errors import ImageError, RetrievalError
from retrieval.index.faiss_ops import choose_index_type, min_items
from retrieval.index.format import Item, Manifest, check_model
from retrieval.index.store import IndexStore
from retrieval.models.modeldir import ModelRef, canonical, embed_dim, fingerprint
from retrieval.progress import progress_bar
from retrieval.threads import ThreadFit, prepare_openmp

DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes the FAISS index may take when --index-type auto chooses


@dataclass(frozen=True)
class BuildOptions:
    """How to build an index, the same for the local and the Ray builder (build_index, build_index_ray)."""

    index_type: str | None = None  # flat, hnsw, ivf, ivfpq; None or "auto": the index's own, or chosen by size
    exclude: Sequence[str] = ()  # globs over item ids to leave out
    batch_size: int = 256  # items encoded (and committed) at a time
    params: dict[str, Any] | None = None  # search knobs stored with the index: ef_search, nprobe
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # what "auto" lets the FAISS index take
    progress: bool = True  # a progress bar (a terminal) or sparse lines (a log)


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per unreadable file or bad row
    seconds: float = 0.0
    index_type: str = ""
    precision: str = ""  # what the image encoder ran in (Encoder.image_precision); "" when nothing was encoded


def list_source(source: str | Path, exclude: Sequence[str] = (), skipped: list[str] | None = None) -> list[Pair]:
    """The items of a folder (recursive; hidden files and indexes inside it skipped) or manifest, minus ids
    matching an --exclude glob. Given `skipped`, a bad row, sidecar or file name is listed there with its
    reason and the rest is indexed; without it, the first one raises (see `read_pairs`)."""
    return read_pairs(source, skipped, exclude)


def file_state(path: Path | None) -> tuple[int | None, int | None]:
    """(mtime in ns, size) of an image file; (None, None) for a text-only item or a vanished file."""
    if path is None:
        return None, None
    try:
        st = path.stat()
    except OSError:
        return None, None
    return st.st_mtime_ns, st.st_size


def is_unchanged(item: Item, pair: Pair) -> bool:
    mtime_ns, size = file_state(pair.image)
    return (
        item.path == (str(pair.image) if pair.image else None)
        and item.mtime_ns == mtime_ns
        and item.size == size
        and item.captions == list(pair.captions)
        and item.extra == pair.extra
    )


def text_key(captions: Sequence[str]) -> str:
    return "txt:" + hashlib.sha256(json.dumps(list(captions)).encode()).hexdigest()


def image_key(path: Path) -> str:
    """Content address of an image file (sha256), hashed in chunks so that memory stays flat however big the file
    is; raises ImageError when the file cannot be read at all. (decode_batch calls it once the file has decoded
    as an image, so a huge file that is none is refused from its header, before any of it is hashed.)"""
    try:
        with path.open("rb") as f:
            return "img:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e.strerror or e} (check the path)") from e


def build_index(
    source: str | Path,
    model_dir: ModelRef,
    index_path: str | Path,
    options: BuildOptions = BuildOptions(),
    precision: str = "auto",
    prefetch: bool = True,
) -> IndexReport:
    """Create the index at index_path, or bring it up to date with the source.

    precision: the image encoder's (Encoder.image_precision: "auto" keeps the index's own where it is native).
    prefetch: decode the next batch while this one is encoded (off only to measure what the overlap gains)."""
    prepare_openmp()  # before torch loads, for Python callers (the CLI has done it)
    from retrieval.models.load import load_model  # torch: only the commands that encode pay for it

    t0 = time.perf_counter()
    index_path = Path(index_path)
    skipped: list[str] = []  # rows, sidecars and file names that cannot be indexed: listed, the rest indexed
    pairs = list_source(source, options.exclude, skipped)
    store, settings_changed = prepare_store(
        index_path, model_dir, options.index_type, len(pairs), options.params, options.memory_budget
    )

    report = IndexReport(index_type=store.manifest.index_type, skipped=skipped)
    with store.writer(), ThreadFit() as threads:  # as many threads as cores other jobs leave free
        existing = store.all_items()
        todo = []
        for pair in pairs:
            item = existing.get(pair.id)
            if item is not None and is_unchanged(item, pair):
                report.unchanged += 1
            else:
                todo.append(pair)
        listed = {p.id for p in pairs} | {getattr(s, "id", None) for s in skipped}  # a skipped item stays as it was
        removed = [i for i in existing if i not in listed]
        model = load_model(model_dir) if todo else None
        if model is not None:
            precision = model.image_precision(precision, store.manifest.image_precision)
            report.precision = store.manifest.image_precision = precision
        desc = f"indexing, images in {report.precision}" if report.precision else "indexing"
        bar = progress_bar(total=len(todo), desc=desc, unit="item", disable=not options.progress)
        size = options.batch_size
        batches = [todo[start : start + size] for start in range(0, len(todo), size)]
        with ThreadPoolExecutor(2) as pool:
            for batch, decoding in decode_ahead(model, batches, pool, ahead=1 if prefetch else 0):
                threads.update()  # re-counted batch by batch
                items, vectors, unreadable = encode_batch(model, batch, pool, store.known_vectors, precision, decoding)
                store.commit(items, vectors)
                report.skipped += unreadable
                report.added += sum(1 for it in items if it.id not in existing)
                report.updated += sum(1 for it in items if it.id in existing)
                bar.update(len(batch))
        bar.close()
        if removed:
            store.commit([], {}, removed)
        report.removed = len(removed)
        if todo or removed or settings_changed or not store.derived_files_current():
            threads.update()  # FAISS trains and adds on them too
            store.rebuild()
    report.seconds = time.perf_counter() - t0
    return report


def prepare_store(
    index_path: Path, model_dir: ModelRef, index_type: str | None, n_items: int, params: dict | None, memory_budget: int
) -> tuple[IndexStore, bool]:
    """Lock the index folder, open the index (refusing another model's) or create it, and apply a new type or
    params: shared by the local and the Ray engine. The lock is taken before the manifest is read or written, so
    two runs with different models never both create one index, and the model is checked against the manifest
    this run writes under, before anything is written: a refused run leaves the folder as it was. Returns the
    store, holding the lock (the caller's `with store.writer():` releases it), and whether its type or params
    changed."""
    if index_type is not None and index_type not in INDEX_TYPES:
        raise RetrievalError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    if index_type is not None and n_items < min_items(index_type):
        raise RetrievalError(
            f"{index_type} needs at least {min_items(index_type)} items to train on, the source has {n_items}; use flat"
        )
    check_params(params or {})  # before they reach the manifest, where every search would meet them
    model_fp = fingerprint(model_dir)

    def new_manifest() -> Manifest:
        dim = embed_dim(model_dir)
        chosen = index_type if index_type not in (None, "auto") else choose_index_type(n_items, dim, memory_budget)
        return Manifest(canonical(model_dir), model_fp, dim, chosen)

    store = IndexStore.open_writer(
        index_path, new_manifest, lambda manifest: check_model(manifest, index_path, model_fp, model_dir)
    )
    settings = (store.manifest.index_type, dict(store.manifest.params))
    if index_type not in (None, "auto"):
        store.manifest.index_type = index_type
    store.manifest.params.update(params or {})
    return store, settings != (store.manifest.index_type, store.manifest.params)


Decoded = tuple[str | None, np.ndarray | None, str | None]  # one item's (image key, pixels (3, S, S), error)


def decode_batch(model, batch: Sequence[Pair], pool: ThreadPoolExecutor) -> list[Future[Decoded]]:
    """Start reading, preprocessing and hashing the batch's images on the pool; an unreadable one gives its error.
    Decoded first: the decoder reads the header and bounds the pixels, so no file that is not an image is hashed."""

    def decode(pair: Pair) -> Decoded:
        if pair.image is None:
            return None, None, None
        try:
            pixels = model.transform.load(pair.image)
            return image_key(pair.image), pixels, None
        except ImageError as e:
            return None, None, str(e)

    return [pool.submit(decode, pair) for pair in batch]


def decode_ahead(
    model, batches: Sequence[Sequence[Pair]], pool: ThreadPoolExecutor, ahead: int
) -> Iterator[tuple[Sequence[Pair], list[Future[Decoded]]]]:
    """Each batch with its decoding, started `ahead` batches early: with 1, the pool decodes batch i + 1 while
    the caller encodes and commits batch i."""
    started: deque[tuple[Sequence[Pair], list[Future[Decoded]]]] = deque()
    for batch in batches:
        started.append((batch, decode_batch(model, batch, pool)))
        if len(started) > ahead:
            yield started.popleft()
    yield from started


def encode_batch(
    model,
    batch: Sequence[Pair],
    pool: ThreadPoolExecutor,
    known: Callable[[Sequence[str]], set[str]],
    precision: str = "auto",
    decoding: list[Future[Decoded]] | None = None,
) -> tuple[list[Item], dict[str, np.ndarray], list[str]]:
    """Items for one batch with the vectors of content `known` does not have yet; unreadable images are skipped
    with a message. `known` is the index's store on one machine, the shard's vectors so far on a Ray worker.
    `decoding`: the batch's decode_batch, started earlier; without it the batch is decoded now."""
    prepared = [f.result() for f in (decoding if decoding is not None else decode_batch(model, batch, pool))]
    keys = [k for k, _, _ in prepared if k] + [text_key(p.captions) for p in batch if p.captions]
    known_keys = known(keys)
    vectors: dict[str, np.ndarray] = {}
    new_images = {k: px for k, px, _ in prepared if k and px is not None and k not in known_keys}  # a key has pixels
    if new_images:
        for k, v in zip(
            new_images, model.encode_image(np.stack(list(new_images.values())), precision=precision), strict=True
        ):
            vectors[k] = v
    new_texts = {
        text_key(p.captions): p.captions for p in batch if p.captions and text_key(p.captions) not in known_keys
    }
    if new_texts:  # every caption of the batch in one encoder call, then one mean vector per item
        flat = [c for captions in new_texts.values() for c in captions]
        emb, start = model.encode_text(flat), 0
        for k, captions in new_texts.items():
            vectors[k] = caption_vector(emb[start : start + len(captions)])
            start += len(captions)
    items, skipped = [], []
    for pair, (key, _, error) in zip(batch, prepared, strict=True):
        if error:
            skipped.append(error)
            continue
        mtime_ns, size_bytes = file_state(pair.image)
        items.append(
            Item(
                0,
                pair.id,
                str(pair.image) if pair.image else None,
                list(pair.captions),
                key,
                text_key(pair.captions) if pair.captions else None,
                mtime_ns,
                size_bytes,
                pair.extra,
            )
        )
    return items, vectors, skipped


def caption_vector(caption_emb: np.ndarray) -> np.ndarray:
    """One text vector for an item with several captions: their normalised mean."""
    mean = caption_emb.mean(0)  # (D,)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def remove_items(index_path: str | Path, ids: Sequence[str]) -> list[str]:
    """Remove items by id; returns the ids that were not in the index."""
    store = IndexStore.open(index_path)
    with store.writer():
        present = store.items_by_id(ids)
        missing = [i for i in ids if i not in present]
        if present:
            store.commit([], {}, list(present))
        if present or not store.derived_files_current():  # also after a run killed while writing them
            store.rebuild()
    return missing
