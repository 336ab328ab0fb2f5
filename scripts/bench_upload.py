"""The server's memory under concurrent image uploads: its RSS before, at peak and after, per kind of image.

    .venv/bin/python scripts/bench_upload.py [--clients 8] [--rounds 3] [--megapixels 39.6]
        [--model DIR] [--index PATH] [--out bench_upload.json]

Makes the uploads a hostile client would send: a 16-bit greyscale PNG and an 8-bit RGB PNG of the same size
(just under the server's 40-megapixel bound, and only tens of KB each, since a flat image compresses to
nothing), then a small JPEG photo-sized image as the everyday case. For each kind, starts a fresh server
(`retrieval serve`, the real command), has --clients threads each upload it --rounds times at once, and
samples the server's RSS from /proc every 10 ms. Prints a table (RSS idle, peak, after; seconds; status
codes) and writes JSON. Without --index it trains the tiny preset on synthetic scenes and indexes them.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_server import free_port, start_server  # noqa: E402


def make_images(megapixels: float) -> dict[str, bytes]:
    """name -> encoded bytes: the two hostile PNGs and an ordinary JPEG."""
    side = int((megapixels * 1e6) ** 0.5)
    ramp = np.tile(np.linspace(0, 65535, side, dtype=np.uint16)[None, :], (side, 1))
    out = {}
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")  # mode I;16
    out[f"png16 {side}x{side}"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(np.repeat((ramp >> 8).astype(np.uint8)[:, :, None], 3, axis=2)).save(buf, "PNG")
    out[f"png8 rgb {side}x{side}"] = buf.getvalue()
    buf = io.BytesIO()
    photo = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    out["jpeg 4000x3000"] = buf.getvalue()
    return out


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def upload(port: int, data: bytes, name: str) -> int:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/search/image?k=5",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def measure(index: Path, name: str, data: bytes, clients: int, rounds: int, log: Path) -> dict:
    """A fresh server; clients x rounds uploads at once; its RSS sampled throughout."""
    port, started = free_port(), []
    try:
        server, _ = start_server(index, port, log, started)
        idle = rss_kb(server.pid)
        peak, done, statuses = [idle], threading.Event(), Counter()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_kb(server.pid))
                time.sleep(0.01)

        def client() -> None:
            for _ in range(rounds):
                statuses[upload(port, data, "upload.png")] += 1

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        time.sleep(1.0)
        done.set()
        sampler.join()
        after = rss_kb(server.pid)
        return {
            "image": name,
            "bytes": len(data),
            "clients": clients,
            "uploads": clients * rounds,
            "rss_idle_mb": idle / 1024,
            "rss_peak_mb": max(peak[0], rss_kb(server.pid, "VmHWM")) / 1024,
            "rss_after_mb": after / 1024,
            "seconds": seconds,
            "statuses": dict(statuses),
        }
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def tiny_index(tmp: Path) -> Path:
    """Synthetic scenes, the tiny preset trained on them, and their index: what a quick run serves."""
    from click.testing import CliRunner

    from retrieval.cli.main import main
    from retrieval.data.synth import generate

    data = generate(tmp / "synth", 100, seed=1, size=48)
    for args in (
        ["train", "--data", str(data), "--out", str(tmp / "model"), "--preset", "tiny"],
        ["index", str(data), "--model", str(tmp / "model"), "--index", str(tmp / "index")],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    return tmp / "index"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="uploads per client")
    p.add_argument("--megapixels", type=float, default=39.6, help="size of the two PNGs")
    p.add_argument("--index", help="an existing index to serve (default: a tiny synthetic one)")
    p.add_argument("--out", default="bench_upload.json")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index = Path(args.index) if args.index else tiny_index(tmp)
        rows = [
            measure(index, name, data, args.clients, args.rounds, tmp / "server.log")
            for name, data in make_images(args.megapixels).items()
        ]
    print(f"\n{args.clients} clients x {args.rounds} uploads each, a fresh server per image")
    print(f"{'image':<22} {'KB':>6} {'RSS idle MB':>12} {'peak MB':>8} {'after MB':>9} {'s':>6}  statuses")
    for r in rows:
        print(
            f"{r['image']:<22} {r['bytes'] / 1024:>6.0f} {r['rss_idle_mb']:>12.0f} {r['rss_peak_mb']:>8.0f} "
            f"{r['rss_after_mb']:>9.0f} {r['seconds']:>6.1f}  {r['statuses']}"
        )
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
