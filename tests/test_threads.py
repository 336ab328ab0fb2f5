"""The thread policy for a shared machine: its arithmetic on given CPU counters, its limits on the real runtimes,
and the CLI setting OpenMP's wait before torch loads (retrieval/threads.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

from retrieval import threads
from retrieval.errors import RetrievalError
from retrieval.threads import (
    CpuSample,
    FreeCores,
    ThreadFit,
    choose_threads,
    others_busy,
    parse_proc_stat,
    prepare_openmp,
)

PROC_STAT = """cpu  900 90 300 5000 50 10 20 30 0 0
cpu0 100 10 40 2000 20 5 5 10 0 0
cpu1 300 20 60 1000 10 0 5 0 0 0
cpu2 500 60 200 2000 20 5 10 20 0 0
intr 123456 0 0
ctxt 98765
"""


def test_a_core_counts_as_taken_once_others_use_more_than_half_of_it() -> None:
    assert choose_threads(2, 0.0) == 2
    assert choose_threads(2, 0.4) == 2
    assert choose_threads(2, 0.6) == 1
    assert choose_threads(2, 1.0) == 1
    assert choose_threads(2, 2.0) == 1  # never none
    assert choose_threads(16, 3.2) == 13
    assert choose_threads(1, 0.0) == 1


def test_others_busy_is_all_cpu_time_less_our_own_over_the_wall_time() -> None:
    before, after = CpuSample(busy_s=10.0, own_s=2.0, at_s=100.0), CpuSample(busy_s=13.0, own_s=3.0, at_s=102.0)
    assert others_busy(before, after) == pytest.approx(1.0)  # (3 s - 1 s of ours) over 2 s
    assert others_busy(before, before) == 0.0  # no time passed
    ours_only = CpuSample(busy_s=11.0, own_s=3.2, at_s=101.0)  # the kernel's ticks lag our own clock
    assert others_busy(before, ours_only) == 0.0


def test_proc_stat_counts_busy_fields_of_our_cores_only() -> None:
    # cpu0: user 100 + nice 10 + system 40 + irq 5 + softirq 5 + steal 10 = 170 ticks; idle and iowait not
    assert parse_proc_stat(PROC_STAT, {0}, 100) == pytest.approx(1.70)
    # cpu2: 500 + 60 + 200 + 5 + 10 + 20 = 795; the aggregate "cpu" line and cpu1 are not ours
    assert parse_proc_stat(PROC_STAT, {0, 2}, 100) == pytest.approx(9.65)
    assert parse_proc_stat(PROC_STAT, {7}, 100) == 0.0


def test_setting_reads_auto_off_or_a_count_and_refuses_the_rest() -> None:
    assert threads.setting({}) == "auto"
    assert threads.setting({"RETRIEVAL_THREADS": " OFF "}) == "off"
    assert threads.setting({"RETRIEVAL_THREADS": "3"}) == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(RetrievalError, match=r"RETRIEVAL_THREADS=.*auto.*off.*number of threads"):
            threads.setting({"RETRIEVAL_THREADS": bad})


def test_prepare_openmp_sets_a_short_spin_only_when_it_can_take_effect() -> None:
    env: dict[str, str] = {}
    assert prepare_openmp(env, loaded=()) and env == {"GOMP_SPINCOUNT": threads.SPIN_COUNT}
    assert not prepare_openmp(env := {}, loaded=("torch",)) and env == {}  # its OpenMP has read the environment
    assert not prepare_openmp(env := {"OMP_WAIT_POLICY": "ACTIVE"}, loaded=()) and "GOMP_SPINCOUNT" not in env
    assert not prepare_openmp(env := {"RETRIEVAL_THREADS": "off"}, loaded=()) and "GOMP_SPINCOUNT" not in env


class FakeCounters:
    """/proc/stat as a test scripts it: each read advances the clock by `step_s` with `others` cores busy."""

    def __init__(self, step_s: float) -> None:
        self.step_s, self.others, self.now = step_s, 0.0, CpuSample(0.0, 0.0, 1000.0)

    def read(self, cores: object) -> CpuSample:
        t = self.now.at_s + self.step_s
        self.now = CpuSample(self.now.busy_s + self.others * self.step_s, 0.0, t)
        return self.now


@pytest.fixture
def fake_machine(monkeypatch: pytest.MonkeyPatch) -> FakeCounters:
    counters = FakeCounters(step_s=5.0)
    monkeypatch.setattr(threads, "read_sample", counters.read)
    monkeypatch.setattr(threads, "our_cores", lambda: [0, 1])
    monkeypatch.setattr(threads.time, "monotonic", lambda: counters.now.at_s + counters.step_s)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.delenv("RETRIEVAL_THREADS", raising=False)
    return counters


def test_thread_fit_follows_the_other_job_and_restores_the_limits(fake_machine: FakeCounters) -> None:
    import torch

    with threadpool_limits(2):  # every OpenMP and BLAS runtime loaded, as a fresh process on 2 cores has them
        with ThreadFit() as fit:
            fake_machine.others = 1.0  # another program takes a core
            assert fit.update() == 1 and torch.get_num_threads() == 1
            fake_machine.others = 0.1  # it ends
            assert fit.update() == 2 and torch.get_num_threads() == 2
            fake_machine.others = 0.9
            assert fit.update() == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # the caller's limit is back
    assert [t for _, t in fit.history] == [1, 2, 1]


def test_thread_fit_never_raises_the_callers_limit(fake_machine: FakeCounters) -> None:
    import torch

    with threadpool_limits(1):  # as the test fixtures and OMP_NUM_THREADS=1 do
        with ThreadFit() as fit:
            assert fit.update() == 1 and torch.get_num_threads() == 1


def test_thread_fit_off_leaves_the_runtimes_alone(fake_machine: FakeCounters, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("RETRIEVAL_THREADS", "off")
    threads_before = torch.get_num_threads()
    fake_machine.others = 2.0
    with ThreadFit() as fit:
        assert fit.update() is None and torch.get_num_threads() == threads_before


def test_free_cores_counts_what_other_processes_leave_over_the_last_window(fake_machine: FakeCounters) -> None:
    free = FreeCores(every_s=5.0)  # the fake clock reads 5 s on from the last sample: every call re-counts
    fake_machine.others = 1.0
    assert free.count() == 2  # one sample, no window yet: every core
    assert free.count() == 1  # another program took a core over the last 5 s
    fake_machine.others = 0.2
    assert free.count() == 2


def test_free_cores_reads_proc_stat_at_most_once_in_every_s(
    fake_machine: FakeCounters, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = []
    monkeypatch.setattr(threads, "read_sample", lambda cores: reads.append(1) or fake_machine.read(cores))
    free = FreeCores(every_s=10.0)  # the fake clock never gets 10 s past the last sample
    fake_machine.others = 2.0
    assert [free.count() for _ in range(5)] == [2] * 5 and len(reads) == 1


def test_free_cores_without_proc_stat_is_every_core_and_stops_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    monkeypatch.setattr(threads, "read_sample", lambda cores: reads.append(1))
    monkeypatch.setattr(threads, "our_cores", lambda: [0, 1, 2])
    free = FreeCores(every_s=0.0)
    assert [free.count() for _ in range(3)] == [3] * 3 and len(reads) == 1


def test_free_cores_leaves_out_a_core_a_busy_loop_takes() -> None:
    """On this machine's real /proc/stat: a busy loop in another process for the whole window."""
    free = FreeCores(every_s=0.0)
    if len(free.cores) < 2 or threads.read_sample(free.cores) is None:
        pytest.skip("one core, or no /proc/stat: nothing to count")
    spin = "import time\nprint('spinning', flush=True)\nend = time.monotonic() + 10\nwhile time.monotonic() < end: pass"
    loop = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        assert loop.stdout is not None and loop.stdout.readline().strip() == "spinning"
        assert free.count() == len(free.cores)  # the first sample
        time.sleep(1.0)
        assert free.count() <= len(free.cores) - 1
    finally:
        loop.kill()
        loop.wait()


