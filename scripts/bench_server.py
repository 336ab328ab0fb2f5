"""Loopback load test of `retrieval serve`, and what a kill -9 during load does to the index on disk.

    .venv/bin/python scripts/bench_server.py [--n 100000] [--clients 32] [--seconds 20] [--like-every 10]
        [--model index_data/demo/model] [--index PATH] [--index-type flat] [--max-batch 1 64] [--kill-test]
        [--target item] [--no-image-every 0] [--out bench_server.json]

Builds an index of --n items (clustered random unit vectors of the model's dimension, so the model's
fingerprint matches and text queries run the real text tower), or takes --index as it is. Starts the
server as a subprocess, then runs --clients concurrent keep-alive clients for --seconds (after a short
unmeasured warm-up): text queries drawn from the synthetic captions' vocabulary, every --like-every-th a
`like=` query. The clients are a few lines of asyncio over raw sockets, so they take little of the CPU
they share with the server. Prints a table (QPS, p50/p90/p99/max latency, errors, the mean number of
requests a FAISS call answered) and writes JSON. It runs the load once per `serve --max-batch` given, on a
fresh server each time and the same requests in the same order: 1 (each search its own FAISS call, as
before issue 16) beside 64 (concurrent searches batched), side by side. --target image with --no-image-every
10 asks for images in a collection where every tenth item is a caption alone, which the search leaves out.

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
import platform
import random
import re
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
def build(path: Path, model: Path, n: int, index_type: str, no_image_every: int = 0) -> None:
    """n items, each an image vector and a caption vector (every no_image_every-th a caption alone), committed in
    batches as indexing does."""
    image, text = embeddings(n, read_model_config(model).embed_dim, seed=0)
    store = make_store(path, image, text, str(model.resolve()), fingerprint(model), no_image_every)
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


def start_server(
    index: Path, port: int, log: Path, started: list[subprocess.Popen], max_batch: int = 64
) -> tuple[subprocess.Popen, float]:
    """The real command; returns once /api/health answers, with the seconds that took. Kept in `started`,
    so the caller kills every server it started, whatever fails."""
    t0 = time.perf_counter()
    exe = Path(sys.executable).parent / "retrieval"
    command = [str(exe), "serve", "--index", str(index), "--port", str(port), "--max-batch", str(max_batch)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
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
BATCH = re.compile(rb'"batch":(\d+)')  # the requests the FAISS call that answered this one answered


class Load:
    """Requests in a fixed order shared by all clients; one (kind, ms, ok, batch) record per answered request."""

    def __init__(self, texts: list[str], item_ids: list[str], like_every: int, seed: int, target: str = "item"):
        self.texts, self.item_ids, self.like_every, self.target = texts, item_ids, like_every, target
        self.rng, self.count = random.Random(seed), 0
        self.records: list[tuple[str, float, bool, int]] = []
        self.failed_connections = 0

    def next_request(self) -> tuple[str, bytes]:
        self.count += 1
        if self.like_every and self.count % self.like_every == 0:
            kind, params = "like", {"like": self.rng.choice(self.item_ids), "k": 10, "target": self.target}
        else:
            kind, params = "text", {"q": self.texts[self.count % len(self.texts)], "k": 10, "target": self.target}
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
                body = await reader.readexactly(length)
                if t0 >= measure_from:
                    ms, ok, batch = (
                        1000 * (time.perf_counter() - t0),
                        head.startswith(b"HTTP/1.1 200"),
                        BATCH.search(body),
                    )
                    self.records.append((kind, ms, ok, int(batch[1]) if batch else 0))
        except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
            self.failed_connections += 1  # the server went away (the kill test) or broke the protocol
        finally:
            writer.close()

    async def run(self, port: int, clients: int, seconds: float, warmup: float, server: int | None = None) -> dict:
        """The load; with the server's pid, the CPU seconds it used while measured: all its threads, and the
        event loop's (uvicorn's main thread), which parses and answers every request."""
        start = time.perf_counter()
        load = asyncio.gather(*(self.client(port, start + warmup + seconds, start + warmup) for _ in range(clients)))
        if server is None:  # the kill test: the clients end when the server dies
            await load
            return {}
        await asyncio.sleep(warmup)
        before = cpu_seconds(server)
        await asyncio.sleep(seconds)
        after = cpu_seconds(server)
        await load
        return {name: after[name] - before[name] for name in after}


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of a process and of its main thread, from /proc (Linux); {} elsewhere."""
    try:
        fields = {
            name: Path(f"/proc/{pid}{task}/stat").read_text().rsplit(")", 1)[1].split()
            for name, task in (("server", ""), ("loop", f"/task/{pid}"))
        }
    except OSError:
        return {}
    return {name: (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK") for name, f in fields.items()}


def summary(records: list[tuple[str, float, bool, int]], seconds: float, max_batch: int, cpu: dict) -> list[dict]:
    """Per kind of query; the CPU per request (server, event loop) on the row of all requests."""
    rows = []
    for kind in ("all", "text", "like"):
        mine = [r for r in records if kind in ("all", r[0])]
        if not mine:
            continue
        ms = np.array([r[1] for r in mine])
        rows.append(
            {
                "max_batch": max_batch,
                "kind": kind,
                "requests": len(ms),
                "qps": len(ms) / seconds,
                "p50_ms": float(np.percentile(ms, 50)),
                "p90_ms": float(np.percentile(ms, 90)),
                "p99_ms": float(np.percentile(ms, 99)),
                "max_ms": float(ms.max()),
                "errors": sum(not r[2] for r in mine),
                "mean_batch": float(np.mean([r[3] for r in mine if r[2]] or [0])),
                **{f"{name}_cpu_ms": 1000 * s / len(mine) for name, s in cpu.items() if kind == "all"},
            }
        )
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        f"  {'max-batch':>9}  {'queries':<8}{'requests':>10}{'QPS':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'errors':>8}{'batch':>7}{'CPU ms':>8}{'loop ms':>8}"
    )
    for r in rows:
        print(
            f"  {r['max_batch']:>9}  {r['kind']:<8}{r['requests']:>10}{r['qps']:>9.1f}{r['p50_ms']:>9.1f}"
            f"{r['p90_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}{r['errors']:>8}{r['mean_batch']:>7.1f}"
            + "".join(
                f"{r[f'{name}_cpu_ms']:>8.2f}" if f"{name}_cpu_ms" in r else f"{'':>8}" for name in ("server", "loop")
            )
        )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


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
    p.add_argument("--index-type", default="flat", choices=("flat", "flat16", "hnsw", "ivf"))
    p.add_argument(
        "--max-batch",
        type=int,
        nargs="+",
        default=[1, 64],
        help="the server's --max-batch, one run each (1: each search its own FAISS call, as before batching)",
    )
    p.add_argument("--kill-test", action="store_true", help="kill -9 the server half way, check the index, restart")
    p.add_argument(
        "--target",
        default="item",
        choices=("item", "image", "text"),
        help="what every request matches (image: with --no-image-every, the search leaves those items out)",
    )
    p.add_argument("--no-image-every", type=int, default=0, help="in the index it builds, every Nth item has no image")
    p.add_argument("--out", default="bench_server.json")
    args = p.parse_args()
    if args.index and args.no_image_every:
        p.error("--no-image-every shapes the index it builds: not with --index")

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
            build(index_path, model, args.n, args.index_type, args.no_image_every)
            print(f"built a {args.n:,}-item {args.index_type} index in {time.perf_counter() - t:.1f} s")
        store = IndexStore.open(index_path)
        item_ids = store.id_table()[1]  # "more like this" on ids the index really has
        n_items, index_type = len(item_ids), store.manifest.index_type
        likes = random.Random(0).sample(item_ids, min(1000, n_items))
        report: dict = {"args": vars(args), "items": n_items, "index_type": index_type, "cpus": os.cpu_count()}
        report["cpu"] = cpu_model()
        log, started = tmp / "server.log", []
        try:
            if args.kill_test:
                load = Load(text_queries(0), likes, args.like_every, seed=1, target=args.target)
                report["kill_test"] = kill_test(args, load, index_path, free_port(), log, started)
            else:
                report["load"], report["startup_s"] = [], {}
                for max_batch in args.max_batch:  # the same requests in the same order, on a fresh server each
                    load = Load(text_queries(0), likes, args.like_every, seed=1, target=args.target)
                    port = free_port()
                    server, startup_s = start_server(index_path, port, log, started, max_batch)
                    print(f"server (--max-batch {max_batch}) up in {startup_s:.1f} s; load: {args.clients} clients")
                    cpu = asyncio.run(load.run(port, args.clients, args.seconds, args.warmup, server.pid))
                    report["load"] += summary(load.records, args.seconds, max_batch, cpu)
                    report["startup_s"][max_batch] = startup_s
                    report["failed_connections"] = report.get("failed_connections", 0) + load.failed_connections
                    stop(started)
                print_table(f"{args.seconds:g} s on {n_items:,} items ({index_type}), {report['cpu']}", report["load"])
        finally:
            stop(started)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    if any(r["errors"] for r in report.get("load", [])) or not report.get("kill_test", {"ok": True})["ok"]:
        sys.exit(1)


def stop(started: list[subprocess.Popen]) -> None:
    while started:
        proc = started.pop()
        proc.kill()
        proc.wait()


def kill_test(args, load: Load, index_path: Path, port: int, log: Path, started: list[subprocess.Popen]) -> dict:
    """With the last --max-batch given."""
    max_batch = args.max_batch[-1]
    server, startup_s = start_server(index_path, port, log, started, max_batch)
    print(f"server (--max-batch {max_batch}) up in {startup_s:.1f} s; load: {args.clients} clients")
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
    first, in_flight = summary(load.records, half, max_batch, {}), load.failed_connections
    print_table(f"{half:g} s of load, then kill -9 ({in_flight} connections cut mid-request)", first)
    same_files = file_hashes(index_path) == hashes
    same_counts = Index.open(index_path).info()["counts"] == counts
    _, restart_s = start_server(index_path, port, log, started, max_batch)
    same_answers = answers(port, fixed) == before
    after = Load(load.texts, load.item_ids, load.like_every, seed=2)
    asyncio.run(after.run(port, args.clients, half, args.warmup))
    second = summary(after.records, half, max_batch, {})
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
