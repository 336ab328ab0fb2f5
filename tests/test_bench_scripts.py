"""The benchmark scripts still run (on a tiny size): they are how speed claims are measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the scripts run in subprocesses
ROOT = Path(__file__).resolve().parents[1]


def test_bench_search_runs_and_writes_its_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_search.py"),
            "--sizes",
            "3000",
            "--queries",
            "5",
            "--types",
            "flat,ivf",
            "--filtered",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert "N=3,000 flat top-10: ours" in names and any(n.startswith("N=3,000 ivf nprobe=16") for n in names)
    ours = next(r for r in rows if r["name"] == "N=3,000 flat top-10: ours")
    assert ours["recall_at_10"] == 1.0 and ours["overhead_ratio"] > 0
    floors = [n for n in names if n.endswith("raw + records' floor")]  # where ours makes raw's FAISS call
    assert floors and all(n.startswith("N=3,000 ivf") for n in floors)
    assert "N=3,000 ivf nprobe=16 theta (~100 results): raw + records' floor" in floors
    filtered = next(
        r for r in rows if r["name"] == "N=3,000 flat, image target, 10% no image: batch of 5, top-10: before vs ours"
    )
    assert filtered["raw_qps"] > 0 and filtered["ours_qps"] > 0
    assert "benchmark" in done.stdout and "p50 ms" in done.stdout


def test_bench_distributed_merge_runs_and_writes_its_rows(tmp_path: Path) -> None:
    """The merge part only: the throughput part starts Ray and encodes a collection (minutes, run by hand)."""
    pytest.importorskip("pyarrow", reason="shards are Parquet: pip install 'retrieval[distributed]'")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_distributed.py"),
            "--parts",
            "merge",
            "--vectors",
            "4000",
            "--shards",
            "3",
            "--dim",
            "16",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["merge"]
    assert [r["on_disk"] for r in rows] == [False, True] and all(r["peak_rss_mb"] > 0 for r in rows)
    assert rows[1]["ivfdata_mb"] > 0 and rows[0]["ivfdata_mb"] == 0
    assert "in memory" in done.stdout and "on disk" in done.stdout


def test_bench_upload_runs_and_writes_its_rows(served_index: Path, tmp_path: Path) -> None:
    """Small images and two clients: the real server is started once per image and its RSS sampled."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_upload.py"),
            "--index",
            str(served_index),
            "--clients",
            "2",
            "--rounds",
            "1",
            "--megapixels",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["image"].split()[0] for r in rows] == ["png16", "png8", "jpeg"]
    assert all(r["statuses"] == {"200": 2} and r["rss_peak_mb"] >= r["rss_idle_mb"] > 0 for r in rows)
    assert "peak MB" in done.stdout
