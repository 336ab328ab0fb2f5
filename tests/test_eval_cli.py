"""`retrieval eval` reports (thresholds, fusion, plots, markdown), evaluation of an index, and `calibrate`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from retrieval.cli.main import main
from retrieval.index.build import BuildOptions, build_index
from retrieval.index.store import IndexStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_single_thread")]  # integration: a trained model, indexes


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def test_split(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic test split as its own manifest (absolute image paths)."""
    ids = set(json.loads((synth_data.parent / "split.json").read_text())["test"])
    rows = []
    for line in synth_data.read_text().splitlines():
        row = json.loads(line)
        if row["id"] in ids:
            row["image"] = str(synth_data.parent / row["image"])
            rows.append(json.dumps(row))
    out = tmp_path_factory.mktemp("split") / "test.jsonl"
    out.write_text("\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="module")
def test_index(test_split: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "index"
    build_index(test_split, tiny_model, path, BuildOptions(progress=False))
    return path


@pytest.fixture(scope="module")
def full_report(tiny_model: Path, test_split: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("report")
    code, printed = run(
        "eval",
        "--model",
        tiny_model,
        "--data",
        test_split,
        "--fusion",
        "--target-precision",
        "0.5",
        "--plot",
        out / "plots",
        "--out",
        out / "report.json",
        "--markdown",
    )
    assert code == 0, printed
    return json.loads((out / "report.json").read_text()), out / "plots", printed


def test_report_keeps_the_core_schema_and_adds_thresholds(full_report) -> None:
    report, _, _ = full_report
    for direction in ("text_to_image", "image_to_text"):
        assert {"R@1", "R@5", "R@10", "median_rank", "mean_rank", "mAP", "n_queries"} <= set(report[direction])
        assert len(report["curves"][direction]) == 100
    t = report["threshold"]
    assert {"best_f1_theta", "best_f1", "adaptive_rule", "adaptive_f1"} <= set(t)
    p, r = t["precision_at_best_f1"], t["recall_at_best_f1"]
    assert t["best_f1"] == pytest.approx(2 * p * r / (p + r)) and t["best_f1"] > 0
    # the adaptive rule is the non-flat rule with the best held-out F1, and its figures are that rule's
    adaptive = max(("top_relative", "zscore"), key=lambda rule: t["rules"][rule]["heldout_f1"])
    assert t["adaptive_rule"] == adaptive
    assert (t["adaptive_theta"], t["adaptive_f1"]) == (
        t["rules"][adaptive]["theta"],
        t["rules"][adaptive]["heldout_f1"],
    )
    assert t["flat_heldout_f1"] == t["rules"]["flat"]["heldout_f1"]
    # the F1-best θ is on the curve, and no point of the curve beats it
    assert max(t["curve"]["f1"]) <= t["best_f1"] + 1e-12
    assert sum(t["histogram"]["relevant"]) == report["n_texts"]
    assert sum(t["histogram"]["other"]) == report["n_texts"] * (report["n_images"] - 1)


def test_fusion_sweep_covers_w_from_caption_to_image(full_report) -> None:
    f = full_report[0]["fusion"]
    assert f["weights"][0] == 0.0 and f["weights"][-1] == 1.0 and len(f["R@1"]) == 11
    assert f["best_weight"] in f["weights"]
    assert f["n_queries"] == full_report[0]["n_texts"] - full_report[0]["n_images"]


def test_the_fusion_report_has_every_rule_with_and_without_captions(full_report) -> None:
    f = full_report[0]["fusion"]
    m = f["missing_captions"]
    assert (m["fraction"], m["seed"], m["n_missing"]) == (0.3, 0, round(0.3 * f["n_items"]))
    for figures in (f, m):
        assert list(figures["rules"]) == ["mean", "weighted", "max", "min"]
        assert set(figures["threshold"]) == set(figures["curves"]) == set(figures["rules"])
        for rule, figure in figures["rules"].items():
            assert figure["n_queries"] == f["n_queries"] and 0 <= figure["R@1"] <= figure["R@5"] <= 1, rule
            t = figures["threshold"][rule]
            assert t["target_precision"] == 0.5 and sum(t["histogram"]["relevant"]) == f["n_queries"], rule
            assert len(figures["curves"][rule]) == 100


def test_plots_are_written_and_are_pictures(full_report) -> None:
    _, plots, _ = full_report
    names = {p.name for p in plots.iterdir()}
    assert names == {
        "recall_at_k.png",
        "score_histograms.png",
        "threshold_sweep.png",
        "fusion_weight.png",
        "fusion_rules.png",
        "fusion_thresholds.png",
        "fusion_thresholds_missing.png",
    }
    for p in plots.iterdir():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 400
            assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 10  # not a blank canvas


def test_markdown_tables(full_report) -> None:
    printed = full_report[2]
    assert "| direction | R@1 | R@5 | R@10 |" in printed and "| text → image |" in printed
    assert "| flat θ, F1-best on all queries |" in printed and "| top_relative, chosen on half" in printed
    assert "(best)" in printed
    assert "| fusion rule | R@1 | R@5 | R@10 | mAP | best F1 at θ | R@1, 30% of captions removed |" in printed
    header = next(line for line in printed.splitlines() if line.startswith("| fusion rule |"))
    for rule in ("| mean |", "| weighted (w = ", "| max |", "| min |"):
        row = next(line for line in printed.splitlines() if line.startswith(rule))
        assert row.count("|") == header.count("|"), row  # one cell per column


def test_index_evaluation_equals_model_evaluation(tiny_model: Path, test_split: Path, test_index: Path) -> None:
    """The same images and captions, scored through the index's stored vectors and the numpy text tower."""
    code, out = run("eval", "--model", tiny_model, "--data", test_split, "--json", "--no-thresholds")
    assert code == 0, out
    model_report = json.loads(out)
    code, out = run("eval", "--index", test_index, "--data", test_split, "--json", "--target", "image")
    assert code == 0, out
    index_report = json.loads(out)
    assert index_report["n_items"] == model_report["n_images"] and index_report["unmatched_queries"] == 0
    for k in ("R@1", "R@5", "R@10", "mAP"):
        assert index_report["text_to_image"][k] == pytest.approx(
            model_report["text_to_image"][k], abs=1.5 / model_report["n_texts"]
        )
    assert "threshold" in index_report


def test_calibrate_then_search_uses_the_stored_theta(test_split: Path, test_index: Path, tmp_path: Path) -> None:
    code, out = run("calibrate", "--index", test_index, "--data", test_split, "--target", "image")
    assert code == 0, out
    entry = IndexStore.open(test_index).manifest.calibration["image"]
    code, out = run("eval", "--index", test_index, "--data", test_split, "--json", "--target", "image")
    threshold = json.loads(out)["threshold"]  # the same queries' θ report, as `eval --index` prints it
    assert entry["rule"] == "flat" and entry["weight"] == 1.0  # an image search scores the image alone
    assert entry["theta"] == threshold["best_f1_theta"] and entry["best_f1"] == threshold["best_f1"]
    assert entry["heldout_f1"] == threshold["rules"]["flat"]["heldout_f1"]
    code, out = run(
        "search", "--index", test_index, "--text", "a red circle", "--target", "image", "--json", "--k", "0"
    )
    assert code == 0, out
    scores = [json.loads(line)["score"] for line in out.splitlines()]
    assert all(s > entry["theta"] for s in scores)
    code, out_all = run(
        "search",
        "--index",
        test_index,
        "--text",
        "a red circle",
        "--target",
        "image",
        "--json",
        "--k",
        "0",
        "--theta",
        "-1",
    )
    assert len(out_all.splitlines()) == 60 > len(scores)  # an explicit θ overrides the calibrated one
    code, out = run("search", "--index", test_index, "--text", "a red circle", "--target", "image")
    assert out.startswith("(calibrated cutoff: theta")
    # other targets are not calibrated: top-k as before
    code, out = run("search", "--index", test_index, "--text", "a red circle", "--target", "text", "--json")
    assert len(out.splitlines()) == 10


def test_calibrate_a_margin(test_split: Path, test_index: Path) -> None:
    code, out = run(
        "calibrate", "--index", test_index, "--data", test_split, "--target", "text", "--rule", "top_relative"
    )
    assert code == 0, out
    entry = IndexStore.open(test_index).manifest.calibration["text"]
    code, out = run("eval", "--index", test_index, "--data", test_split, "--json", "--target", "text")
    top_relative = json.loads(out)["threshold"]["rules"]["top_relative"]  # θ on scores minus each query's top
    assert entry["rule"] == "top_relative" and "theta" not in entry
    assert entry["margin"] == -top_relative["theta"] and entry["heldout_f1"] == top_relative["heldout_f1"]
    code, out = run("search", "--index", test_index, "--text", "a red circle", "--target", "text", "--json", "--k", "0")
    scores = [json.loads(line)["score"] for line in out.splitlines()]
    assert scores and all(s > scores[0] - entry["margin"] for s in scores)


def test_calibrating_item_search_at_another_weight(test_split: Path, test_index: Path) -> None:
    """--target item --weight 0.3 stores w = 0.3 beside its θ; `search --target item` applies that θ at w 0.3
    and not at another weight, whose scores the θ was not chosen for."""
    code, out = run("calibrate", "--index", test_index, "--data", test_split, "--target", "item", "--weight", "0.3")
    assert code == 0, out
    entry = IndexStore.open(test_index).manifest.calibration["item"]
    assert entry["rule"] == "flat" and entry["weight"] == 0.3
    code, out = run(
        "eval", "--index", test_index, "--data", test_split, "--json", "--target", "item", "--weight", "0.3"
    )
    assert entry["theta"] == json.loads(out)["threshold"]["best_f1_theta"]
    search = ("search", "--index", test_index, "--text", "a red circle", "--target", "item")
    code, out = run(*search, "--weight", "0.3")
    assert code == 0 and out.startswith(f"(calibrated cutoff: theta {entry['theta']:.3f}"), out
    code, out = run(*search, "--weight", "0.3", "--json", "--k", "0")
    scores = [json.loads(line)["score"] for line in out.splitlines()]
    code, out_all = run(*search, "--weight", "0.3", "--json", "--k", "0", "--theta", "-1")
    every = [json.loads(line)["score"] for line in out_all.splitlines()]
    assert len(every) == 60 and scores == pytest.approx([s for s in every if s > entry["theta"]])
    code, out = run(*search, "--weight", "0.5", "--json")  # not calibrated at 0.5: the plain top 10
    assert code == 0 and len(out.splitlines()) == 10
    code, out = run(*search, "--weight", "0.5")
    assert "calibrated cutoff" not in out


def test_a_relevant_list_counts_any_of_its_ids_as_found(test_split: Path, test_index: Path, tmp_path: Path) -> None:
    """A query pair whose `relevant` field lists two indexed ids: its rank is the better of theirs, and its AP
    averages over both. The ids are chosen at ranks 3 and 7 of the query's own ranking (from `search`)."""
    caption = json.loads(test_split.read_text().splitlines()[0])["captions"][0]
    code, out = run(
        "search", "--index", test_index, "--text", caption, "--target", "image", "--json", "--k", "10", "--theta", "-1"
    )
    ranked = [json.loads(line)["id"] for line in out.splitlines()]
    assert code == 0 and len(ranked) == 10, out

    def evaluate(relevant: list[str]) -> dict:
        manifest = tmp_path / "queries.jsonl"
        manifest.write_text(json.dumps({"id": "query-0", "captions": [caption], "relevant": relevant}) + "\n")
        code, out = run(
            "eval", "--index", test_index, "--data", manifest, "--json", "--target", "image", "--no-thresholds"
        )
        assert code == 0, out
        report = json.loads(out)
        assert report["n_texts"] == 1 and report["unmatched_queries"] == 0
        return report["text_to_image"]

    both = evaluate([ranked[6], ranked[2]])  # either found counts: the query's rank is 3
    assert (both["R@1"], both["R@5"], both["R@10"], both["median_rank"]) == (0.0, 1.0, 1.0, 3.0)
    assert both["mAP"] == pytest.approx((1 / 3 + 2 / 7) / 2)  # positives at ranks 3 and 7
    second = evaluate([ranked[6], "not-indexed"])  # an id the index lacks is no positive; rank 7 alone
    assert (second["R@5"], second["R@10"], second["median_rank"]) == (0.0, 1.0, 7.0)
    assert second["mAP"] == pytest.approx(1 / 7)
    top = evaluate([ranked[0], ranked[9]])
    assert top["R@1"] == 1.0 and top["mAP"] == pytest.approx((1 + 2 / 10) / 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "MODEL", "--index", "INDEX"], "not both"),
        (["--index", "INDEX", "--fusion"], "--fusion needs --model"),
        (["--model", "MODEL", "--k", "0"], "--k must be"),
    ],
)
def test_bad_eval_options_are_one_error_line(
    args, message, tiny_model: Path, test_index: Path, test_split: Path
) -> None:
    args = [{"MODEL": tiny_model, "INDEX": test_index}.get(a, a) for a in args]
    code, out = run("eval", "--data", test_split, *args)
    assert code == 1 and out.startswith("Error:") and message in out and len(out.strip().splitlines()) == 1, out


