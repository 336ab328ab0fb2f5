"""Loopback load test of `retrieval serve`, and what a kill -9 during load does to the index on disk.

    .venv/bin/python scripts/bench_server.py [--n 100000] [--clients 32] [--seconds 20] [--like-every 10]
        [--model index_data/demo/model] [--index PATH] [--index-type flat] [--kill-test] [--out bench_server.json]

Builds an index of --n items (clustered random unit vectors of the model's dimension, so the model's
fingerprint matches and text queries run the real text tower), or takes --index as it is. Starts the
server as a subprocess, then runs --clients concurrent keep-alive clients for --seconds (after a short
unmeasured warm-up): text queries drawn from the synthetic captions' vocabulary, every --like-every-th a
`like=` query. The clients are a few lines of asyncio over raw sockets, so they take little of the CPU
they share with the server. Prints a table (QPS, p50/p90/p99/max latency, errors) and writes JSON.

--kill-test: record the answers to 20 fixed queries and the sha256 of the index files; run the load and
kill -9 the server half way through; check the files are byte-identical and the index opens with the
same counts; restart the server, check the 20 queries give the same answers (ids and scores, exactly),
and run the second half of the load on the restarted server. The server writes no index file (only
thumbnails), so this shows that a kill loses nothing and a restart answers as before; a kill -9 of a
*writer* (`retrieval index`) is tested in tests/test_index.py.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_search import embeddings, make_store  # noqa: E402

from retrieval.data.synth import COLOURS, SHAPES, SIZES  # noqa: E402
from retrieval.index.handle import Index  # noqa: E402
from retrieval.index.store import IndexStore  # noqa: E402
from retrieval.models.modeldir import fingerprint, read_model_config  # noqa: E402

INDEX_FILES = (
    "items.sqlite",
    "vectors.faiss",
    "fids.npy",
    "vectors.npy",
    "records.jsonl",
    "records.npy",
    "manifest.json",
)


# --- the index ------------------------------------------------------------------------------------
def build(path: Path, model: Path, n: int, index_type: str) -> None:
    """n items, each an image vector and a caption vector, committed in batches as indexing does."""
    image, text = embeddings(n, read_model_config(model).embed_dim, seed=0)
    store = make_store(path, image, text, str(model.resolve()), fingerprint(model))
    store.manifest.index_type = index_type
    store.rebuild()


def text_queries(seed: int) -> list[str]:
    """Distinct captions in the synthetic collection's words: 'a small red circle left of a large blue star'."""
    rng = random.Random(seed)
    objects = [f"{size} {colour} {shape}" for size in SIZES for colour in COLOURS for shape in SHAPES]
    queries = {f"a {o} {w}" for o in objects for w in ("on the left", "on the right", "at the top", "at the bottom")}
    while len(queries) < 2000:
        a, b = rng.sample(objects, 2)
        queries.add(f"a {a} {rng.choice(['left of', 'right of', 'above', 'below'])} a {b}")
    out = sorted(queries)
    rng.shuffle(out)
    return out


def file_hashes(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in INDEX_FILES}


# --- the server -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, log: Path, started: list[subprocess.Popen]) -> tuple[subprocess.Popen, float]:
    """The real command; returns once /api/health answers, with the seconds that took. Kept in `started`,
    so the caller kills every server it started, whatever fails."""
    t0 = time.perf_counter()
    exe = Path(sys.executable).parent / "retrieval"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(exe), "serve", "--index", str(index), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    started.append(proc)
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}; its log:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)


def answers(port: int, paths: list[str]) -> list[list[tuple[str, float]]]:
    out = []
    for path in paths:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            out.append([(h["id"], h["score"]) for h in json.loads(r.read())["results"]])
    return out


# --- the clients ----------------------------------------------------------------------------------
class Load:
    """Requests in a fixed order shared by all clients; one (kind, ms, ok) record per answered request."""

    def __init__(self, texts: list[str], item_ids: list[str], like_every: int, seed: int):
        self.texts, self.item_ids, self.like_every = texts, item_ids, like_every
        self.rng, self.count = random.Random(seed), 0
        self.records: list[tuple[str, float, bool]] = []
        self.failed_connections = 0

    def next_request(self) -> tuple[str, bytes]:
        self.count += 1
        if self.like_every and self.count % self.like_every == 0:
            kind, params = "like", {"like": self.rng.choice(self.item_ids), "k": 10}
        else:
            kind, params = "text", {"q": self.texts[self.count % len(self.texts)], "k": 10}
        return kind, f"GET /api/search?{urlencode(params)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    async def client(self, port: int, until: float, measure_from: float) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            self.failed_connections += 1
            return
        try:
            while time.perf_counter() < until:
                kind, request = self.next_request()
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                await reader.readexactly(length)
                if t0 >= measure_from:
                    self.records.append((kind, 1000 * (time.perf_counter() - t0), head.startswith(b"HTTP/1.1 200")))
        except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
            self.failed_connections += 1  # the server went away (the kill test) or broke the protocol
        finally:
            writer.close()

    async def run(self, port: int, clients: int, seconds: float, warmup: float) -> None:
        start = time.perf_counter()
        await asyncio.gather(*(self.client(port, start + warmup + seconds, start + warmup) for _ in range(clients)))


