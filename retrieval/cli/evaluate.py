"""Commands that measure or use a model on labelled pairs: eval, calibrate, classify."""

from __future__ import annotations

import json
from pathlib import Path

import click

from retrieval.choices import FUSIONS, TARGETS
from retrieval.cli.params import MODEL, check_knobs, check_writable, write_report
from retrieval.cli.report import format_report, markdown_report
from retrieval.errors import RetrievalError, shown
from retrieval.prompts import DEFAULT_TEMPLATE


@click.command("eval")
@click.option(
    "--model", "model_dir", type=MODEL, help="Model directory or hf:<checkpoint>: encode the pairs and evaluate it."
)
@click.option(
    "--index",
    "index_path",
    type=click.Path(exists=True, file_okay=False),
    help="Or an index: --data's captions are the queries, its ids the relevant items.",
)
@click.option(
    "--data", required=True, type=click.Path(exists=True), help="Pair manifest (.jsonl, .csv) or image folder."
)
@click.option(
    "--split-file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON of {split: [ids]} (default: split.json beside the data, if any).",
)
@click.option("--split", help="Evaluate only this split (e.g. test); default: every pair.")
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Comma-separated k for recall@k.")
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="image",
    show_default=True,
    help="With --index: what the queries match.",
)
@click.option(
    "--weight",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="With --index and --target item: the fusion weight w.",
)
@click.option(
    "--depth",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="With --index: results asked per query, of the index and of exact search; "
    "a relevant item beyond them is not found.",
)
@click.option("--ef-search", type=int, help="With --index (HNSW): candidates per query (default: the index's).")
@click.option("--nprobe", type=int, help="With --index (IVF): lists scanned per query (default: the index's).")
@click.option(
    "--thresholds/--no-thresholds",
    default=True,
    show_default=True,
    help="Precision/recall/F1 of R(q, D) as θ varies; the best θ; query-adaptive rules. "
    "With --index: exact, streamed over the stored vectors.",
)
@click.option(
    "--target-precision",
    type=click.FloatRange(0, 1, min_open=True),
    help="Also report the lowest θ whose precision reaches this.",
)
@click.option(
    "--fusion",
    is_flag=True,
    help="With --model: index each image with its first caption, query with the rest; text->item recall, mAP "
    "and θ figures under each fusion rule (mean, weighted with a sweep of w, max, min), then again with 30% of "
    "the captions removed at random (seeded; such an item is scored on its image alone).",
)
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Write PNG plots into this folder.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the whole report as JSON to this file.")
@click.option("--markdown", is_flag=True, help="Print tables ready for a README.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def eval_(
    model_dir: str | None,
    index_path: str | None,
    data: str,
    split_file: str | None,
    split: str | None,
    ks: str,
    target: str,
    weight: float,
    depth: int,
    ef_search: int | None,
    nprobe: int | None,
    thresholds: bool,
    target_precision: float | None,
    fusion: bool,
    plot_dir: str | None,
    out: str | None,
    markdown: bool,
    as_json: bool,
) -> None:
    """Recall@k, ranks and mAP (both directions, several captions per image), and how R(q, D) behaves as θ varies.

    Evaluate a model on a manifest (--model), or an existing index with a manifest of queries (--index): what
    its search returns (with its ef_search / nprobe), beside exact search, and how much of the exact top k it finds.
    """
    from retrieval.data.pairs import load_split_pairs
    from retrieval.jobs.evaluate import evaluate_model
    from retrieval.jobs.evaluate_index import evaluate_index

    if (model_dir is None) == (index_path is None):
        raise RetrievalError("give --model (evaluate a model on the pairs) or --index (evaluate an index), not both")
    check_writable(out, "--out")
    check_writable(plot_dir, "--plot", folder=True)
    pairs = load_split_pairs(data, split_file, split)
    curves = plot_dir is not None or out is not None
    if model_dir is not None:
        if ef_search is not None or nprobe is not None:
            raise RetrievalError("--ef-search and --nprobe tune an index's search: they go with --index")
        report = evaluate_model(model_dir, pairs, _parse_ks(ks), thresholds, target_precision, fusion, curves)
    else:
        if fusion:
            raise RetrievalError("--fusion needs --model: it re-indexes the images with one caption each")
        assert index_path is not None  # exactly one of the two, checked above
        knobs = check_knobs(ef_search, nprobe)
        report = evaluate_index(
            index_path, pairs, _parse_ks(ks), target, weight, thresholds, target_precision, curves, depth, **knobs
        )
    if out:
        write_report(out, json.dumps(report, indent=1))
    if plot_dir:
        from retrieval.evaluation.plots import report_plots

        files = report_plots(report, Path(plot_dir), Path(data).parent.name or Path(data).name)
        click.echo(f"plots: {', '.join(str(f) for f in files)}", err=True)
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(markdown_report(report) if markdown else format_report(report))


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise RetrievalError(f"--k must be comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise RetrievalError(f"--k must be comma-separated positive integers, got {text!r}")
    return ks


@click.command()
@click.option(
    "--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder."
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True),
    help="Labelled queries: a pair manifest whose ids are the index's item ids.",
)
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False), help="JSON of {split: [ids]}.")
@click.option("--split", help="Use only this split's pairs (e.g. dev): calibrate on data you don't report on.")
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="image",
    show_default=True,
    help="The search mode the cutoff is for.",
)
@click.option(
    "--weight",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="With --target item --fusion weighted: the fusion weight w.",
)
@click.option(
    "--fusion",
    type=click.Choice(FUSIONS),
    default="weighted",
    show_default=True,
    help="With --target item: the rule whose scores the cutoff is chosen on; `search` applies it under that rule "
    "only. The index keeps one cutoff per target: calibrating items again, under any rule, replaces it.",
)
@click.option(
    "--target-precision",
    type=click.FloatRange(0, 1, min_open=True),
    help="Flat rule: the lowest θ reaching this precision, instead of the F1-best θ.",
)
@click.option(
    "--rule",
    type=click.Choice(["flat", "top_relative"]),
    default="flat",
    show_default=True,
    help="flat: one θ for all queries; top_relative: a margin below each query's top score.",
)
def calibrate(
    index_path: str,
    data: str,
    split_file: str | None,
    split: str | None,
    target: str,
    weight: float,
    fusion: str,
    target_precision: float | None,
    rule: str,
) -> None:
    """Choose the cutoff of R(q, D) on labelled queries and store it in the index: `search` then uses it
    when --theta and --margin are not given (for whole items: under the same --fusion and --weight)."""
    from retrieval.data.pairs import load_split_pairs
    from retrieval.jobs.calibrate import calibrate_index

    entry = calibrate_index(
        index_path, load_split_pairs(data, split_file, split), target, weight, target_precision, rule, fusion
    )
    cutoff = (
        f"theta = {entry['theta']:.4f}" if "theta" in entry else f"margin = {entry['margin']:.4f} below the top score"
    )
    scoring = {"weighted": f" at w = {entry['weight']:g}", "mean": " (mean)"}.get(fusion, f" under {fusion}")
    click.echo(
        f"{index_path}: {target} searches{scoring if target == 'item' else ''} now use {cutoff} "
        f"(F1 {entry['best_f1']:.3f} on {entry['n_queries']} "
        f"queries, {entry['heldout_f1']:.3f} held out)"
    )