def test_calibrating_with_ids_the_index_lacks(test_index: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "not-indexed", "captions": ["a red circle"]}) + "\n")
    code, out = run("calibrate", "--index", test_index, "--data", other)
    assert code == 1 and "none of the queries' relevant ids" in out


def test_a_fusion_rule_is_for_whole_items(test_index: Path, test_split: Path) -> None:
    code, out = run("calibrate", "--index", test_index, "--data", test_split, "--target", "image", "--fusion", "max")
    assert code == 1 and out.startswith("Error:") and "goes with --target item" in out, out
    assert len(out.strip().splitlines()) == 1


def _search(index: Path, fusion: str, *extra) -> str:
    """`search --target item --fusion` for one text: its output."""
    code, out = run(
        "search", "--index", index, "--text", "a red circle", "--target", "item", "--fusion", fusion, *extra
    )
    assert code == 0, out
    return out


def test_calibrate_under_max_then_search_under_max_uses_its_cutoff(test_split: Path, test_index: Path) -> None:
    """The θ chosen on max scores is the F1-best θ of max scores counted by brute force from the stored vectors;
    `search --fusion max` applies it, `--fusion weighted` does not. Calibrating items again under weighted
    replaces it (one entry per target): then max has no cutoff and weighted has the new one."""
    from retrieval.index.handle import Index

    code, out = run("calibrate", "--index", test_index, "--data", test_split, "--target", "item", "--fusion", "max")
    assert code == 0 and "item searches under max now use theta" in out, out
    entry = IndexStore.open(test_index).manifest.calibration["item"]
    assert entry["fusion"] == "max" and entry["rule"] == "flat"

    index = Index.open(test_index)
    rows = [json.loads(line) for line in test_split.read_text().splitlines()]
    ids = index.store.id_table()[1]
    stored, d = np.asarray(index.store.vectors[1]), index.store.manifest.dim
    queries = index.embed_texts([c for r in rows for c in r["captions"]])
    owner = np.array([list(ids).index(r["id"]) for r in rows for _ in r["captions"]])
    scores = np.maximum(queries @ stored[:, :d].T, queries @ stored[:, d:].T)  # (nq, N): max of the parts
    relevant = np.arange(len(ids))[None, :] == owner[:, None]

    def f1(theta: float) -> float:
        above = scores >= theta
        tp = (above & relevant).sum()
        return 2 * tp / (above.sum() + len(owner))  # 2PR / (P + R) with one relevant item per query

    assert f1(entry["theta"]) == pytest.approx(entry["best_f1"], abs=0.01)
    assert max(f1(t) for t in np.unique(scores)[::5]) <= entry["best_f1"] + 0.01

    calibrated, every = (
        [json.loads(line)["score"] for line in _search(test_index, "max", "--json", "--k", "0", *theta).splitlines()]
        for theta in ((), ("--theta", "-1"))
    )
    assert len(every) == 60 > len(calibrated) and calibrated == pytest.approx([s for s in every if s > entry["theta"]])
    assert _search(test_index, "max").startswith(f"(calibrated cutoff: theta {entry['theta']:.3f}")
    assert "calibrated cutoff" not in _search(test_index, "weighted")  # the max cutoff is not for weighted scores

    code, out = run("calibrate", "--index", test_index, "--data", test_split, "--target", "item")
    assert code == 0 and "item searches at w = 0.5 now use theta" in out, out
    weighted = IndexStore.open(test_index).manifest.calibration["item"]
    assert weighted["fusion"] == "weighted" and weighted["weight"] == 0.5
    assert "calibrated cutoff" not in _search(test_index, "max")  # replaced
    for fusion in ("weighted", "mean"):  # the mean is w = 0.5: the same scores
        assert _search(test_index, fusion).startswith(f"(calibrated cutoff: theta {weighted['theta']:.3f}"), fusion


