"""Benchmark search at N = 10k, 100k, 1M: our query path against the raw FAISS call, side by side in one run.

    .venv/bin/python scripts/bench_search.py [--sizes 10000,100000,1000000] [--types flat,hnsw,ivf]
        [--dim 128] [--queries 200] [--model index_data/demo/model] [--fusion] [--filtered] [--out bench_search.json]

For each N and index type, on the same index object:
- single query top-10, p50/p99: raw `index.search` vs `Index.search_vector` (query rows, metadata and
  per-modality scores), and the overhead as a ratio; with text encoding: `Index.search(text=...)`. "Raw" is the
  FAISS call a user would make of the vectors our path reads: on flat, a flat index of the combined vectors
  (index/combined.py), shown first beside the fused scan it replaced, then (θ) beside ours splitting that scan
  by rows between threads (index/scan.py) before any record is made;
- θ (range search) at a θ that returns about 100 items: raw `range_search` vs ours, and on ANN types how
  many of the exact answers were found. On HNSW and IVF, whose FAISS call ours makes as raw does, the top-10
  and θ rows also time raw plus the least our records add (records_floor: θ's sort, msgspec's decode of the
  records made ready beforehand, the parts' scores);
- batched QPS (all queries in one call, 2 threads), top-10 and θ: raw vs `Index.search_vectors`. On flat16 ours
  reads the fp32 vectors once for the batch (scan.FlatScan), raw scans the fp16 codes once per query;
- recall@10 against exact, build time (the whole `rebuild`: read SQLite, build, write), index size,
  and process peak memory;
- "ours against exact": recall@10 of what our search path answers and the fraction of queries whose θ set is
  identical to exact fp32 flat's. For flat16 (`--types flat,flat16 --sizes 1000000`: exact 1M on fp32 and on
  fp16 storage), "raw" is the fp16 FAISS scan alone and "ours" the scan plus the exact fp32 re-rank;
- 10,000 results made into records (metadata + per-modality scores);
- with --fusion: the fusion rules max and min against weighted (top-10 and θ, p50, alternating in passes) on each
  type and knob, and what each rule answers against the exact answer under that rule (`exact=True`);
- with --filtered: text -> image on a flat index where one item in ten has no image (bench_filtered): our path as
  it was (an item filter leaves those items out) against ours now (a scan of only the items with an image), one
  query and a batch, and ours against one FAISS call on the vectors it reads;
- with --model: a cold `retrieval search --text` end to end (a fresh process) on a real 10k-item index.
Vectors are unit vectors clustered on a 32-dimensional subspace of R^dim, as real embeddings are: uniform
random vectors are a worst case for ANN recall. Single queries run FAISS on one thread (search_threads), raw
and ours, but ours splits a large flat scan's rows, or flat16's lists, between threads of its own (index/scan.py);
builds and batches run on two.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.index.combined import Combined, combined_scan
from retrieval.index.faiss_ops import FaissThreads
from retrieval.index.format import Item, Manifest
from retrieval.index.handle import Index
from retrieval.index.records import RECORDS, joined_lines
from retrieval.index.rerank import Reranked
from retrieval.index.scan import FlatScan
from retrieval.index.search import GcPaused, query_rows, query_vectors, ranked, search_threads
from retrieval.index.store import IndexStore

KNOBS = {"hnsw": ("ef_search", (64, 128, 256)), "ivf": ("nprobe", (16, 64, 256))}
BLOCK = 20  # queries a side runs before the other takes its turn (side_by_side)
TEXTS = ["a small red circle", "two blue squares", "a large green star above a triangle", "a yellow heart on the left"]


def embeddings(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) unit vectors of n items: 1000 clusters in a 32-d latent space, each item's two parts near
    one latent point, embedded in R^dim with a little full-rank noise."""
    shared = np.random.default_rng(0)
    basis = np.linalg.qr(shared.standard_normal((dim, 32)))[0].T  # (32, dim), orthonormal rows
    centres = shared.standard_normal((1000, 32))
    rng = np.random.default_rng(seed)
    z = centres[rng.integers(1000, size=n)] + 0.5 * rng.standard_normal((n, 32))

    def part() -> np.ndarray:
        x = (z + 0.3 * rng.standard_normal((n, 32))) @ basis + 0.05 * rng.standard_normal((n, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return part(), part()


def make_store(
    path: Path, image: np.ndarray, text: np.ndarray, model: str, fingerprint: str = "bench", no_image_every: int = 0
) -> IndexStore:
    """A flat index of n items (image + caption vectors, a path, a caption, an extra field), not yet built; with
    no_image_every=m, every m-th item is a caption alone."""
    store = IndexStore.create(path, Manifest(model, fingerprint, image.shape[1], "flat"))
    for s in range(0, len(image), 50_000):
        rows = range(s, min(s + 50_000, len(image)))
        images = {i: f"i{i}" for i in rows if not no_image_every or i % no_image_every}  # item -> its image's key
        vectors = {**{key: image[i] for i, key in images.items()}, **{f"t{i}": text[i] for i in rows}}
        files = {i: f"/data/{i}.jpg" for i in images}  # a caption alone has no file
        items = [
            Item(0, f"item-{i}", files.get(i), [f"caption {i}"], images.get(i), f"t{i}", extra={"n": i}) for i in rows
        ]
        store.commit(items, vectors)
    return store


def timed(fn, reps: int, start: int = 0) -> np.ndarray:
    """ms of fn(r) for r in start, ..., start + reps - 1."""
    out = np.empty(reps)
    for i, r in enumerate(range(start, start + reps)):
        t = time.perf_counter()
        fn(r)
        out[i] = (time.perf_counter() - t) * 1000
    return out


def row(name: str, ms: np.ndarray | None = None, **extra) -> dict:
    times = {} if ms is None else {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}
    return {"name": name, **times, **extra}


def side_by_side(name: str, raw, ours, reps: int, first: str = "raw faiss", floor=None) -> list[dict]:
    """Raw and ours take turns a block of BLOCK queries at a time, over the queries twice (the first a warm-up), so
    the machine's drift (other tenants' memory traffic moves a 100k flat scan by a millisecond here) hits both
    alike, and each query follows another query, as a user's does. The sides take turns going first, so none
    always finds another's data for the same queries in cache. `floor`, if given, takes its turns too: raw plus
    the least our records add (records_floor)."""
    fns = [raw, ours] if floor is None else [raw, ours, floor]
    for _ in range(2):
        ms: list[list[np.ndarray]] = [[] for _ in fns]
        for block, start in enumerate(range(0, reps, BLOCK)):
            for side in ((block + i) % len(fns) for i in range(len(fns))):  # each side first in turn
                ms[side].append(timed(fns[side], min(BLOCK, reps - start), start))
    raw_all, *others = (np.concatenate(m) for m in ms)
    labels = ["ours", "raw + records' floor"][: len(others)]
    return [row(f"{name}: {first}", raw_all)] + [
        row(
            f"{name}: {label}",
            times,
            overhead_ms=float(np.median(times) - np.median(raw_all)),
            overhead_ratio=float(np.median(times) / np.median(raw_all)),
        )
        for label, times in zip(labels, others, strict=True)
    ]


def records_floor(
    index: Index, raw: Callable[[int], tuple], queries: np.ndarray, k: int | None, theta: float | None
) -> Callable[[int], None]:
    """raw(r) plus the least that answering with our Hit records adds: θ's results sorted (FAISS's range search
    leaves them unsorted), their records decoded by msgspec (in C) from a buffer made ready beforehand, and their
    parts' scores, with the GC paused and FAISS on one thread as `hits_for` runs them. It leaves out finding the
    records' lines, setting the scores, and every check and call around them: where ours makes raw's FAISS call
    (HNSW, IVF), a lower bound on ours' overhead. The ready buffers were made long before, so their bytes come
    from memory as the lines ours joins do."""
    store = index.store
    searcher, params = store.searcher(None, weight=0.5)
    answers = ranked(searcher, query_rows(searcher, queries, "item", 0.5), k, theta, params)
    found = [store.rows_of(ids) for _, ids in answers]  # the rows of ours' answers, in its order
    assert store.records is not None, "the bench's stores write their records file"
    ready = [joined_lines(store.records, rows) for rows in found]
    first = [hit.id for hit in index.search_vector(queries[0], k=k, theta=theta)]
    assert [hit.id for hit in RECORDS.decode(ready[0])] == first, "the floor decodes ours' records"
    scorer = store.part_scorer

    def floor(r: int) -> None:
        answer = raw(r)
        with GcPaused(), FaissThreads(1):
            if k is None:
                (-answer[1]).argsort(kind="stable")  # (lims, scores, ids)
            RECORDS.decode(ready[r])
            scorer(queries[r], found[r])

    return floor


def batch_qps(raw, ours) -> dict:
    """Queries per second of raw() and ours(), each one call for the whole batch of queries, after a warm-up call."""
    for _ in range(2):  # warm-up, then measure
        t = time.perf_counter()
        raw()
        raw_s = time.perf_counter() - t
        t = time.perf_counter()
        nq = len(ours())
        ours_s = time.perf_counter() - t
    return {"raw_qps": nq / raw_s, "ours_qps": nq / ours_s, "overhead_ratio": ours_s / raw_s}


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))