@click.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--model", "model_dir", required=True, type=MODEL, help="Model directory, or hf:<checkpoint dir or hub name>."
)
@click.option("--labels", help="Comma-separated labels (default: the distinct values of --label-field).")
@click.option("--data", type=click.Path(exists=True), help="Classify a manifest's items instead of FILES.")
@click.option("--label-field", help="With --data: the field holding each item's true label; reports accuracy.")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False), help="JSON of {split: [ids]}.")
@click.option("--split", help="With --data: only this split (e.g. test).")
@click.option(
    "--template",
    default=DEFAULT_TEMPLATE,
    show_default=True,
    help="The prompt each label becomes; must contain {label}.",
)
@click.option(
    "--weight",
    type=click.FloatRange(0, 1),
    default=1.0,
    show_default=True,
    help="w of sim(y, x1, x2): 1 = the image alone, 0 = the caption alone.",
)
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Write a confusion matrix PNG here.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the report (and per-item top labels) as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def classify(
    files: tuple[str, ...],
    model_dir: str,
    labels: str | None,
    data: str | None,
    label_field: str | None,
    split_file: str | None,
    split: str | None,
    template: str,
    weight: float,
    plot_dir: str | None,
    out: str | None,
    as_json: bool,
) -> None:
    """Zero-shot classification: P(y | x1, x2) = softmax over labels y of s * sim(prompt(y), x1, x2).

    Classify image FILES against --labels, or a manifest's items (--data) with accuracy against --label-field.
    """
    from retrieval.data.pairs import Pair, load_split_pairs
    from retrieval.jobs.classify import classify_pairs

    if bool(files) == bool(data):
        raise RetrievalError("give image FILES or --data MANIFEST (not both)")
    if label_field and not data:
        raise RetrievalError("--label-field needs --data")
    check_writable(out, "--out")
    check_writable(plot_dir, "--plot", folder=True)
    pairs = load_split_pairs(data, split_file, split) if data else [Pair(f, Path(f), ()) for f in files]
    label_list = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    result = classify_pairs(model_dir, pairs, label_list, label_field, template, weight)
    del result["probabilities"], result["ids"]  # arrays for Python callers; the report shows each item's top labels
    names = result["labels"]
    report = result.get("report")
    if out:
        write_report(out, json.dumps(result, indent=1))
    if plot_dir and report:
        import numpy as np

        from retrieval.evaluation.plots import confusion

        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        path = confusion(
            np.array(report["confusion"]),
            names,
            Path(plot_dir) / "confusion.png",
            f"zero-shot {label_field}: top-1 {100 * report['top1']:.1f}% (chance {100 * report['chance_top1']:.1f}%)",
        )
        click.echo(f"plot: {path}", err=True)
    if as_json:
        click.echo(json.dumps(report if report else result["top"]))
    elif report:
        click.echo(
            f"{report['n_items']} items, {report['n_labels']} labels: top-1 {100 * report['top1']:.1f}%, "
            f"top-5 {100 * report['top5']:.1f}% (chance {100 * report['chance_top1']:.1f}% / "
            f"{100 * report['chance_top5']:.1f}%; always the most common label: {100 * report['majority_top1']:.1f}%)"
        )
        for label, r in report["per_label"].items():
            click.echo(
                f"  {shown(label):<24} n={r['n']:<5} top-1 "
                + (f"{100 * r['top1']:.1f}%" if r["top1"] is not None else "-")
            )
    else:
        for item_id, top in result["top"].items():
            click.echo(f"{shown(item_id)}: " + ", ".join(f"{shown(label)} {p:.2f}" for label, p in top))
    if result["skipped"]:
        click.echo(f"skipped {result['skipped']} item(s) with no readable image or caption", err=True)