def test_fusion_report_equals_searching_an_index_of_one_caption_per_image(
    test_split: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """The report's numbers are what `search --target item` gives on the index the report describes: the sweep's
    at each w, each rule's under --fusion, and with the captions removed, an index of items that have none."""
    from retrieval.data.pairs import read_pairs
    from retrieval.evaluation.fusion import removed_captions
    from retrieval.index.handle import Index
    from retrieval.jobs.evaluate import evaluate_model

    fusion = evaluate_model(tiny_model, read_pairs(test_split), ks=(1, 5), fusion=True)["fusion"]
    rows = [json.loads(line) for line in test_split.read_text().splitlines()]
    removed = set(removed_captions(len(rows), 0.3, 0).tolist())
    assert len(removed) == fusion["missing_captions"]["n_missing"]
    owners = [r["id"] for r in rows for _ in r["captions"][1:]]
    n = len(owners)

    def recall(name: str, kept: list[list[str]]) -> Callable[..., tuple[float, float]]:
        manifest = tmp_path / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps({**r, "captions": c}) + "\n" for r, c in zip(rows, kept, strict=True)))
        build_index(manifest, tiny_model, tmp_path / name, BuildOptions(progress=False))
        index = Index.open(tmp_path / name)
        queries = index.embed_texts([c for r in rows for c in r["captions"][1:]])

        def at(**how: Any) -> tuple[float, float]:
            hits = index.search_vectors(queries, k=5, target="item", **how)
            r1 = np.mean([h[0].id == o for h, o in zip(hits, owners, strict=True)])
            return r1, np.mean([o in {x.id for x in h} for h, o in zip(hits, owners, strict=True)])

        return at

    first = recall("first", [r["captions"][:1] for r in rows])
    for i, w in enumerate(fusion["weights"]):
        assert first(weight=w) == pytest.approx((fusion["R@1"][i], fusion["R@5"][i]), abs=1.5 / n), w
    none = recall("missing", [[] if i in removed else r["captions"][:1] for i, r in enumerate(rows)])
    for at, figures in ((first, fusion), (none, fusion["missing_captions"])):
        for rule, figure in figures["rules"].items():
            got = at(fusion=rule, weight=figure.get("weight", 0.5))
            assert got == pytest.approx((figure["R@1"], figure["R@5"]), abs=1.5 / n), rule