@pytest.mark.slow  # a subprocess that imports torch
@pytest.mark.parametrize("setting", ["auto", "off"])
def test_the_cli_sets_openmp_wait_before_torch_loads(setting: str) -> None:
    """A `retrieval` process: the group runs before its command, and torch's OpenMP reads GOMP_SPINCOUNT as
    torch loads, so it must be in the environment by the time a command imports torch."""
    code = """
import json, os, sys
from retrieval.cli.main import main

assert "torch" not in sys.modules and "faiss" not in sys.modules, "the CLI imported torch or faiss at start"

@main.command("probe")
def probe():
    seen = os.environ.get("GOMP_SPINCOUNT")  # what torch's OpenMP reads as it loads, next line
    import torch
    print(json.dumps({"spin": seen, "torch": torch.__version__}))

main(["probe"])
"""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    env["RETRIEVAL_THREADS"] = setting
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])["spin"]
    assert seen == (threads.SPIN_COUNT if setting == "auto" else None)


@pytest.mark.slow  # trains and indexes in subprocesses, beside a busy loop
def test_bench_shared_runs_and_writes_its_rows(tmp_path: Path) -> None:
    """At a small size: every (part, load, policy) row, before and after side by side; no speed asserted here.
    1,000 items to index: a fast machine built 60 in less time than a 1-item build stalled beside a busy core."""
    out = tmp_path / "bench.json"
    args = ["--parts", "train,index", "--loads", "idle,nice0", "--reps", "1", "--preset", "tiny", "--n", "40"]
    args += ["--epochs", "2", "--index-n", "1000", "--work", str(tmp_path / "work"), "--json", str(out)]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_shared.py"), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    rows = {(r["part"], r["load"], r["policy"]): r for r in report["rows"]}
    assert set(rows) == {
        (p, load, s) for p in ("train", "index") for load in ("idle", "nice0") for s in ("before", "after")
    }
    assert all(r["rate"] > 0 and r["precision"] in ("fp32", "bf16") for r in rows.values())
    assert rows["train", "idle", "before"]["gomp_spincount"] is None  # RETRIEVAL_THREADS=off leaves OpenMP alone
    assert rows["train", "idle", "after"]["gomp_spincount"] == threads.SPIN_COUNT
    assert all(t is not None for t in rows["train", "nice0", "after"]["threads"])
    assert rows["train", "nice0", "before"]["threads"] == [None, None]
    busy = [t for t in report["table"] if t["load"] == "nice0"]
    assert len(busy) == 4 and all(t["busy_over_idle"] > 0 for t in busy)
    assert report["machine"]["cpu"] and "busy/idle" in done.stdout and "precision:" in done.stdout


@pytest.mark.slow  # two subprocesses
def test_bench_shared_times_flat_and_flat16_scans_on_one_thread_before_and_split_after(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--parts", "search,search16", "--loads", "idle", "--reps", "1", "--search-n", "40000", "--json", str(out)]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_shared.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = {(r["part"], r["policy"]): r for r in json.loads(out.read_text())["rows"]}
    for part, precision in (("search", "fp32"), ("search16", "fp16")):
        before, after = rows[part, "before"], rows[part, "after"]
        assert before["threads"] == 1 and before["rate"] > 0 and after["precision"] == precision
        assert 1 <= after["threads"] <= len(threads.our_cores())  # the threads a timed query used, on average
        if len(threads.our_cores()) >= 2 and after["elsewhere"] < 0.3:  # the cores were free: the scan split
            assert after["threads"] >= 2
    assert "queries/s, one at a time" in done.stdout
