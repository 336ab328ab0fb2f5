"""Benchmark image indexing with the pretrained image tower: images/s at input sides 224, 192, 160 and 128 px.

    .venv/bin/python scripts/bench_index.py [--model DIR] [--sizes 224,192,160,128] [--batches 16,32,64]
        [--images ../shared/data/flickr8k/images] [--n 512] [--synthetic 1024x768] [--index-batch 256]
        [--reps 5] [--threads N] [--json bench_index.json]

The model is --model (one of ours, e.g. trained with --preset pretrained) or, by default, the zero-shot model
(EfficientNet-Lite0 + MiniLM) written to a temporary folder. Each input side runs a copy of it whose config says
that side (its weights linked, not copied): EfficientNet runs at any side, and build_index takes a model folder.
For each side:
- forward bound: the image side's forward pass alone on a ready batch (image_features, no decoding): fp32 in the
  default layout, fp32 channels_last, and bf16 autocast channels_last where the CPU has bf16 kernels; --batches at
  224 px, and at every side the chunk encode_image runs (the index batch, at most its batch_size default);
- decode: build_index's decoding of the --n images (read, hash, decode, preprocess) on its two threads alone;
- build_index: the whole path (list, hash, decode, encode, commit, FAISS) on the first --n images of --images
  (skipped with a message when the folder is missing) and of --synthetic WxH JPEGs, in fp32 and bf16, with and
  without prefetch (decoding the next batch during this one's forward pass). images/s is the marginal rate:
  (n - 1) / (seconds - start-up), the start-up (fingerprint, model load) being a 1-image build, shown on its own.
  'vs bound' divides by the channels_last forward bound of the same side, precision and batch.
Prints a table and writes JSON with the CPU model, torch version, threads and bf16 support.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.data.pairs import IMAGE_SUFFIXES, Pair
from retrieval.index.build import BuildOptions, build_index, decode_batch
from retrieval.models.encoder import Encoder, use_bf16
from retrieval.models.load import load_model

ENCODE_CHUNK = inspect.signature(Encoder.encode_image).parameters["batch_size"].default  # encode_image's batches


def machine() -> dict:
    """The CPU (model name and the vector flags that decide bf16 speed), torch, its threads, bf16 support."""
    first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu if ":" in line)}
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in fields.get("flags", "").split()]
    return {
        "cpu": fields.get("model name") or platform.processor(),
        "flags": flags,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16_kernels": use_bf16(True),
    }


def sized_model(base: Path, size: int, tmp: Path) -> Path:
    """A model folder like `base` whose image input side is `size`: config.json rewritten, the rest linked."""
    out = tmp / f"model-{size}"
    out.mkdir()
    for f in base.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((base / "config.json").read_text())
    config["model"]["image"]["image_size"] = size
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def forward_rate(model: Encoder, size: int, batch: int, channels_last: bool, bf16: bool, reps: int) -> float:
    """Images/s of image_features on a ready (batch, 3, size, size) input: the median of `reps` timed batches,
    after one warm-up batch (oneDNN builds its kernels for a new shape on the first)."""
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(reps + 1):
            t = time.perf_counter()
            model.image_features(x)
            times.append(time.perf_counter() - t)
    return batch / float(np.median(times[1:]))


def decode_rate(model: Encoder, files: list[Path]) -> float:
    """Images/s of build_index's decoding alone (read, hash, decode, preprocess) on its two threads."""
    t = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        [f.result() for f in decode_batch(model, [Pair(f.name, f, ()) for f in files], pool)]
    return len(files) / (time.perf_counter() - t)


