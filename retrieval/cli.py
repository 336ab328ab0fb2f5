"""The `retrieval` command: parse options, call the API, format the answer. The only module that prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .config import LOSSES, PRESETS
from .index import INDEX_TYPES
from .errors import RetrievalError
from .query import TARGETS


class Group(click.Group):
    """Turns our own errors into a one-line `Error: ...` and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RetrievalError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=Group)
def main() -> None:
    """Cross-modal retrieval: train a text-image dual encoder, evaluate it, search with it.

    Start with `retrieval demo`, which makes sample data, trains a model and queries it.
    """


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write images/, pairs.jsonl, split.json.")
@click.option("--n", default=1000, show_default=True, type=click.IntRange(min=1), help="Number of scenes.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same collection.")
@click.option("--size", default=96, show_default=True, type=click.IntRange(min=16), help="Image side in pixels.")
def synth(out: str, n: int, seed: int, size: int) -> None:
    """Generate a synthetic collection: coloured shapes with compositional captions."""
    from .synth import generate

    manifest = generate(out, n, seed=seed, size=size)
    click.echo(f"wrote {n} scenes: {manifest}")


@main.command()
@click.option("--data", required=True, type=click.Path(exists=True), help="Pair manifest (.jsonl, .csv) or image folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--preset", "preset_name", default="default", show_default=True, type=click.Choice(list(PRESETS)), help="Model size and training defaults.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs (default: the preset's).")
@click.option("--batch-size", type=click.IntRange(min=2), help="Pairs per step (default: the preset's).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (default: the preset's).")
@click.option("--loss", type=click.Choice(LOSSES), help="clip: symmetric InfoNCE; siglip: sigmoid loss, better at small batches.")
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False), help="JSON of {split: [ids]} (default: split.json beside the data, if any).")
@click.option("--train-split", default="train", show_default=True, help="Split to train on.")
@click.option("--val-split", default="test", show_default=True, help="Held-out split that picks the best epoch.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), help="Time budget: the schedule ends in it.")
@click.option("--workers", type=click.IntRange(min=0), help="Data-loading processes (default: the preset's).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last epoch.")
def train(data: str, out: str, preset_name: str, split_file: str | None, train_split: str, val_split: str,
          max_minutes: float | None, resume: bool, **overrides: Any) -> None:
    """Train a dual encoder on image-caption pairs; the best epoch by held-out recall is kept."""
    from .api import train_model

    def report(entry: dict[str, Any]) -> None:
        val = entry["val"]
        recall = f"  val t2i R@1/5/10 {_recalls(val['text_to_image'])}" if val else ""
        click.echo(f"epoch {entry['epoch']}: loss {entry['loss']:.3f}  {entry['pairs_per_s']:.0f} pairs/s{recall}"
                   + ("  *best" if entry["best"] else ""), err=True)

    summary = train_model(data, out, preset_name, split_file, train_split, val_split, max_minutes, resume,
                          on_epoch=report, **overrides)
    last = summary["log"][-1] if summary["log"] else {}
    click.echo(f"model: {out}  ({summary['minutes']:.1f} min, peak memory {last.get('peak_rss_mb', 0):.0f} MB)")
    if last.get("skipped_images"):
        click.echo(f"skipped {last['skipped_images']} unreadable image(s): see {Path(out) / 'skipped_images.txt'}")


@main.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Model directory.")
@click.option("--data", required=True, type=click.Path(exists=True), help="Pair manifest (.jsonl, .csv) or image folder.")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False), help="JSON of {split: [ids]} (default: split.json beside the data, if any).")
@click.option("--split", help="Evaluate only this split (e.g. test); default: every pair.")
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Comma-separated k for recall@k.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def eval_(model_dir: str, data: str, split_file: str | None, split: str | None, ks: str, as_json: bool) -> None:
    """Recall@k and ranks, text->image and image->text, several captions per image allowed."""
    from .api import evaluate_model, load_split_pairs

    report = evaluate_model(model_dir, load_split_pairs(data, split_file, split), _parse_ks(ks))
    click.echo(json.dumps(report) if as_json else _format_report(report))