def bench_type(
    index: Index,
    index_type: str,
    queries: np.ndarray,
    truth: np.ndarray,
    theta: float,
    exact_sets: list[set[int]],
    prefix: str,
    fusion: bool = False,
) -> list[dict]:
    store, reps = index.store, len(queries)
    qv = query_vectors(queries, "item", 0.5)
    rows = []
    knob, values = KNOBS.get(index_type, (None, (None,)))
    for value in values:  # one build, a sweep of the search knob
        if knob:
            index.tune(**{knob: value})
        raw, raw_q = raw_call(store, queries)
        tag = f"{prefix} {index_type}" + (f" {knob}={value}" if knob else "")
        scan = store.searcher(None, weight=0.5)[0]
        ann = isinstance(scan, faiss.Index)  # ours asks raw's FAISS index itself (HNSW, IVF): the floor applies

        def raw_top10(r: int, raw=raw, raw_q=raw_q) -> tuple:  # this knob value's searcher, bound now
            return raw.search(raw_q[r : r + 1], 10)

        def raw_theta(r: int, raw=raw, raw_q=raw_q) -> tuple:
            return raw.range_search(raw_q[r : r + 1], theta)

        faiss.omp_set_num_threads(search_threads(1))  # one query: FAISS on one thread, raw and ours alike
        if isinstance(scan, Combined):  # flat: ours scans the combined vectors; beside it, the fused scan it replaced
            rows += side_by_side(
                f"{tag} top-10, one query: fused (n, 2d) scan vs combined (n, d)",
                lambda r: store.faiss.search(qv[r : r + 1], 10),
                raw_top10,
                reps,
            )
            rows += side_by_side(  # the scan alone, before our path makes records of its answers
                f"{tag} theta, one query: the combined scan on one thread vs split by rows (FlatScan)",
                raw_theta,
                lambda r, scan=scan, raw_q=raw_q: scan.range_search(raw_q[r : r + 1], theta),
                reps,
            )
        top10 = side_by_side(
            f"{tag} top-10",
            raw_top10,
            lambda r: index.search_vector(queries[r], k=10),
            reps,
            floor=records_floor(index, raw_top10, queries, 10, None) if ann else None,
        )
        top10[1]["recall_at_10"] = recall_at_10(raw.search(raw_q, 10)[1], truth)  # [raw, ours, floor]
        theta_rows = side_by_side(
            f"{tag} theta (~100 results)",
            raw_theta,
            lambda r: index.search_vector(queries[r], k=None, theta=theta),
            reps,
            floor=records_floor(index, raw_theta, queries, None, theta) if ann else None,
        )
        lims = raw.range_search(raw_q, theta)[0]
        theta_rows[1]["mean_results"] = float(np.mean(np.diff(lims)))
        theta_rows[1]["theta_completeness"] = float(np.sum(np.diff(lims)) / max(1, sum(map(len, exact_sets))))
        rows += top10 + theta_rows
        faiss.omp_set_num_threads(2)
        rows.append(
            row(
                f"{tag} batch of {reps}, top-10",
                **batch_qps(
                    lambda raw=raw, raw_q=raw_q: raw.search(raw_q, 10), lambda: index.search_vectors(queries, k=10)
                ),
            )
        )
        rows.append(
            row(
                f"{tag} batch of {reps}, theta",
                **batch_qps(
                    lambda raw=raw, raw_q=raw_q: raw.range_search(raw_q, theta),
                    lambda: index.search_vectors(queries, k=None, theta=theta),
                ),
            )
        )
        rows.append(row(f"{tag} ours against exact", **agreement(store, queries, truth, theta, exact_sets)))
        if fusion:
            faiss.omp_set_num_threads(1)
            rows += fusion_rows(index, tag, queries, theta)
    return rows


