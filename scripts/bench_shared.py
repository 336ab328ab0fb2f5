"""Benchmark training, indexing and flat and flat16 scans' single queries on a machine shared with another job:
idle against one core busy, before and after the thread policy (retrieval/threads.py), side by side in one run.

    .venv/bin/python scripts/bench_shared.py [--parts train,index,search,search16] [--loads idle,nice19,nice0]
        [--reps 2]
        [--preset default] [--n 600] [--epochs 3] [--index-n 600] [--search-n 100000] [--work DIR]
        [--json bench_shared.json]

Each row runs in a fresh Python process, since OpenMP reads its wait policy once, as torch loads:
- before: RETRIEVAL_THREADS=off (OpenMP as it comes: every core, waiting threads spin 300,000 rounds);
- after: the policy as the CLI runs it (`prepare_openmp` before torch loads: a short spin; `ThreadFit`: as many
  threads as cores other processes leave free, re-counted every few seconds).
Loads, started and stopped by the benchmark around each row: idle; nice19 and nice0, a busy loop of one thread at
that priority in a session of its own, as another program would be (with autogroup scheduling, on by default
on desktop Linux, niceness ranks processes only within their session, so nice 19 still takes its core).
- train: `train_model` on the synthetic collection (`retrieval synth`), --preset, --epochs; pairs/s is the
  median of the epochs after the first (the first builds oneDNN's kernels), as the training log reports it.
- index: `build_index` of the synthetic collection (images and captions) with the model the first training row
  wrote; items/s is (n - 1) / (seconds - start-up), the start-up (model load, fingerprint) the faster of two
  1-item builds made after a first (which pays for imports and kernels).
- search: one top-10 query at a time against a flat scan of --search-n random 128-d unit vectors
  (index/scan.py's FlatScan, as flat's combined vectors are scanned): before, FAISS's one thread per query;
  after, the rows split between the cores other processes leave free (threads.FreeCores, renewed once a
  second). queries/s is 1 / the p50 (p99 in the JSON). Not in the default parts.
- search16: the same against flat16's fp16 scan of those vectors (ListScan): before, one FAISS call on one
  thread; after, the lists split between the free cores. Not in the default parts.
The "busy/idle" column divides a row's median by the idle median of the same policy: the target is >= 0.45 with
one of two cores taken. "elsewhere" is the CPU other processes used during the row, in cores (the busy loop
and anything else running): a row beside other jobs is noisy, so run it on a quiet machine and read the medians.
Prints the CPU model (lscpu), the precision that ran (bf16 where oneDNN has bf16 kernels), a table, and writes
JSON. Takes about 2-6 minutes at the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.threads import SETTING, others_busy, our_cores, prepare_openmp, read_sample  # no torch

LOADS = {"idle": None, "nice19": 19, "nice0": 0}  # the busy loop's niceness; None: no loop
POLICIES = {"before": "off", "after": "auto"}  # RETRIEVAL_THREADS for each side
BUSY_LOOP = "import os, time\nos.nice({nice})\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"


def worker(spec: dict) -> dict:
    """One row in this process: what the CLI does first (`prepare_openmp`), then the job, with the cores other
    processes used meanwhile."""
    prepare_openmp()
    cores = our_cores()
    start = read_sample(cores)
    out = search_row(spec) if spec["part"] in ("search", "search16") else model_row(spec)
    end = read_sample(cores)
    out["elsewhere"] = round(others_busy(start, end), 2) if start and end else None
    return out


def model_row(spec: dict) -> dict:
    """A training or indexing row (torch loads here, after `prepare_openmp`)."""
    import torch

    from retrieval.models.encoder import use_bf16

    out = {"torch_threads_at_start": torch.get_num_threads(), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}
    out["bf16_kernels"] = use_bf16(True)
    if spec["part"] == "train":
        from retrieval.jobs.train import train_model

        entries: list[dict] = []
        train_model(
            spec["data"],
            spec["out"],
            preset_name=spec["preset"],
            progress=False,
            epochs=spec["epochs"],
            on_epoch=entries.append,
        )
        rates = [e["pairs_per_s"] for e in entries[1:]] or [entries[0]["pairs_per_s"]]
        out |= {"rate": statistics.median(rates), "epochs": rates, "threads": [e.get("threads") for e in entries]}
        out["precision"] = "bf16" if entries[-1]["bf16"] else "fp32"
    else:
        from retrieval.index.build import BuildOptions, build_index

        options = BuildOptions(progress=False)
        row = json.loads(Path(spec["data"]).read_text().splitlines()[0])
        row["image"] = str(Path(spec["data"]).parent / row["image"])  # the path as the manifest resolves it
        first = Path(spec["out"]) / "one.jsonl"
        first.write_text(json.dumps(row) + "\n")
        build_index(first, spec["model"], Path(spec["out"]) / "warm-up", options)  # imports, first kernels
        # the faster of two: one build beside a busy core can stall for longer than a small collection takes
        startup = min(build_index(first, spec["model"], Path(spec["out"]) / f"one{i}", options).seconds for i in (1, 2))
        report = build_index(spec["data"], spec["model"], Path(spec["out"]) / "all", options)
        assert report.added == spec["n"] and not report.skipped, (report.added, report.skipped[:3])
        if report.seconds <= startup:
            raise SystemExit(f"{spec['n']} items took no longer than 1 ({startup:.2f} s): use a larger --index-n")
        out |= {"rate": (spec["n"] - 1) / (report.seconds - startup), "seconds": report.seconds}
        out |= {"startup_s": startup, "precision": report.precision}
    return out


def search_row(spec: dict) -> dict:
    """One query at a time, top-10, against n random unit vectors: flat's scan of them (index/scan.py's FlatScan,
    as flat's combined vectors are scanned) or, for search16, flat16's fp16 scan (ListScan): queries/s as 1 / the
    p50, after a warm-up pass and a second's pause (the split's count of free cores is renewed once a second:
    the timed pass runs on a count made beside the load). `threads`: the slices a timed query ran on, on average
    (each one past the first is handed to the scan's pool)."""
    import numpy as np

    from retrieval.index import scan as scan_module
    from retrieval.index.faiss_ops import FaissThreads, build_faiss
    from retrieval.threads import SCAN_CHECK_EVERY_S

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((spec["n"], spec["dim"]), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = (vectors[rng.integers(0, spec["n"], spec["queries"])] + 0.5 / np.sqrt(spec["dim"])).astype(np.float32)
    ids = np.arange(spec["n"], dtype=np.int64)
    fp16 = spec["part"] == "search16"
    scan = scan_module.ListScan(build_faiss(vectors, ids, "flat16", {})) if fp16 else scan_module.FlatScan(ids, vectors)
    handed, pool = [], scan_module.scan_pool
    scan_module.scan_pool = lambda: handed.append(1) or pool()  # counts the hand-offs
    with FaissThreads(1):  # as our search path asks for one query (search.search_threads)
        for warm_up in (True, False):
            ms = []
            for q in queries:
                t = time.perf_counter()
                scan.search(q[None], 10)
                ms.append((time.perf_counter() - t) * 1000)
            if warm_up:
                time.sleep(SCAN_CHECK_EVERY_S)
                handed.clear()
    return {
        "rate": 1000 / statistics.median(ms),
        "p99_ms": float(np.percentile(ms, 99)),
        "threads": 1 + len(handed) / len(queries),
        "precision": "fp16" if fp16 else "fp32",
    }


def run_row(spec: dict, policy: str, nice: int | None, timeout: float) -> dict:
    """The row in a fresh process under RETRIEVAL_THREADS=policy, beside a busy loop at `nice` (None: none)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env[SETTING] = policy
    loop = None
    if nice is not None:
        code = BUSY_LOOP.format(nice=nice, seconds=timeout)
        loop = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        time.sleep(0.3)  # running before the row starts
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        if loop is not None:
            loop.kill()
            loop.wait()
    if done.returncode != 0:
        raise SystemExit(f"row {spec['part']} {policy} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """The CPU model (lscpu), its cores, and whether the scheduler groups processes by session (autogroup)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = "unknown"
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    return {
        "cpu": model,
        "cores": len(our_cores()),
        "autogroup": autogroup.read_text().strip() == "1" if autogroup.exists() else None,
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Median and best of each (part, policy, load), and its median against the idle median of that policy."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["part"], r["policy"], r["load"]), []).append(r)
    table = []
    for (part, policy, load), rs in groups.items():
        rates = [r["rate"] for r in rs]
        idle = groups.get((part, policy, "idle"))
        idle_median = statistics.median(r["rate"] for r in idle) if idle else None
        table.append(
            {
                "part": part,
                "policy": policy,
                "load": load,
                "median": statistics.median(rates),
                "best": max(rates),
                "busy_over_idle": statistics.median(rates) / idle_median if idle_median else None,
                "elsewhere": statistics.median(r["elsewhere"] or 0 for r in rs),
                "threads": rs[-1].get("threads"),
                "precision": rs[-1]["precision"],
            }
        )
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="train,index", help="comma-separated: train, index, search, search16")
    p.add_argument("--loads", default="idle,nice19,nice0", help=f"of {', '.join(LOADS)}")
    p.add_argument("--reps", type=int, default=2, help="rows per (part, policy, load), interleaved")
    p.add_argument("--preset", default="default", help="the model preset trained (tiny, default, large, pretrained)")
    p.add_argument("--n", type=int, default=600, help="synthetic scenes to train on (80%% train, 20%% held out)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per training row (the first is not counted)")
    p.add_argument("--index-n", type=int, default=600, help="synthetic scenes per indexing row")
    p.add_argument("--search-n", type=int, default=100_000, help="items in the flat scan a search row asks")
    p.add_argument("--timeout", type=float, default=600, help="seconds a row may take")
    p.add_argument("--work", type=Path, help="folder for data, models and indexes (default: a temporary one)")
    p.add_argument("--json", default="bench_shared.json", help="where to write the rows")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a row, in its own process
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    parts = [s for s in args.parts.split(",") if s]
    loads = [s for s in args.loads.split(",") if s]
    info = machine()
    with tempfile.TemporaryDirectory() as tmp_name:
        work = args.work or Path(tmp_name)
        work.mkdir(parents=True, exist_ok=True)
        from retrieval.data.synth import generate

        train_data = generate(work / "synth", args.n) if {"train", "index"} & set(parts) else None
        index_data = generate(work / "synth-index", args.index_n, seed=1) if "index" in parts else None
        model = work / "model-setup"
        if "index" in parts and "train" not in parts:  # a model to index with: one short training run
            setup = {"part": "train", "data": str(train_data), "out": str(model), "preset": args.preset, "epochs": 1}
            run_row(setup, "auto", None, args.timeout)
        rows: list[dict] = []
        for rep in range(args.reps):
            for part in parts:
                for load in loads:
                    for policy, setting in POLICIES.items():
                        out = work / f"{part}-{load}-{policy}-{rep}"
                        out.mkdir(parents=True, exist_ok=True)
                        if part == "train":
                            spec = {"data": str(train_data), "preset": args.preset, "epochs": args.epochs}
                        elif part in ("search", "search16"):
                            spec = {"n": args.search_n, "dim": 128, "queries": 300}
                        else:
                            spec = {"data": str(index_data), "model": str(model), "n": args.index_n}
                        spec |= {"part": part, "out": str(out / "model" if part == "train" else out)}
                        r = run_row(spec, setting, LOADS[load], args.timeout)
                        if part == "train" and not (model / "config.json").exists():
                            model = out / "model"
                        rows.append({"part": part, "load": load, "policy": policy, "rep": rep, **r})
                        print(
                            f"{part} {load} {policy} rep {rep}: {r['rate']:.1f}/s, "
                            f"elsewhere {r['elsewhere']} cores, threads {r.get('threads', '-')}",
                            file=sys.stderr,
                            flush=True,
                        )
                        Path(args.json).write_text(
                            json.dumps({"args": vars(args), "machine": info, "rows": rows}, indent=2, default=str)
                        )
    table = summarise(rows)
    Path(args.json).write_text(
        json.dumps({"args": vars(args), "machine": info, "rows": rows, "table": table}, indent=2, default=str)
    )
    print(
        f"{info['cpu']}, {info['cores']} cores, autogroup {'on' if info['autogroup'] else 'off'}; "
        f"precision: {', '.join(sorted({r['precision'] for r in rows}))}; {args.reps} rows each (medians)"
    )
    unit = {"train": "pairs/s", "index": "items/s", "search": "queries/s, one at a time"}
    unit["search16"] = unit["search"]
    print(f"{'part':<8} | {'load':<7} | {'policy':<7} | {'median':>8} | {'best':>8} | {'busy/idle':>9} | elsewhere")
    for t in sorted(table, key=lambda t: (parts.index(t["part"]), loads.index(t["load"]), t["policy"] != "before")):
        ratio = f"{t['busy_over_idle']:>9.2f}" if t["load"] != "idle" and t["busy_over_idle"] else " " * 9
        print(
            f"{t['part']:<8} | {t['load']:<7} | {t['policy']:<7} | {t['median']:>8.1f} | {t['best']:>8.1f} | "
            f"{ratio} | {t['elsewhere']:.2f} cores  ({unit[t['part']]})"
        )


if __name__ == "__main__":
    main()