def synthetic_jpegs(folder: Path, n: int, width: int, height: int) -> list[Path]:
    """n photo-like JPEGs (smooth colour fields with grain, quality 90), so decoding costs what a photo costs."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        files.append(folder / f"{i:05d}.jpg")
        Image.fromarray(pixels).save(files[-1], quality=90)
    return files


def manifest(files: list[Path], path: Path) -> Path:
    """A JSONL manifest of image-only items: a subset of a folder without copying it."""
    path.write_text("".join(json.dumps({"id": f.name, "image": str(f.resolve())}) + "\n" for f in files))
    return path


def row(
    size: int, path: str, precision: str, batch: int | str, rate: float | None, bound: float | None = None, **extra
) -> dict:
    return {
        "size": size,
        "path": path,
        "precision": precision,
        "batch": batch,
        "images_per_s": rate,
        "vs_bound": rate / bound if rate and bound else None,
        **extra,
    }


def bench_size(size: int, args, sources: dict[str, list[Path]], precisions: list[str], tmp: Path) -> list[dict]:
    model_dir = sized_model(args.model, size, tmp)
    model = load_model(model_dir)
    chunk = min(args.index_batch, ENCODE_CHUNK)
    batches = sorted({*(args.batches if size == 224 else ()), chunk})
    rows, bound = [], {}
    for batch in batches:
        rows.append(row(size, "forward", "fp32", batch, forward_rate(model, size, batch, False, False, args.reps)))
        for precision in precisions:
            bound[precision, batch] = forward_rate(model, size, batch, True, precision == "bf16", args.reps)
            rows.append(row(size, "forward channels_last", precision, batch, bound[precision, batch]))
    for i, (name, files) in enumerate(sources.items()):
        rows.append(row(size, f"decode {name}", "-", "-", decode_rate(model, files)))
        work = tmp / f"source{i}-{size}"
        work.mkdir()
        start = build_index(
            manifest(files[:1], work / "one.jsonl"),
            model_dir,
            work / "one",
            BuildOptions(progress=False),
            precision="fp32",
        ).seconds
        rows.append(row(size, f"index {name}: start-up", "fp32", 1, None, seconds=start))
        items = manifest(files, work / "all.jsonl")
        for precision in precisions:
            for prefetch in (True, False):
                r = build_index(
                    items,
                    model_dir,
                    work / f"{precision}-{prefetch}",
                    BuildOptions(batch_size=args.index_batch, progress=False),
                    precision=precision,
                    prefetch=prefetch,
                )
                assert r.added == len(files) and not r.skipped, (r.added, r.skipped[:3])
                rate = (len(files) - 1) / max(r.seconds - start, 1e-9)
                rows.append(
                    row(
                        size,
                        f"index {name}" + ("" if prefetch else " (no prefetch)"),
                        r.precision,
                        args.index_batch,
                        rate,
                        bound[precision, chunk],
                        seconds=r.seconds,
                    )
                )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=Path, help="a model folder with a pretrained image tower (default: the zero-shot model)"
    )
    p.add_argument("--sizes", default="224,192,160,128", help="comma-separated input sides in pixels")
    p.add_argument("--batches", default="16,32,64", help="forward-bound batch sizes at 224 px")
    p.add_argument(
        "--images",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/flickr8k/images",
        help="a folder of real photos; its first --n images are indexed",
    )
    p.add_argument("--n", type=int, default=512, help="images per build_index run")
    p.add_argument("--synthetic", help="also index --n synthetic JPEGs of this size, e.g. 1024x768")
    p.add_argument("--index-batch", type=int, default=256, help="build_index batch_size (the CLI's default)")
    p.add_argument("--reps", type=int, default=5, help="timed batches per forward-bound row")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", default="bench_index.json", help="where to write the rows")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    precisions = ["fp32", "bf16"] if info["bf16_kernels"] else ["fp32"]
    if not info["bf16_kernels"]:
        print("this CPU has no bf16 kernels (bf16 would be emulated, ~8x slower): fp32 only", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model is None:
            from retrieval.models.zeroshot import build_zeroshot

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            args.model = build_zeroshot(tmp / "zeroshot")
        sources = {}
        if args.images.is_dir():
            files = sorted(f for f in args.images.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[: args.n]
            sources[f"{args.images.parent.name}/{args.images.name}"] = files
        else:
            print(f"no folder {args.images}: skipping the real-photo rows (pass --images DIR)", file=sys.stderr)
        if args.synthetic:
            width, height = (int(v) for v in args.synthetic.lower().split("x"))
            sources[f"synthetic {width}x{height}"] = synthetic_jpegs(tmp / "synthetic", args.n, width, height)
        for files in sources.values():
            for f in files:  # into the page cache: the first row should not pay for the disk
                f.read_bytes()
        for size in args.sizes:
            rows += bench_size(size, args, sources, precisions, tmp)
            Path(args.json).write_text(
                json.dumps({"args": vars(args), "machine": info, "rows": rows}, indent=2, default=str)
            )
            print(f"done {size} px", file=sys.stderr, flush=True)
    print(
        f"{info['cpu']} ({' '.join(info['flags'])}), {info['cores']} cores, "
        f"torch {info['torch']} on {info['threads']} threads, "
        f"bf16 kernels: {'yes' if info['bf16_kernels'] else 'no'}"
    )
    print(f"{'size':>5} | {'path':<40} | {'precision':<9} | {'batch':>5} | {'images/s':>8} | {'vs bound':>8}")
    for r in rows:
        rate = f"{r['images_per_s']:>8.1f}" if r["images_per_s"] else f"{r['seconds']:>6.2f} s"
        vs = f"{r['vs_bound']:>8.2f}" if r["vs_bound"] else " " * 8
        print(f"{r['size']:>5} | {r['path']:<40} | {r['precision']:<9} | {r['batch']:>5} | {rate:>8} | {vs}")


if __name__ == "__main__":
    main()