def summary(records: list[tuple[str, float, bool]], seconds: float) -> list[dict]:
    rows = []
    for kind in ("all", "text", "like"):
        ms = np.array([m for k, m, _ in records if kind in ("all", k)])
        if not len(ms):
            continue
        errors = sum(not ok for k, _, ok in records if kind in ("all", k))
        rows.append(
            {
                "kind": kind,
                "requests": len(ms),
                "qps": len(ms) / seconds,
                "p50_ms": float(np.percentile(ms, 50)),
                "p90_ms": float(np.percentile(ms, 90)),
                "p99_ms": float(np.percentile(ms, 99)),
                "max_ms": float(ms.max()),
                "errors": errors,
            }
        )
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        f"  {'queries':<8}{'requests':>10}{'QPS':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"
    )
    for r in rows:
        print(
            f"  {r['kind']:<8}{r['requests']:>10}{r['qps']:>9.1f}{r['p50_ms']:>9.1f}{r['p90_ms']:>9.1f}"
            f"{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}{r['errors']:>8}"
        )


# --- the run --------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="items in the index it builds")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--like-every", type=int, default=10, help="every Nth request is a like= query (0: none)")
    p.add_argument("--model", default=str(ROOT / "index_data/demo/model"), help="model directory (for text queries)")
    p.add_argument("--index", help="an existing index to serve as it is (default: build one of --n items)")
    p.add_argument("--index-type", default="flat", choices=("flat", "hnsw", "ivf"))
    p.add_argument("--kill-test", action="store_true", help="kill -9 the server half way, check the index, restart")
    p.add_argument("--out", default="bench_server.json")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.index:
            index_path = Path(args.index)
        else:
            model = Path(args.model)
            if not (model / "config.json").is_file():
                sys.exit(f"no model at {model}: run `bash scripts/demo.sh` to train one, or pass --model DIR")
            index_path = tmp / "index"
            t = time.perf_counter()
            build(index_path, model, args.n, args.index_type)
            print(f"built a {args.n:,}-item {args.index_type} index in {time.perf_counter() - t:.1f} s")
        item_ids = IndexStore.open(index_path).id_table()[1]  # "more like this" on ids the index really has
        n_items = len(item_ids)
        load = Load(text_queries(0), random.Random(0).sample(item_ids, min(1000, n_items)), args.like_every, seed=1)
        port, log, started = free_port(), tmp / "server.log", []
        try:
            _, startup_s = start_server(index_path, port, log, started)  # the server is in `started`, killed below
            print(f"server up in {startup_s:.1f} s (model and index loaded, warmed); load: {args.clients} clients")
            report: dict = {"args": vars(args), "items": n_items, "cpus": os.cpu_count(), "startup_s": startup_s}
            if not args.kill_test:
                asyncio.run(load.run(port, args.clients, args.seconds, args.warmup))
                report["load"] = summary(load.records, args.seconds)
                report["failed_connections"] = load.failed_connections
                print_table(f"{args.seconds:g} s on {n_items:,} items", report["load"])
            else:
                report["kill_test"] = kill_test(args, load, index_path, port, log, started)
        finally:
            for proc in started:
                proc.kill()
                proc.wait()
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    if any(r["errors"] for r in report.get("load", [])) or not report.get("kill_test", {"ok": True})["ok"]:
        sys.exit(1)


def kill_test(args, load: Load, index_path: Path, port: int, log: Path, started: list[subprocess.Popen]) -> dict:
    server = started[-1]
    fixed = [f"/api/search?{urlencode({'q': q, 'k': 10})}" for q in load.texts[:15]]
    fixed += [f"/api/search?{urlencode({'like': item_id, 'k': 10})}" for item_id in load.item_ids[:5]]
    before, hashes, counts = answers(port, fixed), file_hashes(index_path), Index.open(index_path).info()["counts"]
    half = args.seconds / 2

    async def load_then_kill() -> None:
        running = asyncio.ensure_future(load.run(port, args.clients, half + 60, args.warmup))
        await asyncio.sleep(args.warmup + half)
        os.kill(server.pid, signal.SIGKILL)  # mid-load: requests are in flight
        await running

    asyncio.run(load_then_kill())
    server.wait()
    first, in_flight = summary(load.records, half), load.failed_connections
    print_table(f"{half:g} s of load, then kill -9 ({in_flight} connections cut mid-request)", first)
    same_files = file_hashes(index_path) == hashes
    same_counts = Index.open(index_path).info()["counts"] == counts
    _, restart_s = start_server(index_path, port, log, started)
    same_answers = answers(port, fixed) == before
    after = Load(load.texts, load.item_ids, load.like_every, seed=2)
    asyncio.run(after.run(port, args.clients, half, args.warmup))
    second = summary(after.records, half)
    print_table(f"{half:g} s after the restart ({restart_s:.1f} s to restart)", second)
    ok = same_files and same_counts and same_answers and not any(r["errors"] for r in first + second)
    print(
        f"\nkill -9 during load: index files byte-identical: {same_files}; counts {counts} unchanged: {same_counts}; "
        f"the {len(fixed)} fixed queries give the same answers after the restart: {same_answers}"
    )
    return {
        "ok": ok,
        "files_identical": same_files,
        "counts_unchanged": same_counts,
        "same_answers": same_answers,
        "counts": counts,
        "connections_cut": in_flight,
        "restart_s": restart_s,
        "before_kill": first,
        "after_restart": second,
    }


if __name__ == "__main__":
    main()
