"""Concurrent searches share one FAISS call (retrieval/server/batcher.py, issue 16), and every request still gets
the answer it would get alone: the batcher's rules on toy calls (fast), then the server under concurrent mixed
requests against `Index.search` one at a time (slow)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import same_ranking, slowed

from retrieval.server.batcher import Batcher


# --- the batcher on toy calls -----------------------------------------------------------------------
class Calls:
    """An `answer` that records each call and holds the first one until `release`, so requests pile up."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, key: str, queries: list[Any]) -> list[Any]:
        self.calls.append((key, list(queries)))
        self.started.set()
        assert self.release.wait(10)
        if key == "broken":
            raise RuntimeError("the call failed")
        return [ValueError(f"bad {q}") if isinstance(q, str) and q.startswith("bad") else (key, q) for q in queries]


async def burst(batcher: Batcher, calls: Calls, requests: list[tuple[str, Any]]) -> list[Any]:
    """The first request takes the only slot and is held; the rest arrive meanwhile; then all are answered."""
    first = asyncio.ensure_future(batcher(*requests[0]))
    await asyncio.get_running_loop().run_in_executor(None, calls.started.wait, 10)
    rest = [asyncio.ensure_future(batcher(key, q)) for key, q in requests[1:]]
    await asyncio.sleep(0.05)  # let every request join its group
    calls.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def run_burst(requests: list[tuple[str, Any]], max_batch: int = 64) -> tuple[list[Any], Calls]:
    calls = Calls()
    with ThreadPoolExecutor(1) as pool:
        answers = asyncio.run(burst(Batcher(calls, pool, slots=1, max_batch=max_batch), calls, requests))
    return answers, calls


def test_requests_that_wait_together_share_one_call_and_each_gets_its_own_answer() -> None:
    answers, calls = run_burst([("a", i) for i in range(10)])
    assert answers == [("a", i) for i in range(10)]
    assert calls.calls == [("a", [0]), ("a", list(range(1, 10)))]  # the first alone (none came within its wait)


def test_only_requests_with_the_same_key_share_a_call_oldest_group_first() -> None:
    answers, calls = run_burst([("a", 0), ("b", 1), ("a", 2), ("c", 3), ("b", 4), ("a", 5)])
    assert answers == [("a", 0), ("b", 1), ("a", 2), ("c", 3), ("b", 4), ("a", 5)]
    assert calls.calls == [("a", [0]), ("b", [1, 4]), ("a", [2, 5]), ("c", [3])]


def test_a_call_answers_at_most_max_batch_requests() -> None:
    answers, calls = run_burst([("a", i) for i in range(12)], max_batch=5)
    assert answers == [("a", i) for i in range(12)]
    assert [len(queries) for _, queries in calls.calls] == [1, 5, 5, 1]


def test_one_requests_error_is_only_its_answer() -> None:
    answers, _ = run_burst([("a", 0), ("a", 1), ("a", "bad one"), ("a", 3)])
    assert answers[:2] == [("a", 0), ("a", 1)] and answers[3] == ("a", 3)
    assert isinstance(answers[2], ValueError) and str(answers[2]) == "bad bad one"


def test_a_failed_call_answers_its_own_batch_and_no_other() -> None:
    answers, calls = run_burst([("a", 0), ("broken", 1), ("broken", 2), ("b", 3)])
    assert answers[0] == ("a", 0) and answers[3] == ("b", 3)
    assert all(isinstance(a, RuntimeError) and str(a) == "the call failed" for a in answers[1:3])
    assert [key for key, _ in calls.calls] == ["a", "broken", "b"]  # and the slot went on to the next group