def test_the_job_modules_do_not_import_torch() -> None:
    """eval --index and calibrate embed with the numpy text tower: importing the jobs must not cost torch."""
    import subprocess
    import sys

    names = ("train", "evaluate", "evaluate_index", "calibrate", "classify", "demo")
    jobs = ", ".join(f"retrieval.jobs.{name}" for name in names)
    code = f"import sys, {jobs}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- eval --index evaluates what the index returns, beside exact search --------------------------------------


@pytest.fixture(scope="module")
def typed_indexes(synth_data: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 300 scenes as a flat, an hnsw and an ivfpq index (ivfpq: nprobe 1 of its lists, set by `index --nprobe`);
    the vectors are encoded once and the other two re-typed from copies."""
    import shutil

    root = tmp_path_factory.mktemp("typed")
    build_index(synth_data, tiny_model, root / "flat", BuildOptions("flat", progress=False))
    paths = {"flat": root / "flat"}
    for kind, knob in (("hnsw", []), ("ivfpq", ["--nprobe", "1"])):
        shutil.copytree(root / "flat", root / kind)
        code, out = run("index", synth_data, "--model", tiny_model, "--index", root / kind, "--index-type", kind, *knob)
        assert code == 0 and "300 unchanged" in out, out
        paths[kind] = root / kind
    return paths


def eval_index(path: Path, data: Path, *extra) -> dict:
    code, out = run("eval", "--index", path, "--data", data, "--target", "image", "--no-thresholds", "--json", *extra)
    assert code == 0, out
    return json.loads(out)


def test_a_flat_index_returns_the_exact_top_k(typed_indexes: dict[str, Path], synth_data: Path) -> None:
    report = eval_index(typed_indexes["flat"], synth_data)
    assert report["index_type"] == "flat" and report["search_params"] == {} and report["depth"] == 100
    assert report["index_recall"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert report["text_to_image"] == report["exact"]["text_to_image"]


def test_an_hnsw_index_reports_its_ef_search(typed_indexes: dict[str, Path], synth_data: Path) -> None:
    """The knob reaches the search: with 600 candidates (every item) HNSW is exact, and 7 finds no more."""
    report = eval_index(typed_indexes["hnsw"], synth_data, "--ef-search", "7")
    wide = eval_index(typed_indexes["hnsw"], synth_data, "--ef-search", "600")
    assert report["index_type"] == "hnsw" and report["search_params"] == {"ef_search": 7}
    assert wide["search_params"] == {"ef_search": 600} and wide["index_recall"]["R@10"] == 1.0
    assert wide["text_to_image"] == wide["exact"]["text_to_image"]
    assert report["index_recall"]["R@10"] <= wide["index_recall"]["R@10"]


def test_ivfpq_with_one_list_probed_is_not_exact(typed_indexes: dict[str, Path], synth_data: Path) -> None:
    """What the README's advice needs: ivfpq at nprobe 1 finds less of the exact top k, and its task figures
    differ from exact search's; the exact figures are the flat index's (the same stored vectors)."""
    flat, one = eval_index(typed_indexes["flat"], synth_data), eval_index(typed_indexes["ivfpq"], synth_data)
    assert one["index_type"] == "ivfpq" and one["search_params"] == {"nprobe": 1}
    assert one["index_recall"]["R@10"] < 1.0
    assert one["text_to_image"] != one["exact"]["text_to_image"]
    assert one["exact"] == flat["exact"]
    every = eval_index(typed_indexes["ivfpq"], synth_data, "--nprobe", "10000")  # every list: only PQ's error left
    assert every["search_params"] == {"nprobe": 10000}
    assert every["index_recall"]["R@10"] > one["index_recall"]["R@10"]


def test_the_index_table_names_the_index_exact_search_and_the_depth(
    typed_indexes: dict[str, Path], synth_data: Path
) -> None:
    code, out = run(
        "eval", "--index", typed_indexes["ivfpq"], "--data", synth_data, "--target", "image", "--depth", "20"
    )
    assert code == 0, out
    assert "text->image (ivfpq)" in out and "text->image (exact)" in out and "(exact scores)" in out
    assert "ivfpq index, nprobe 1: found" in out and "of the exact top 1 / 5 / 10" in out and "depth 20" in out
