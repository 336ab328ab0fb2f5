"""`retrieval index --engine ray`: encode on a Ray cluster, one embedding shard per task, then merge.

The driver lists the source (the same `list_source` as one machine, so the same ids) and plans shards of
--shard-size items (shards.py). Ray Data hands the unfinished ones to an actor pool: each actor loads the
model once and encodes its shards in batches, decoding images on two threads, as one machine does. The
shards land under the index folder (or --shard-dir, which must be storage every node sees), and the
driver merges them into one IVF index (merge.py). A re-run skips finished shards, so a killed job resumes.

Ray is optional (`pip install 'retrieval[distributed]'`) and imported only here, only when asked for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.pairs import Pair
from retrieval.errors import RetrievalError
from retrieval.index.build import BuildOptions, list_source, prepare_store
from retrieval.index.faiss_ops import min_items
from retrieval.index.format import MANIFEST_FILE, read_manifest
from retrieval.models.modeldir import ModelRef, canonical
from retrieval.progress import progress_bar
from retrieval.scale.merge import MergeReport, merge_shards
from retrieval.scale.shards import (
    DISTRIBUTED_INSTALL_HINT,
    clear_partial,
    encode_shard,
    is_done,
    plan_shards,
    read_skipped,
)

DEFAULT_SHARD_SIZE = 10_000  # items per shard: a few minutes of one worker's encoding, the unit lost to a kill
MERGED_TYPES = ("ivf", "ivfpq")  # the types built by training once and merging per-shard copies


def build_index_ray(
    source: str | Path,
    model_dir: ModelRef,
    index_path: str | Path,
    options: BuildOptions = BuildOptions(),
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard_dir: str | Path | None = None,
    address: str | None = None,
    workers: int | None = None,
    max_memory: int | None = None,
) -> MergeReport:
    """Create or update the index at index_path from the source with Ray: encode shards, then merge them.

    address None starts Ray on this machine (or uses the one this process already started); "auto" joins
    the cluster this node belongs to; "ray://HOST:10001" connects as a Ray Client. max_memory is the RAM
    budget of the merged index: above it, the inverted lists are merged on disk.
    """
    t0 = time.perf_counter()
    ray = import_ray()  # before anything is written
    index_path = Path(index_path)
    shard_dir = Path(shard_dir) if shard_dir is not None else index_path / "shards"
    unlisted: list[str] = []  # rows of the source skipped with their reason
    pairs = list_source(source, options.exclude, unlisted)
    chosen = merged_index_type(index_path, options.index_type, len(pairs))
    with connected(ray, address):  # a wrong --address fails here, before anything is written
        store, settings_changed = prepare_store(
            index_path, model_dir, chosen, len(pairs), options.params, options.memory_budget
        )
        with store.writer():  # prepare_store took the lock; this block releases it, whatever fails
            plan = plan_shards(pairs, shard_size, store.manifest.fingerprint)  # checked to be model_dir's
            pending = [(name, part) for name, part in plan if not is_done(shard_dir, name)]
            clear_partial(shard_dir, [name for name, _ in pending])  # a killed run's temporary files
            if pending:
                run_shards(ray, pending, model_dir, shard_dir, options.batch_size, workers, options.progress)
            merged = merge_shards(
                store,
                shard_dir,
                [name for name, _ in plan],
                max_memory,
                workers=os.cpu_count() or 1,
                force=settings_changed,
            )
    merged.skipped = unlisted + [
        message for name, _ in plan for message in read_skipped(shard_dir, name)
    ]  # resumed ones too
    merged.seconds = time.perf_counter() - t0
    merged.index_type += " (on disk)" if merged.on_disk else ""
    return merged


def merged_index_type(index_path: Path, index_type: str | None, n: int) -> str:
    """ivf or ivfpq as asked; else the index's own type if it is one of them; else ivf. (Memory decides where
    the lists are merged, not their type: compressing them is a recall trade the user makes.)"""
    if n < min_items("ivf"):
        raise RetrievalError(f"the source has {n} items, too few to train an IVF index on; use --engine local")
    if index_type in MERGED_TYPES:
        return index_type
    if index_type not in (None, "auto"):
        raise RetrievalError(
            f"--engine ray builds a merged IVF index: use --index-type ivf or ivfpq "
            f"(or --engine local for {index_type})"
        )
    if (index_path / MANIFEST_FILE).exists() and read_manifest(index_path).index_type in MERGED_TYPES:
        return read_manifest(index_path).index_type
    return "ivf"


def run_shards(
    ray: Any,
    pending: Sequence[tuple[str, list[Pair]]],
    model_dir: ModelRef,
    shard_dir: Path,
    batch_size: int,
    workers: int | None,
    progress: bool,
) -> None:
    """Encode the pending shards on Ray Data's actor pool, one model per actor; returns when all are written."""
    from ray.data import DataContext

    shard_dir.mkdir(parents=True, exist_ok=True)
    DataContext.get_current().enable_progress_bars = False  # ours counts shards; Ray's would interleave
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its plan lines, and tracebacks we report as one line
    size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows = [{"name": name, "pairs": pairs_to_json(part)} for name, part in pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardEncoder,
        fn_constructor_args=(canonical(model_dir), str(shard_dir.resolve()), batch_size),
        batch_size=1,
        concurrency=min(size, len(rows)),
        num_cpus=1,
    )
    with progress_bar(total=len(pending), desc="shards", unit="shard", disable=not progress) as bar:
        try:
            for _ in ds.iter_rows():
                bar.update(1)
        except ray.exceptions.RayError as e:  # a worker's own error arrives wrapped in Ray's traceback
            cause = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise RetrievalError(
                f"a Ray worker failed: {cause[0].strip()[:300]}; the shards it finished are "
                "kept, so re-running resumes after the cause is fixed"
            ) from e


class ShardEncoder:
    """A Ray Data actor: loads the model once, then encodes and writes each shard it is handed."""

    def __init__(self, model_dir: str, shard_dir: str, batch_size: int):
        from retrieval.models.load import load_model  # torch, in the worker only

        self.model, self.shard_dir, self.batch_size = load_model(model_dir), Path(shard_dir), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        done = [
            encode_shard(self.model, pairs_from_json(p), self.shard_dir, str(name), self.batch_size)
            for name, p in zip(batch["name"], batch["pairs"], strict=True)
        ]
        return {
            "name": [str(n) for n in batch["name"]],
            "items": [d["items"] for d in done],
            "skipped": [len(d["skipped"]) for d in done],
        }


def pairs_to_json(pairs: Sequence[Pair]) -> str:
    return json.dumps([[p.id, str(p.image) if p.image else None, list(p.captions), p.extra] for p in pairs])


def pairs_from_json(text: str) -> list[Pair]:
    return [
        Pair(i, Path(image) if image else None, tuple(captions), extra)
        for i, image, captions, extra in json.loads(text)
    ]


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise RetrievalError(f"--engine ray needs Ray: {DISTRIBUTED_INSTALL_HINT}") from None
    return ray


@contextmanager
def connected(ray: Any, address: str | None) -> Iterator[None]:
    """Use the Ray this process already started; else start or join one for the job and leave it after."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            **({} if address else {"num_cpus": os.cpu_count()}),
        )
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise RetrievalError(
            f"cannot connect to Ray at {address or 'a new local cluster'} ({' '.join(str(e).split())[:200]}); "
            "check --address (auto, or ray://HOST:10001) and that the cluster is up"
        ) from e
    try:
        yield
    finally:
        ray.shutdown()
