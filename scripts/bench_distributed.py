"""Benchmark the distributed path: Ray against one process on the same collection, and the shard merge.

    .venv/bin/python scripts/bench_distributed.py [--images 10000] [--size 64] [--model DIR | --preset default]
        [--shard-size 1000] [--vectors 1000000] [--shards 10] [--dim 128] [--parts throughput,merge]
        [--work /tmp/bench_distributed] [--out bench_distributed.json]

throughput: `retrieval synth --n IMAGES --size SIZE` once, then the same collection indexed by
`build_index` (one process, torch on every core) and by `build_index_ray` (Ray started on this machine
with every core, one single-threaded actor per core). Reports images/s of each, Ray's start-up time, and
its overhead (Ray total minus one-process total). Without --model, an untrained model of --preset
encodes (encoding costs the same as with trained weights).

merge: VECTORS random items (fused vectors of 2 x DIM) written as SHARDS shards, then merged into a new
IVF index twice, in memory and on disk, each in a fresh process so that its peak RSS is its own. Reports
seconds per phase (metadata into SQLite, IVF training, add + merge, derived files), per shard, and the
peak RSS. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.index.format import Item, Manifest
from retrieval.index.store import IndexStore


def throughput(work: Path, images: int, size: int, model: str | None, preset_name: str, shard_size: int) -> dict:
    import ray
    import torch

    from retrieval.data.synth import generate
    from retrieval.index.build import BuildOptions, build_index, list_source
    from retrieval.scale.ray import build_index_ray

    manifest = work / f"synth-{images}-{size}" / "pairs.jsonl"
    if not manifest.is_file():
        generate(manifest.parent, images, seed=0, size=size)
    if model is None:
        from retrieval.models.config import preset
        from retrieval.models.dual_encoder import save_model
        from retrieval.train.build import build_model

        p = preset(preset_name)
        model = str(
            save_model(
                build_model(p.model, p.train, list_source(manifest), None, None, None), work / f"model-{preset_name}"
            )
        )
    cores = torch.get_num_threads()
    for name in ("local", "ray"):
        shutil.rmtree(work / f"index-{name}", ignore_errors=True)
    t0 = time.perf_counter()
    local = build_index(manifest, model, work / "index-local", BuildOptions(progress=False))
    local_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    startup_s = time.perf_counter() - t0
    try:
        distributed = build_index_ray(
            manifest, model, work / "index-ray", BuildOptions(progress=False), shard_size=shard_size
        )
    finally:
        ray.shutdown()
    ray_s = time.perf_counter() - t0
    n = local.added
    return {
        "images": n,
        "size": size,
        "model": model,
        "cores": cores,
        "shard_size": shard_size,
        "local_s": local_s,
        "local_images_per_s": n / local_s,
        "local_index": local.index_type,
        "ray_startup_s": startup_s,
        "ray_s": ray_s,
        "ray_images_per_s": distributed.added / ray_s,
        "ray_overhead_s": ray_s - local_s,
        "ray_index": distributed.index_type,
    }


def write_random_shards(directory: Path, n: int, shards: int, dim: int) -> list[str]:
    """n items of random unit image and caption vectors, as `shards` shards (reused when already there)."""
    from retrieval.scale.shards import is_done, write_shard

    names = [f"shard-{k:06d}" for k in range(shards)]
    bounds = np.linspace(0, n, shards + 1).astype(int)
    rng = np.random.default_rng(0)
    for name, a, b in zip(names, bounds[:-1], bounds[1:], strict=True):
        if is_done(directory, name):
            continue
        x = rng.standard_normal((b - a, 2 * dim)).astype(np.float32)
        x[:, :dim] /= np.linalg.norm(x[:, :dim], axis=1, keepdims=True)
        x[:, dim:] /= np.linalg.norm(x[:, dim:], axis=1, keepdims=True)
        items = [Item(0, f"item{j}", f"/images/{j}.jpg", [f"caption {j}"], f"img:{j}", f"txt:{j}") for j in range(a, b)]
        write_shard(directory, name, items, x, [])
    return names


def merge_once(shard_dir: Path, names: list[str], dim: int, on_disk: bool, index: Path) -> dict:
    """One merge into a new index (run in its own process by `merge`, for a clean peak RSS)."""
    from retrieval.scale.merge import merge_shards

    shutil.rmtree(index, ignore_errors=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    store = IndexStore.create(index, Manifest("bench", "bench", dim, "ivf"))
    with store.writer():
        r = merge_shards(store, shard_dir, names, on_disk=on_disk)
    files = sum(p.stat().st_size for p in index.iterdir() if p.is_file())
    return {
        "on_disk": on_disk,
        "seconds": r.seconds,
        "per_shard_s": r.seconds / len(names),
        "phases": r.phases,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        "rss_before_mb": rss_before,
        "faiss_mb": (index / "vectors.faiss").stat().st_size / 2**20,
        "ivfdata_mb": sum(p.stat().st_size for p in index.glob("*.ivfdata")) / 2**20,
        "index_folder_mb": files / 2**20,
    }


def merge(work: Path, n: int, shards: int, dim: int) -> list[dict]:
    shard_dir = work / f"random-{n}-{shards}-{dim}"
    t0 = time.perf_counter()
    write_random_shards(shard_dir, n, shards, dim)
    write_s = time.perf_counter() - t0
    rows = []
    for on_disk in (False, True):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--merge-once",
                str(shard_dir),
                "--dim",
                str(dim),
                "--shards",
                str(shards),
                "--work",
                str(work),
            ]
            + (["--on-disk"] if on_disk else []),
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(
            {
                "vectors": n,
                "shards": shards,
                "dim2": 2 * dim,
                "write_shards_s": write_s,
                **json.loads(done.stdout.splitlines()[-1]),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", help="model directory (default: an untrained --preset model)")
    p.add_argument("--preset", default="default")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--dim", type=int, default=128, help="embedding size d; FAISS holds 2d-dimensional fused vectors")
    p.add_argument("--parts", default="throughput,merge")
    p.add_argument("--work", default="/tmp/bench_distributed")
    p.add_argument("--out", default="bench_distributed.json")
    p.add_argument("--merge-once", help=argparse.SUPPRESS)  # internal: one merge in a fresh process
    p.add_argument("--on-disk", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.merge_once:
        names = sorted(f.stem for f in Path(a.merge_once).glob("shard-*.json"))[: a.shards]
        print(json.dumps(merge_once(Path(a.merge_once), names, a.dim, a.on_disk, work / "merged")))
        return
    parts = a.parts.split(",")
    result: dict = {}
    if "throughput" in parts:
        t = result["throughput"] = throughput(work, a.images, a.size, a.model, a.preset, a.shard_size)
        print(f"throughput, {t['images']} images of {t['size']} px on {t['cores']} cores:")
        print(f"  one process: {t['local_s']:.1f} s, {t['local_images_per_s']:.0f} images/s ({t['local_index']})")
        print(
            f"  ray:         {t['ray_s']:.1f} s, {t['ray_images_per_s']:.0f} images/s ({t['ray_index']}; "
            f"start-up {t['ray_startup_s']:.1f} s; overhead {t['ray_overhead_s']:+.1f} s)"
        )
    if "merge" in parts:
        rows = result["merge"] = merge(work, a.vectors, a.shards, a.dim)
        print(f"merge, {a.vectors:,} vectors of {2 * a.dim} dims in {a.shards} shards:")
        print("  where      total s  per shard s  metadata  train  add+merge  files  peak RSS MB  faiss MB  ivfdata MB")
        for r in rows:
            ph = r["phases"]
            print(
                f"  {'on disk' if r['on_disk'] else 'in memory':<9} {r['seconds']:8.1f} {r['per_shard_s']:12.2f} "
                f"{ph['metadata']:9.1f} {ph['train']:6.1f} {ph['add_and_merge']:10.1f} {ph['files']:6.1f} "
                f"{r['peak_rss_mb']:12.0f} {r['faiss_mb']:9.0f} {r['ivfdata_mb']:11.0f}"
            )
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