def raw_call(store: IndexStore, queries: np.ndarray) -> tuple[faiss.Index, np.ndarray]:
    """The FAISS index a weighted search reads, as a user of FAISS would ask it, and the query rows it is asked
    with: flat16's fp16 scan (without the re-rank), a FAISS flat index of flat's combined vectors (the queries
    themselves: ours splits one query's scan of them between threads), else the index itself."""
    searcher = store.searcher(None, weight=0.5)[0]
    raw = faiss_flat(searcher) if isinstance(searcher, Combined) else searcher
    return raw.index if isinstance(raw, Reranked) else raw, query_rows(searcher, queries, "item", 0.5)


def faiss_flat(scan: FlatScan) -> faiss.Index:
    """A FAISS flat index of a scan's vectors, with its ids: the one call, on one thread, a user would make."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(scan.vectors.shape[1]))
    index.add_with_ids(scan.vectors, scan.fids)
    return index


def fusion_rows(index: Index, tag: str, queries: np.ndarray, theta: float) -> list[dict]:
    """max and min against weighted on one index: p50 of top-10 and of θ (the rules alternate in passes), and
    each rule's answers against the exact answer under the same rule (a flat scan: exact=True)."""
    rows = []
    for what, args in (("top-10", {"k": 10}), ("theta", {"k": None, "theta": theta})):
        ms = {rule: [] for rule in ("weighted", "max", "min")}
        for _ in range(3):  # a warm-up pass, then two measured
            for rule in ms:
                ms[rule] = timed(
                    lambda r, rule=rule, args=args: index.search_vector(queries[r], fusion=rule, **args), len(queries)
                )
        for rule, times in ms.items():
            found = [{h.id for h in index.search_vector(q, fusion=rule, **args)} for q in queries]
            exact = [{h.id for h in index.search_vector(q, fusion=rule, exact=True, **args)} for q in queries]
            rows.append(
                row(
                    f"{tag} {what} fusion={rule}",
                    times,
                    vs_weighted=float(np.median(times) / np.median(ms["weighted"])),
                    found_of_exact=sum(len(f & e) for f, e in zip(found, exact, strict=True))
                    / max(1, sum(map(len, exact))),
                    mean_results=float(np.mean([len(e) for e in exact])),
                )
            )
    return rows


