"""Benchmark the query path against a raw FAISS call on the same vectors, side by side in one run.

    .venv/bin/python scripts/bench_query.py [--n 100000] [--dim 128] [--queries 200] [--ann-n 200000]
                                            [--model index_data/demo/model] [--out bench_query.json]

Rows:
- flat top-10 and θ: raw `faiss.search` / `range_search` vs `Index.search_vector` (which also builds the
  fused query, fetches metadata and per-modality scores), p50/p99 per query and the overhead;
- 10,000 results made into records: `Index.hits` (metadata + per-modality scores);
- ANN (hnsw, ivf) at --ann-n vectors: build time, p50, recall@10 against exact;
- cold `retrieval search --text` end to end on a 10k-item index (needs --model, e.g. the demo's).
Vectors are clustered (random unit centres plus noise), since uniform random vectors are a worst case
for ANN recall. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.index import IndexStore, Item, Manifest, build_faiss, set_search_params  # noqa: E402
from retrieval.query import Index, query_vector  # noqa: E402


def clustered(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(clusters, size=n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_store(path: Path, image: np.ndarray, text: np.ndarray, index_type: str = "flat") -> IndexStore:
    store = IndexStore.create(path, Manifest("bench", "bench", image.shape[1], index_type))
    chunk = 20000
    for s in range(0, len(image), chunk):
        items, vectors = [], {}
        for i in range(s, min(s + chunk, len(image))):
            vectors[f"i{i}"], vectors[f"t{i}"] = image[i], text[i]
            items.append(Item(0, f"item-{i}", f"/data/{i}.jpg", [f"caption {i}"], f"i{i}", f"t{i}", extra={"n": i}))
        store.commit(items, vectors)
    store.rebuild()
    return store


def timed(fn, reps: int) -> np.ndarray:
    out = np.empty(reps)
    for r in range(reps):
        t = time.perf_counter()
        fn(r)
        out[r] = (time.perf_counter() - t) * 1000
    return out


def row(name: str, ms: np.ndarray, **extra) -> dict:
    return {"name": name, "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), **extra}


def bench_flat(args, tmp: Path) -> list[dict]:
    image, text = clustered(args.n, args.dim, 0), clustered(args.n, args.dim, 1)
    store = make_store(tmp / "flat", image, text)
    index = Index(store, Path("."))
    raw = store.faiss
    queries = clustered(args.queries, args.dim, 2)
    qv = [query_vector(q, "item", 0.5) for q in queries]
    # fuse the θ to a fixed result size: the 100th best score of the first query
    theta = float(raw.search(qv[0], 100)[0][0, -1])
    rows = []
    for _ in range(2):  # warm-up pass, then interleaved measurement: raw and ours alternate per query
        raw_k = timed(lambda r: raw.search(qv[r], 10), args.queries)
        ours_k = timed(lambda r: index.search_vector(queries[r], k=10), args.queries)
        raw_t = timed(lambda r: raw.range_search(qv[r], theta), args.queries)
        ours_t = timed(lambda r: index.search_vector(queries[r], k=None, theta=theta), args.queries)
    for name, raw_ms, ours_ms in (("flat top-10", raw_k, ours_k), ("flat theta", raw_t, ours_t)):
        rows.append(row(f"{name}: raw faiss", raw_ms))
        overhead = float(np.median(ours_ms) - np.median(raw_ms))
        rows.append(row(f"{name}: Index.search_vector", ours_ms, overhead_ms=overhead,
                        overhead_pct=100 * overhead / float(np.median(raw_ms))))
    fids = np.random.default_rng(3).choice(args.n, min(10000, args.n), replace=False) + 1
    scores = np.zeros(len(fids), dtype=np.float32)
    meta = timed(lambda r: index.hits(queries[0], scores, fids), 10)
    rows.append(row(f"{len(fids):,} results to records (metadata, scores)", meta))
    return rows


def bench_ann(args, tmp: Path) -> list[dict]:
    n = args.ann_n + args.queries  # held-out queries from the same distribution, not copies of indexed vectors
    both = np.concatenate([clustered(n, args.dim, 4), clustered(n, args.dim, 5)], axis=1) / np.sqrt(2)
    vectors, queries = both[: args.ann_n].astype(np.float32), both[args.ann_n :].astype(np.float32)
    fids = np.arange(args.ann_n, dtype=np.int64)
    exact = build_faiss(vectors, fids, "flat", {})
    truth = exact.search(queries, 10)[1]
    rows = [row(f"ann {args.ann_n:,}: flat (exact)", timed(lambda r: exact.search(queries[r : r + 1], 10), args.queries))]
    for index_type, knob, values in (("hnsw", "ef_search", (32, 64, 128, 256)), ("ivf", "nprobe", (16, 64, 256))):
        t = time.perf_counter()
        index = build_faiss(vectors, fids, index_type, {})
        build_s = time.perf_counter() - t
        for value in values:  # one build, a sweep of the search knob
            set_search_params(index, {knob: value})
            found = index.search(queries, 10)[1]
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
            ms = timed(lambda r: index.search(queries[r : r + 1], 10), args.queries)
            rows.append(row(f"ann {args.ann_n:,}: {index_type} {knob}={value}", ms, recall_at_10=recall, build_s=build_s))
    return rows


def bench_cold(args, tmp: Path) -> list[dict]:
    """A fresh process per query: what a user waits for at the shell."""
    from retrieval.indexing import build_index
    from retrieval.synth import generate

    data = generate(tmp / "synth10k", 10000, seed=7, size=32)
    build_index(data, args.model, tmp / "cold", progress=False)
    exe = Path(sys.executable).parent / "retrieval"
    ms = timed(lambda r: subprocess.run([str(exe), "search", "--index", str(tmp / "cold"), "--text", "a small red circle"],
                                        check=True, capture_output=True), 5)
    return [row("cold `retrieval search --text` (10k items)", ms)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--ann-n", type=int, default=200_000)
    p.add_argument("--model", help="model directory for the cold-start row (skipped without it)")
    p.add_argument("--out", default="bench_query.json")
    args = p.parse_args()
    faiss.omp_set_num_threads(1)  # one thread is as fast as two for single queries here
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_flat(args, Path(tmp)) + bench_ann(args, Path(tmp))
        if args.model:
            rows += bench_cold(args, Path(tmp))
    print(f"{'benchmark':<52}{'p50 ms':>9}{'p99 ms':>9}  notes")
    for r in rows:
        notes = ", ".join(f"{k}={v:.3g}" for k, v in r.items() if k not in ("name", "p50_ms", "p99_ms"))
        print(f"{r['name']:<52}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}  {notes}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