@main.command()
@click.option("--root", default="index_data/demo", show_default=True, type=click.Path(file_okay=False), help="Where the demo keeps its data and model.")
@click.option("--minutes", default=2.5, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Training budget.")
def demo(root: str, minutes: float) -> None:
    """The main job on the embedded default: sample data, train (or reuse) a model, evaluate, query."""
    from .api import run_demo

    result = run_demo(root, minutes=minutes)
    how = f"trained in {result.train_minutes:.1f} min" if result.trained else "reused; delete it to retrain"
    click.echo(f"data:  {result.data}\nmodel: {result.model} ({how})\nindex: {result.index}\n")
    click.echo("held-out recall:\n" + _format_report(result.report) + "\n")
    click.echo("example text->image searches through the index (* = the image the caption was written for):")
    for query, own_id, hits in result.examples:
        click.echo(f'  "{query}"')
        for hit in hits:
            click.echo(f"    {'*' if hit.id == own_id else ' '} {hit.score:.3f}  {hit.id}")
    click.echo(f"\nsearch it yourself: retrieval search --index {result.index} --text \"a small red circle\"")


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


def _format_report(report: dict[str, Any]) -> str:
    t2i, i2t = report["text_to_image"], report["image_to_text"]
    keys = [k for k in t2i if k.startswith("R@")] + ["median_rank", "mean_rank"]
    cell = lambda d, k: f"{100 * d[k]:.1f}%" if k.startswith("R@") else f"{d[k]:.1f}"  # noqa: E731
    lines = [f"  {'':<14}" + "".join(f"{k:>12}" for k in keys),
             f"  {'text->image':<14}" + "".join(f"{cell(t2i, k):>12}" for k in keys),
             f"  {'image->text':<14}" + "".join(f"{cell(i2t, k):>12}" for k in keys),
             f"  ({report['n_images']} images, {report['n_texts']} captions"
             + (f", {report['skipped_images']} unreadable images skipped)" if report.get("skipped_images") else ")")]
    return "\n".join(lines)


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Model directory to encode with.")
@click.option("--index", "index_path", required=True, type=click.Path(file_okay=False), help="Index folder (created if missing), e.g. index_data/photos.")
@click.option("--index-type", type=click.Choice(INDEX_TYPES), help="flat: exact; hnsw, ivf, ivfpq: approximate; auto: by size and memory (default for a new index).")
@click.option("--exclude", multiple=True, help="Glob over item ids (relative paths) to leave out; repeatable.")
@click.option("--ef-search", type=click.IntRange(min=1), help="HNSW: candidates per query (recall vs speed).")
@click.option("--nprobe", type=click.IntRange(min=1), help="IVF: inverted lists scanned per query (recall vs speed).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Items encoded and committed together.")
def index(source: str, model_dir: str, index_path: str, index_type: str | None, exclude: tuple[str, ...],
          ef_search: int | None, nprobe: int | None, batch_size: int) -> None:
    """Index a folder of images (with optional NAME.txt captions) or a pair manifest.

    Re-running updates the index: only new or changed items are encoded, deleted ones are removed, and an
    interrupted run resumes where it stopped.
    """
    from .indexing import build_index

    params = {k: v for k, v in (("ef_search", ef_search), ("nprobe", nprobe)) if v is not None}
    r = build_index(source, model_dir, index_path, index_type, exclude, batch_size, params)
    click.echo(f"{index_path}: {r.added} added, {r.updated} updated, {r.removed} removed, {r.unchanged} unchanged "
               f"({r.index_type}, {r.seconds:.1f} s)")
    if r.skipped:
        click.echo(f"skipped {len(r.skipped)} unreadable file(s):")
        for message in r.skipped:
            click.echo(f"  {message}")


@main.command()
@click.option("--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder.")
@click.option("--text", help="Search with a text.")
@click.option("--image", type=click.Path(), help="Search with an image file.")
@click.option("--like", help="Search with an indexed item's id ('more like this').")
@click.option("--k", type=int, default=10, show_default=True, help="At most this many results (0: no limit, with --theta).")
@click.option("--theta", type=float, help="Only results with similarity above this (in [-1, 1]).")
@click.option("--weight", type=float, default=0.5, show_default=True, help="w in sim = w cos(q, image) + (1-w) cos(q, caption).")
@click.option("--target", type=click.Choice(TARGETS), default="item", show_default=True, help="What to match: whole items (fused), images only, or captions only.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), help="Model directory, if it moved since indexing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: id, path, caption, score.")
def search(index_path: str, text: str | None, image: str | None, like: str | None, k: int, theta: float | None,
           weight: float, target: str, model_dir: str | None, as_json: bool) -> None:
    """Search an index: R(q, D) = {items with sim(q, x1, x2) > theta}, best first, at most k."""
    from .query import Index

    hits = Index.open(index_path, model_dir).search(text, image, like, k or None, theta, weight, target)
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit.to_json()))
        return
    if not hits:
        click.echo("no results" + (f" above theta {theta}" if theta is not None else ""))
    for rank, hit in enumerate(hits, 1):
        caption = hit.captions[0] if hit.captions else ""
        click.echo(f"{rank:>3}  {hit.score:6.3f}  {hit.id}  {caption[:60]}")


@main.command()
@click.option("--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder.")
def info(index_path: str) -> None:
    """What an index holds: model, type, counts, build time and size."""
    from .index import IndexStore

    click.echo(json.dumps(IndexStore.open(index_path).info(), indent=2))


@main.command()
@click.option("--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder.")
@click.argument("ids", nargs=-1, required=True)
def remove(index_path: str, ids: tuple[str, ...]) -> None:
    """Remove items from an index by id."""
    from .indexing import remove_items

    missing = remove_items(index_path, list(ids))
    click.echo(f"removed {len(ids) - len(missing)} item(s)" + (f"; not found: {', '.join(missing)}" if missing else ""))


@main.command()
@click.option("--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 opens the server to your network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Let pages from this origin (e.g. http://localhost:3000) call the API; repeatable. Off by default.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), help="Model directory, if it moved since indexing.")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Largest image upload accepted.")
@click.option("--max-image-megapixels", default=40.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Largest uploaded image accepted for decoding (its size is read from the header first).")
@click.option("--threads", type=click.IntRange(min=1), help="Requests worked on at once; the rest queue (default: one per CPU core).")
def serve(index_path: str, host: str, port: int, cors_origins: tuple[str, ...], model_dir: str | None,
          max_upload_mb: float, max_image_megapixels: float, threads: int | None) -> None:
    """Serve the search API and the web page: open http://HOST:PORT/ in a browser.

    The model and index load once, before the first request. Endpoints: /api/search, /api/search/image,
    /api/items/ID, /api/thumb/ID, /api/health, /api/info; the OpenAPI spec is at /openapi.json.
    """
    from .server import serve as run_server  # fastapi and uvicorn only for this command

    click.echo(f"loading {index_path} ...", err=True)
    run_server(index_path, host, port, list(cors_origins), model=model_dir, max_upload_bytes=int(max_upload_mb * 2**20),
               max_upload_pixels=int(max_image_megapixels * 1e6), threads=threads)