def theta_sets(results) -> list[set[int]]:
    return [set(ids.tolist()) for _, ids in results]


def agreement(
    store: IndexStore, queries: np.ndarray, truth: np.ndarray, theta: float, exact_sets: list[set[int]]
) -> dict:
    """What our search path answers (the index type's searcher: flat16 re-ranks) against exact flat fp32: recall@10
    and the fraction of queries whose θ set is identical."""
    searcher, params = store.searcher(None, weight=0.5)
    qv = query_rows(searcher, queries, "item", 0.5)
    top = [ids for _, ids in ranked(searcher, qv, 10, None, params)]
    same = [a == b for a, b in zip(theta_sets(ranked(searcher, qv, None, theta, params)), exact_sets, strict=True)]
    return {"recall_at_10": recall_at_10(top, truth), "theta_sets_identical": float(np.mean(same))}


def bench_size(n: int, args, tmp: Path) -> list[dict]:
    image, text = embeddings(n + args.queries, args.dim, seed=n)
    queries = text[n:]  # held-out captions: text -> item search
    t = time.perf_counter()
    store = make_store(tmp / f"n{n}", image[:n], text[:n], args.model or "bench")
    rows = [row(f"N={n:,}: fill SQLite", seconds=time.perf_counter() - t)]
    index = Index(store, Path(args.model or "."))
    prefix = f"N={n:,}"
    truth = theta = exact_sets = None
    for index_type in args.types:
        store.manifest.index_type, store.manifest.params = index_type, {}
        faiss.omp_set_num_threads(2)
        store.rebuild()
        raw = store.faiss
        if truth is None:  # flat comes first: the exact answers every ANN type is measured against
            qv = query_vectors(queries, "item", 0.5)
            truth = raw.search(qv, 10)[1]
            theta = float(np.median(raw.search(qv, 100)[0][:, -1]))  # the median query gets about 100 results
            exact_sets = theta_sets(ranked(raw, qv, None, theta, None))
        rows.append(
            row(
                f"{prefix} {index_type}: build",
                build_s=store.manifest.build_seconds,
                index_mb=store.manifest.faiss_bytes / 2**20,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            )
        )
        rows += bench_type(index, index_type, queries, truth, theta, exact_sets, prefix, args.fusion)
        if args.model:
            faiss.omp_set_num_threads(1)
            index.search(text=TEXTS[0], k=10)  # loads the numpy text tower once
            rows.append(
                row(
                    f"{prefix} {index_type}: text query incl. encoding, top-10",
                    timed(lambda r: index.search(text=TEXTS[r % len(TEXTS)], k=10), len(queries)),
                )
            )
    fids = np.random.default_rng(3).choice(n, min(10_000, n), replace=False) + 1
    rows.append(
        row(
            f"{prefix}: {len(fids):,} results to records",
            timed(lambda r: index.hits(queries[0], np.zeros(len(fids), np.float32), fids), 20),
        )
    )
    return rows


