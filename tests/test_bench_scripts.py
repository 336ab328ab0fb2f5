"""The benchmark scripts still run (on a tiny size): they are how speed claims are measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_search_runs_and_writes_its_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_search.py"), "--sizes", "3000", "--queries", "5",
                           "--types", "flat,ivf", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert "N=3,000 flat top-10: ours" in names and any(n.startswith("N=3,000 ivf nprobe=16") for n in names)
    ours = next(r for r in rows if r["name"] == "N=3,000 flat top-10: ours")
    assert ours["recall_at_10"] == 1.0 and ours["overhead_ratio"] > 0
    assert "benchmark" in done.stdout and "p50 ms" in done.stdout
