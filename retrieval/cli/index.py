"""Commands on an index: build or update it (index), query it (search), describe it (info), remove items."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from retrieval.choices import FUSIONS, INDEX_TYPES, TARGETS
from retrieval.cli.params import BYTES, MODEL, check_knobs
from retrieval.errors import RetrievalError, shown

if TYPE_CHECKING:  # imported where a command needs it: numpy and faiss load only then
    from retrieval.index.build import IndexReport


@click.command()
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
    help="flat: exact; flat16: exact, from an fp16 scan re-ranked in fp32 (half flat's scan time at 1M); "
    "hnsw, ivf, ivfpq: approximate; auto: by size and memory (default for a new index).",
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
    from retrieval.index.build import BuildOptions

    options = BuildOptions(index_type, exclude, batch_size, check_knobs(ef_search, nprobe))
    r: IndexReport  # a MergeReport with --engine ray
    if engine == "ray":
        from retrieval.scale.ray import build_index_ray

        r = build_index_ray(
            source,
            model_dir,
            index_path,
            options,
            shard_size=shard_size,
            shard_dir=shard_dir,
            address=address,
            workers=workers,
            max_memory=max_memory,
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
        r = build_index(source, model_dir, index_path, options)
    click.echo(
        f"{index_path}: {r.added} added, {r.updated} updated, {r.removed} removed, {r.unchanged} unchanged "
        f"({r.index_type}{f', images in {r.precision}' if r.precision else ''}, {r.seconds:.1f} s)"
    )
    if r.skipped:
        click.echo(f"skipped {len(r.skipped)} item(s), each with its reason:")
        for message in r.skipped:
            click.echo(f"  {shown(message)}")


@click.command()
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
    "--fusion",
    type=click.Choice(FUSIONS),
    default="weighted",
    show_default=True,
    help="Whole items: how the image and caption scores make one: weighted by --weight, mean, max (either "
    "matches) or min (both match).",
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
    fusion: str,
    model_dir: str | None,
    ef_search: int | None,
    nprobe: int | None,
    margin: float | None,
    exact: bool,
    as_json: bool,
    max_memory: int | None,
) -> None:
    """Search an index: R(q, D) = {items with sim(q, x1, x2) > theta}, best first, at most k."""
    from retrieval.index.handle import Index

    index = Index.open(index_path, model_dir, max_memory)
    index.tune(**check_knobs(ef_search, nprobe))
    if theta is None and margin is None:
        theta, margin = index.calibrated(target, weight, fusion)
        if (theta, margin) != (None, None) and not as_json:
            click.echo(
                f"(calibrated cutoff: {f'theta {theta:.3f}' if theta is not None else f'margin {margin:.3f}'}; "
                "override with --theta or --margin)"
            )
    hits = index.search(text, image, like, k or None, theta, weight, target, exact, margin, fusion)
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit.to_json()))
        return
    if not hits:
        click.echo("no results" + (f" above theta {theta}" if theta is not None else ""))
    for rank, hit in enumerate(hits, 1):
        caption = hit.captions[0] if hit.captions else ""
        click.echo(f"{rank:>3}  {hit.score:6.3f}  {shown(hit.id)}  {shown(caption[:60])}")


@click.command()
@click.option(
    "--index", "index_path", required=True, type=click.Path(exists=True, file_okay=False), help="Index folder."
)
def info(index_path: str) -> None:
    """What an index holds: model, type, counts, build time and size."""
    from retrieval.index.store import IndexStore

    click.echo(json.dumps(IndexStore.open(index_path).info(), indent=2))


@click.command()
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