def bench_filtered(n: int, args, tmp: Path) -> list[dict]:
    """Text -> image on a flat index where one item in ten is a caption alone, which the search must leave out.
    "before" is our path as it was: the image vectors of every item, asked with an item filter (a hash set checked
    per row, and a batch scanned once per query), then the same records and scores. "raw" is one FAISS call on
    what our path reads now: a flat index of the image vectors of the items that have one, no filter. One query at
    a time, the two paths' answers are checked to be the same."""
    image, text = embeddings(n + args.queries, args.dim, seed=n)
    queries = text[n:]
    store = make_store(tmp / f"filtered{n}", image[:n], text[:n], args.model or "bench", no_image_every=10)
    store.rebuild()
    index, tag = Index(store, Path(args.model or ".")), f"N={n:,} flat, image target, 10% no image"
    searcher = store.searcher("image_key", weight=1.0)[0]
    assert isinstance(searcher, Combined), "the combined vectors must fit in memory here"
    fids, vectors = store.vectors
    raw, having = faiss_flat(searcher), store.fids_having("image_key")
    every, selector = faiss_flat(combined_scan(vectors, fids, 1.0)), faiss.IDSelectorBatch(having)

    def before(q: np.ndarray, k: int | None, theta: float | None = None) -> list:
        params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        return index.hits_for(q, ranked(every, q, k, theta, params))

    theta = float(np.median(raw.search(queries, min(100, len(having)))[0][:, -1]))  # about 100 results a query
    cases = (("top-10", 10, None), ("theta", None, theta))
    faiss.omp_set_num_threads(search_threads(1))
    for r in range(min(20, len(queries))):
        for _, k, th in cases:
            assert before(queries[r : r + 1], k, th) == index.search_vectors(queries[r : r + 1], k, th, target="image")
    rows = []
    for name, k, th in cases:
        rows += side_by_side(
            f"{tag}: {name}, before vs ours",
            lambda r, k=k, th=th: before(queries[r : r + 1], k, th),
            lambda r, k=k, th=th: index.search_vector(queries[r], k, th, target="image"),
            len(queries),
            first="before",
        )
        rows += side_by_side(
            f"{tag}: {name}",
            lambda r, k=k, th=th: (
                raw.search(queries[r : r + 1], k) if th is None else raw.range_search(queries[r : r + 1], th)
            ),
            lambda r, k=k, th=th: index.search_vector(queries[r], k, th, target="image"),
            len(queries),
        )
    faiss.omp_set_num_threads(2)
    for name, k, th in cases:
        qps = batch_qps(
            lambda k=k, th=th: before(queries, k, th),
            lambda k=k, th=th: index.search_vectors(queries, k, th, target="image"),
        )
        rows.append(row(f"{tag}: batch of {len(queries)}, {name}: before vs ours", **qps))
    return rows