def test_a_request_cancelled_while_it_waits_is_left_out_of_the_call() -> None:
    calls = Calls()

    async def cancel_one(batcher: Batcher) -> list[Any]:
        first = asyncio.ensure_future(batcher("a", 0))
        await asyncio.get_running_loop().run_in_executor(None, calls.started.wait, 10)
        waiting = [asyncio.ensure_future(batcher("a", i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        waiting[1].cancel()  # its client went away
        await asyncio.sleep(0.05)  # the cancel reaches the request's future in a loop iteration or two
        calls.release.set()
        return await asyncio.gather(first, *waiting, return_exceptions=True)

    with ThreadPoolExecutor(1) as pool:
        answers = asyncio.run(cancel_one(Batcher(calls, pool, slots=1)))
    assert answers[:2] == [("a", 0), ("a", 1)] and answers[3] == ("a", 3)
    assert isinstance(answers[2], asyncio.CancelledError)
    assert calls.calls == [("a", [0]), ("a", [1, 3])]


def test_a_call_waits_for_company_at_most_wait_s_and_not_at_all_when_full() -> None:
    calls: list[list[int]] = []

    def answer(key: str, queries: list[int]) -> list[int]:
        calls.append(queries)
        return queries

    async def requests(batcher: Batcher, gaps: list[float]) -> float:
        t0, sent = time.monotonic(), []
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            sent.append(asyncio.ensure_future(batcher("k", i)))
        assert await asyncio.gather(*sent) == list(range(len(gaps)))
        return time.monotonic() - t0

    with ThreadPoolExecutor(1) as pool:
        took = asyncio.run(requests(Batcher(answer, pool, slots=1, wait_s=1.0), [0, 0.05, 0.05, 1.5]))
        assert calls == [[0, 1, 2], [3]] and took >= 1.5 + 1.0  # the last one alone, after waiting in vain
        calls.clear()
        took = asyncio.run(requests(Batcher(answer, pool, slots=1, max_batch=3, wait_s=30), [0, 0, 0, 0, 0, 0]))
        assert calls == [[0, 1, 2], [3, 4, 5]] and took < 5  # full: no wait


@pytest.mark.parametrize("requests, max_batch, wait_s", [(10, 64, 0.2), (6, 4, 30.0)])
def test_idle_slots_split_a_group_and_answer_it_side_by_side(requests: int, max_batch: int, wait_s: float) -> None:
    """Both slots free when the requests arrive together: two calls of half that run at once, not one call on one
    core while the other idles. A full group's rest is ready as the group was: its slot does not wait `wait_s`."""
    both, calls = threading.Barrier(2, timeout=10), []

    def answer(key: str, queries: list[int]) -> list[int]:
        calls.append(len(queries))
        both.wait()  # each call waits for the other: they run at the same time
        return queries

    async def together(batcher: Batcher) -> list[int]:
        return await asyncio.gather(*(batcher("k", i) for i in range(requests)))

    with ThreadPoolExecutor(2) as pool:
        batcher = Batcher(answer, pool, slots=2, max_batch=max_batch, wait_s=wait_s)
        assert asyncio.run(together(batcher)) == list(range(requests))
    assert calls == [requests // 2] * 2


def test_requests_from_many_threads_and_loops_are_all_answered() -> None:
    """A test client runs each request on a loop of its own, in its own thread: the batcher is bound to none."""
    seen: list[int] = []

    def answer(key: str, queries: list[int]) -> list[int]:
        seen.append(len(queries))
        return [q * 2 for q in queries]

    with ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(16) as clients:
        batcher = Batcher(answer, pool, slots=2, max_batch=8)
        got = list(clients.map(lambda i: asyncio.run(batcher("k", i)), range(400)))
    assert got == [2 * i for i in range(400)]
    assert sum(seen) == 400 and max(seen) <= 8


# --- the server: concurrent mixed requests get the one-at-a-time answers --------------------------------
def same_answer(results: list[dict], hits: list) -> None:
    """The API's results are the Index's hits (conftest.same_ranking: tied items may change places)."""
    same_ranking([(r["id"], r["score"]) for r in results], [(h.id, h.score) for h in hits])


@pytest.fixture
def slow_searches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every search call of an app made after this takes 20 ms more, so concurrent requests pile up and share
    calls on any machine, however fast its searches."""
    from retrieval.server import app

    monkeypatch.setattr(app, "run_search", slowed(app.run_search, 0.02))


QUERIES: list[dict[str, Any]] = [
    *(
        {"q": f"a {size} {colour} {shape}", "k": 10}
        for size in ("small", "large")
        for colour in ("red", "blue")
        for shape in ("circle", "star")
    ),
    {"q": "a small red circle", "k": 3, "target": "image"},
    {"q": "a small red circle", "k": 3, "target": "text"},
    {"q": "a large green square", "k": 40, "theta": 0.2},
    {"q": "a large green square", "k": 40, "theta": 0.2, "weight": 0.9},
    {"q": "a blue triangle on the left", "k": 1000, "theta": 0.4, "target": "image"},
    *({"like": f"synth-0000{i:02d}", "k": 10} for i in range(10, 16)),
    {"like": "synth-000011", "k": 5, "target": "text"},
    {"like": "synth-000012", "k": 40, "theta": 0.3},
    {"q": "a large green square", "k": 10, "fusion": "max"},  # other rules: calls of their own
    {"q": "a large green square", "k": 10, "fusion": "min"},
    {"like": "synth-000013", "k": 20, "theta": 0.3, "fusion": "max"},
]
FAILING: list[tuple[dict[str, Any], int]] = [({"like": "no such item", "k": 10}, 404), ({"q": "   ", "k": 10}, 422)]


def expected_hits(index, params: dict[str, Any]) -> list:
    args = {"k": params["k"], "theta": params.get("theta"), "weight": params.get("weight", 0.5)}
    args["target"], args["fusion"] = params.get("target", "item"), params.get("fusion", "weighted")
    return index.search(text=params.get("q"), like=params.get("like"), **args)


@pytest.mark.slow
def test_concurrent_mixed_requests_get_the_one_at_a_time_answers(
    served_index: Path, synth_data: Path, torch_single_thread, slow_searches
) -> None:
    """Texts and likes (one batched call: the same parameters), other k, θ, w and targets (calls of their own),
    uploads, and requests that fail, all at once from 16 clients; one thread searches, so batches form."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from retrieval.data.images import load_image
    from retrieval.index.handle import Index
    from retrieval.server.app import create_app

    client, index = TestClient(create_app(served_index, threads=1)), Index.open(served_index)
    expected = [expected_hits(index, p) for p in QUERIES]
    image = synth_data.parent / "images" / "synth-000020.png"
    upload_hits = index.search(image=load_image(image), k=6, target="text")

    def send(i: int) -> tuple[int, dict]:
        if i < 0:
            upload = {"file": (image.name, image.read_bytes(), "image/png")}
            r = client.post("/api/search/image", params={"k": 6, "target": "text"}, files=upload)
        else:
            r = client.get("/api/search", params=[*QUERIES, *(p for p, _ in FAILING)][i])
        return r.status_code, r.json()

    order = [*range(len(QUERIES) + len(FAILING)), -1, -2] * 4
    with ThreadPoolExecutor(16) as clients:
        got = list(clients.map(send, order))
    for i, (status, body) in zip(order, got, strict=True):
        if i < 0:
            assert status == 200 and body["query"]["image"] == "synth-000020.png"
            same_answer(body["results"], upload_hits)
        elif i >= len(QUERIES):
            assert status == FAILING[i - len(QUERIES)][1] and body["error"]
        else:
            assert status == 200, body
            same_answer(body["results"], expected[i])
            assert body["count"] == len(expected[i]) and body["query"] == {
                "q": None,
                "like": None,
                "theta": None,
                "weight": 0.5,
                "target": "item",
                "fusion": "weighted",
                **QUERIES[i],
            }
    assert max(body.get("batch", 0) for _, body in got) > 1  # searches did share calls


def app_answering_from(served_index: Path, gens: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """A test client of an app whose searches each take the generation named by their `gen` parameter."""
    from fastapi.testclient import TestClient

    from retrieval.server import app

    async def by_param(request: Any) -> Any:
        return gens[request.query_params["gen"]]

    monkeypatch.setattr(app, "current_generation", by_param)
    return TestClient(app.create_app(served_index, threads=1))  # one thread searches, so batches form


@pytest.mark.slow
def test_a_call_never_mixes_generations(
    served_index: Path, tmp_path: Path, torch_single_thread, slow_searches, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that took the old generation and requests that took a new one (half the items removed) arrive
    together, with the same parameters; each is answered from its own generation."""
    pytest.importorskip("fastapi")
    from retrieval.index.build import remove_items
    from retrieval.index.handle import Index
    from retrieval.server import live

    shutil.copytree(served_index, tmp_path / "index", ignore=shutil.ignore_patterns("thumbs"))
    remove_items(tmp_path / "index", [f"synth-{i:06d}" for i in range(10, 300, 2)])
    gens = {"old": live.load(Index.open(served_index)), "new": live.load(Index.open(tmp_path / "index"))}
    client = app_answering_from(served_index, gens, monkeypatch)
    params = [*({"q": p["q"], "k": 20} for p in QUERIES[:6]), {"like": "synth-000011", "k": 20}]
    expected = {gen: [expected_hits(g.index, p) for p in params] for gen, g in gens.items()}
    assert all(expected["old"][i] != expected["new"][i] for i in range(len(params)))  # the two tell apart
    sent = [(gen, i) for _ in range(6) for i in range(len(params)) for gen in gens]
    with ThreadPoolExecutor(16) as clients:
        got = list(clients.map(lambda s: client.get("/api/search", params={**params[s[1]], "gen": s[0]}), sent))
    for (gen, i), r in zip(sent, got, strict=True):
        assert r.status_code == 200, r.text
        same_answer(r.json()["results"], expected[gen][i])
    assert max(r.json()["batch"] for r in got) > 1


@pytest.mark.slow
def test_a_request_without_theta_gets_the_calibrated_cutoff(
    served_index: Path, torch_single_thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `Index.search` does: the θ `retrieval calibrate` stored for the target and weight, if any."""
    pytest.importorskip("fastapi")
    from retrieval.index.handle import Index
    from retrieval.server import live

    gen = live.load(Index.open(served_index))
    gen.index.store.manifest.calibration["item"] = {"weight": 0.5, "theta": 0.25}  # as `calibrate` leaves it
    client = app_answering_from(served_index, {"calibrated": gen}, monkeypatch)
    params = [{"q": p["q"], "k": 300, "gen": "calibrated"} for p in QUERIES[:4]]
    params += [{**p, "weight": 0.9} for p in params]  # calibrated for w = 0.5 only: top k at 0.9
    with ThreadPoolExecutor(8) as clients:
        got = list(clients.map(lambda p: client.get("/api/search", params=p).json()["results"], params))
    for p, results in zip(params, got, strict=True):
        hits = gen.index.search(text=p["q"], k=300, weight=p.get("weight", 0.5))
        same_answer(results, hits)
        assert (len(hits) < 300) == ("weight" not in p)