def bench_cold(args, tmp: Path) -> list[dict]:
    """A fresh process per query, as a user at the shell waits for it, on 10k synthetic images."""
    from retrieval.data.synth import generate
    from retrieval.index.build import BuildOptions, build_index

    data = generate(tmp / "synth10k", 10_000, seed=7, size=32)
    build_index(data, args.model, tmp / "cold", BuildOptions(progress=False))
    exe = Path(sys.executable).parent / "retrieval"
    ms = timed(
        lambda r: subprocess.run(
            [str(exe), "search", "--index", str(tmp / "cold"), "--text", TEXTS[r % len(TEXTS)]],
            check=True,
            capture_output=True,
        ),
        10,
    )
    return [row("cold `retrieval search --text`, 10k-item index", ms)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated collection sizes")
    p.add_argument("--types", default="flat,hnsw,ivf", help="comma-separated index types; flat first (the truth)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension d (FAISS holds 2d: image + caption)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--model", help="a model directory of dimension --dim, for the rows with text encoding")
    p.add_argument("--fusion", action="store_true", help="add the fusion rules' rows (max, min against weighted)")
    p.add_argument(
        "--filtered", action="store_true", help="add text -> image on a flat index with caption-only items (a filter)"
    )
    p.add_argument("--out", default="bench_search.json")
    args = p.parse_args()
    args.types = args.types.split(",")
    if args.types[0] != "flat":
        p.error("--types must start with flat: the ANN types are measured against it")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            rows += bench_cold(args, Path(tmp))
        for n in (int(x) for x in args.sizes.split(",") if x):
            rows += bench_size(n, args, Path(tmp))
            if args.filtered:
                rows += bench_filtered(n, args, Path(tmp))
            Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
            print(f"done N={n:,}", file=sys.stderr, flush=True)
    print(f"{'benchmark':<58}{'p50 ms':>9}{'p99 ms':>9}  notes")
    for r in rows:
        notes = ", ".join(f"{k}={v:.3g}" for k, v in r.items() if k not in ("name", "p50_ms", "p99_ms"))
        times = f"{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}" if "p50_ms" in r else " " * 18
        print(f"{r['name']:<58}{times}  {notes}")


if __name__ == "__main__":
    main()
