"""The training loop: contrastive training of the dual encoder on image-caption pairs.

Images are decoded once, up front, into a small in-memory bank (a bad image is reported and skipped
there, so no epoch can crash on one). Each step trains on a batch of images, augmented together in torch
(augment.py), and every caption of them. Locked towers run once, before the first epoch (features.py): a
locked text tower on every caption, a locked pretrained image tower on a few views of every image. The
learning rate warms up linearly, then follows a cosine to zero over the run, where the run ends at the last
epoch or at the time budget (which counts the locked towers' runs), whichever comes first. After every
epoch the held-out recall is measured, the best model is kept in the output directory, and the full
training state is saved so `--resume` loses at most one epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.atomic import atomic_write, atomic_write_text
from retrieval.data.augment import augment_batch
from retrieval.data.images import Transform, load_image
from retrieval.data.pairs import Pair, image_caption_pairs
from retrieval.errors import ImageError, RetrievalError
from retrieval.evaluation.metrics import retrieval_report
from retrieval.models.config import ModelConfig, TrainConfig, loss_init, model_config_from_dict, model_config_to_dict
from retrieval.models.efficientnet import PretrainedImageTower
from retrieval.models.encoder import Encoder, use_bf16
from retrieval.models.tokenizer import Tokenizer
from retrieval.models.towers import DualEncoder
from retrieval.progress import progress_bar
from retrieval.train.features import ImageCache, TextCache
from retrieval.train.loss import clip_loss, siglip_loss

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
MAX_EVAL_IMAGES = 1000  # held-out recall after each epoch on at most this many images, to keep epochs cheap
LOAD_MARGIN = 8 / 7  # images are banked a little larger than the model input, room for random crops
STREAMS = ("batch order", "draws", "cached views")  # a run's random streams, each seeded apart (stream_seed)


@dataclass
class ImageBank:
    """Decoded training images as small RGB arrays, and the pairs whose images could not be read."""

    pairs: list[Pair]
    images: list[np.ndarray]  # (S', S', 3) uint8 each
    skipped: list[tuple[Pair, str]]


def bank_images(pairs: Sequence[Pair], transform: Transform, progress: bool = True) -> ImageBank:
    """Decode every image once (two threads: Pillow releases the GIL); unreadable ones are skipped."""
    side = round(transform.size * LOAD_MARGIN)

    def load(pair: Pair) -> np.ndarray | str:
        if pair.image is None:  # skipped like an unreadable one (callers pass image_caption_pairs)
            return f"item {pair.id} has no image"
        try:
            return np.asarray(transform.bank(load_image(pair.image, size_hint=side), side))
        except ImageError as e:
            return str(e)

    with ThreadPoolExecutor(2) as pool:
        results = list(
            progress_bar(
                pool.map(load, pairs), total=len(pairs), desc="decode images", unit="image", disable=not progress
            )
        )
    bank = ImageBank([], [], [])
    for pair, result in zip(pairs, results, strict=True):
        if isinstance(result, str):
            bank.skipped.append((pair, result))
        else:
            bank.pairs.append(pair)
            bank.images.append(result)
    return bank


def stream_seed(seed: int, stream: str, epoch: int = 0) -> int:
    """The torch seed of one random stream of a run (STREAMS) in one epoch: a function of (seed, stream, epoch)
    alone, so a resumed run draws what the uninterrupted one would have, and hashed by numpy's SeedSequence, so
    no two (stream, epoch) share a seed. (An arithmetic rule such as seed*1000 + epoch (+1) made one epoch's
    augmentation draws the next epoch's batch order.)"""
    entropy = [seed, STREAMS.index(stream), epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def epoch_batches(n_images: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Image rows for each step of an epoch: a random order seeded by (seed, epoch), so a resumed run sees
    the same batches; the last partial batch is dropped."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(stream_seed(seed, "batch order", epoch)))
    return [order[s : s + batch_size] for s in range(0, n_images - batch_size + 1, batch_size)]


def batch_captions(
    pairs: Sequence[Pair], rows: torch.Tensor, all_captions: bool, generator: torch.Generator
) -> tuple[list[str], torch.Tensor]:
    """(captions, owner) for a step: every caption of each image in `rows`, or one drawn at random;
    owner[c] is the batch position of caption c's image."""
    texts, owner = [], []
    for position, row in enumerate(rows.tolist()):
        captions = pairs[row].captions
        if not all_captions:
            captions = (captions[int(torch.randint(len(captions), (1,), generator=generator))],)
        texts += captions
        owner += [position] * len(captions)
    return texts, torch.tensor(owner)


def lr_factor(progress: float, warmup_fraction: float) -> float:
    """Linear warm-up over the first warmup_fraction of the run, then cosine decay to zero at progress 1."""
    if progress < warmup_fraction:
        return progress / warmup_fraction
    t = (progress - warmup_fraction) / max(1e-9, 1 - warmup_fraction)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices and conv kernels only; norms, biases, embeddings' scales and the temperature not."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # a locked pretrained tower
            continue
        (decay if p.ndim >= 2 and "position_embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate_bank(
    model: Encoder,
    bank: ImageBank,
    batch_size: int,
    text_cache: TextCache | None = None,
    image_cache: ImageCache | None = None,
) -> dict[str, Any]:
    """Held-out recall on banked images (centre crop) and all their captions."""
    texts = [c for p in bank.pairs for c in p.captions]
    text_image = np.array([i for i, p in enumerate(bank.pairs) for _ in p.captions])
    text_emb = model.project_text_outputs(text_cache(texts)) if text_cache else model.encode_text(texts, batch_size)
    if image_cache is not None:
        assert isinstance(model, DualEncoder), "only our image towers are cached"
        image_emb = model.project_image_outputs(image_cache.centre())
    else:
        pixels = np.stack([model.transform.preprocess(Image.fromarray(a)) for a in bank.images])
        image_emb = model.encode_image(pixels, batch_size)
    return retrieval_report(image_emb, text_emb, text_image)


def selection_score(report: dict[str, Any]) -> float:
    """The sum of R@1/5/10 in both directions ('rsum'), the usual model-selection figure."""
    return sum(v for d in ("text_to_image", "image_to_text") for k, v in report[d].items() if k.startswith("R@"))


def is_best(score: float, best: float) -> bool:
    """Whether an epoch scoring `score` replaces the kept model, the best so far scoring `best`: only a higher
    score does. On a tie the earlier epoch stays: the later one has no better held-out evidence, and keeping the
    first saves a write. The epoch's log line says `best` by this same rule, so it is true exactly when the
    epoch's model was saved."""
    return score > best


def train(
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    out: str | Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    max_minutes: float | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    init: str | None = None,
    freeze: str | None = None,
) -> Path:
    """Train, keep the best model by held-out rsum in `out`, and return `out`.

    init: an `hf:` CLIP/SigLIP checkpoint to fine-tune instead of training our towers (model_cfg unused);
    freeze: "image" or "text", the side of it kept locked.
    """
    out = Path(out)
    train_pairs, val_pairs = image_caption_pairs(train_pairs), image_caption_pairs(val_pairs)[:MAX_EVAL_IMAGES]
    if not train_pairs:
        raise RetrievalError("no training pairs with both an image and a caption; check the manifest and split")
    torch.manual_seed(train_cfg.seed)
    state = _load_state(out) if resume else None
    model = build_model(model_cfg, train_cfg, train_pairs, state, init, freeze)
    # torch's stubs lack Module.to's memory_format overload, which it takes at runtime
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    train_bank, val_bank = (
        bank_images(train_pairs, model.transform, progress),
        bank_images(val_pairs, model.transform, progress),
    )
    if len(train_bank.images) < 2:
        raise RetrievalError(f"only {len(train_bank.images)} readable training image(s); need at least 2")

    opt = torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    start_epoch, best, elapsed_before = 0, -1.0, 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        start_epoch, best, elapsed_before = state["epoch"] + 1, state["best"], state["elapsed"]
    text_cache = None
    if model.text_locked:
        text_cache = TextCache(model, (c for p in train_bank.pairs + val_bank.pairs for c in p.captions), progress)
    out.mkdir(parents=True, exist_ok=True)
    _trim_log(out, start_epoch)

    images = _as_tensor(train_bank.images)  # (N, 3, S', S') uint8
    augmentation = train_cfg.augmentation if train_cfg.augment else None
    batch_size = min(train_cfg.batch_size, len(images))
    steps_per_epoch = len(images) // batch_size
    total_steps = steps_per_epoch * train_cfg.epochs
    budget = max_minutes * 60 if max_minutes else math.inf
    bf16 = use_bf16(train_cfg.bf16)
    t0 = time.monotonic() - elapsed_before
    image_cache = val_cache = None
    if getattr(model, "image_cacheable", False):
        views_seed = stream_seed(train_cfg.seed, "cached views")
        image_cache = ImageCache(model, images, train_cfg.views, augmentation, views_seed, bf16, progress)
        if val_bank.images:
            val_cache = ImageCache(model, _as_tensor(val_bank.images), 1, None, views_seed, bf16, progress)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, train_cfg.epochs):
        generator = torch.Generator().manual_seed(stream_seed(train_cfg.seed, "draws", epoch))  # augmentation, captions
        model.train()
        losses, n_pairs, t_epoch = [], 0, time.monotonic()
        bar = progress_bar(
            epoch_batches(len(images), batch_size, train_cfg.seed, epoch),
            desc=f"epoch {epoch + 1}/{train_cfg.epochs}",
            disable=not progress,
            leave=False,
        )
        for rows in bar:
            progress_frac = max(step / total_steps, (time.monotonic() - t0) / budget)
            if progress_frac >= 1:
                break
            for g in opt.param_groups:
                g["lr"] = train_cfg.lr * lr_factor(progress_frac, train_cfg.warmup_fraction)
            if image_cache is not None:
                image_input, image_features = image_cache.sample(rows, generator), model.image_features_from_locked
            else:
                image_input = augment_batch(
                    images[rows],
                    model.transform.size,
                    model.transform.mean,
                    model.transform.std,
                    augmentation,
                    generator,
                )
                image_features = model.image_features
            texts, owner = batch_captions(train_bank.pairs, rows, train_cfg.all_captions, generator)
            text = text_cache(texts) if text_cache is not None else torch.from_numpy(model.tokenize(texts))
            loss = _step(model, opt, image_features, image_input, text, owner, train_cfg, bf16)
            losses.append(loss)
            n_pairs += len(rows)
            step += 1
            bar.set_postfix(loss=f"{loss:.3f}", pairs_s=f"{n_pairs / (time.monotonic() - t_epoch):.0f}")
        bar.close()
        report = (
            evaluate_bank(model, val_bank, train_cfg.eval_batch_size, text_cache, val_cache)
            if val_bank.images
            else None
        )
        score = selection_score(report) if report else float(epoch)
        saved = is_best(score, best)
        if saved:
            best = score
            model.save(out)
        entry = {
            "epoch": epoch + 1,
            "step": step,
            "loss": float(np.mean(losses)) if losses else None,
            "lr": opt.param_groups[0]["lr"],
            "inverse_temperature": model.inverse_temperature().item(),
            "pairs_per_s": n_pairs / max(1e-9, time.monotonic() - t_epoch),
            "bf16": bf16,
            "elapsed_s": time.monotonic() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "val": report,
            "best": saved,  # this epoch's model is the one in `out` (is_best)
            "skipped_images": len(train_bank.skipped) + len(val_bank.skipped),
        }
        _append_log(out, entry)
        _save_state(out, model, opt, epoch, best, time.monotonic() - t0, train_cfg)
        if on_epoch:
            on_epoch(entry)
        if step >= total_steps or time.monotonic() - t0 >= budget:
            break
    _write_skipped(out, train_bank.skipped + val_bank.skipped)
    return out


def build_model(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_pairs: Sequence[Pair],
    state: dict[str, Any] | None,
    init: str | None,
    freeze: str | None,
) -> Encoder:
    """Our dual encoder, new or as it was saved for --resume; or the hf: checkpoint `init`, `freeze` side locked."""
    if init is not None:
        from retrieval.models.pretrained import load_hf

        hf_model = load_hf(init)
        if freeze:
            hf_model.freeze(freeze)
        model: Encoder = hf_model
    else:
        if state is not None and not state["model_config"]:
            raise RetrievalError("this run fine-tunes a Hugging Face checkpoint: resume it with the same --init hf:...")
        model_cfg = (
            model_config_from_dict(json.loads(state["model_config"])) if state else loss_init(model_cfg, train_cfg.loss)
        )
        tokenizer, text_tower, model_cfg = text_side(model_cfg, train_pairs, state)
        ours = DualEncoder(model_cfg, tokenizer, text_tower)
        if state is None and isinstance(ours.image_tower, PretrainedImageTower):  # image_cacheable: it starts
            ours.image_tower.load_packaged()  # from its package's weights
        model = ours
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:  # missing or mis-sized weights: the run was started with another --init (or none)
            raise RetrievalError(
                "the interrupted run was started with another model: resume with the same --init "
                "(or none), or start again without --resume"
            ) from None
    return model


def text_side(
    cfg: ModelConfig, train_pairs: Sequence[Pair], state: dict[str, Any] | None
) -> tuple[Any, Any, ModelConfig]:
    """(tokenizer, text tower, config): our tokenizer trained on the captions (or resumed) with our own tower
    (None: DualEncoder builds it), or a pretrained tower with its own tokenizer and its sizes in the config."""
    if cfg.text.kind != "own":
        from retrieval.models.pretrained import load_pretrained_text_tower

        tower, tokenizer, text = load_pretrained_text_tower(cfg.text)
        return tokenizer, tower, dataclasses.replace(cfg, text=text)
    if state is not None:
        return Tokenizer(state["vocab"]), None, cfg
    trained = Tokenizer.train(c for p in train_pairs for c in p.captions)
    return trained, None, dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(trained)))


def _as_tensor(bank: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(bank)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S', S') uint8


def _step(
    model: Encoder,
    opt: torch.optim.Optimizer,
    image_features: Callable[[torch.Tensor], torch.Tensor],
    image_input: torch.Tensor,
    text,
    owner,
    cfg: TrainConfig,
    bf16: bool,
) -> float:
    """One optimiser step; image_features maps image_input (pixels, or a locked tower's cached outputs) to (B, D)."""
    if image_input.ndim == 4:
        image_input = image_input.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        image_emb, text_emb, scale = image_features(image_input), model.text_features(text), model.inverse_temperature()
    if cfg.loss == "siglip":
        bias = model.logit_bias  # a Parameter (ours) or the checkpoint's (SigLIP)
        assert isinstance(bias, torch.Tensor), "a siglip loss needs a model with a logit bias"
        loss = siglip_loss(image_emb, text_emb, scale, bias, owner)
    else:
        loss = clip_loss(image_emb, text_emb, scale, owner)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.item()


def _save_state(out: Path, model: Encoder, opt, epoch, best, elapsed, train_cfg) -> None:
    """Everything --resume needs, loadable with torch.load(weights_only=True): tensors and plain values only.
    A pretrained tokenizer or checkpoint is not stored: it loads again from its package or hf: path."""
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "vocab": model.tokenizer.vocab if isinstance(model.tokenizer, Tokenizer) else [],
        "epoch": epoch,
        "best": best,
        "elapsed": elapsed,
        "model_config": json.dumps(model_config_to_dict(model.config)) if isinstance(model, DualEncoder) else "",
        "train_config": json.dumps(dataclasses.asdict(train_cfg)),
    }
    atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))


def _load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.is_file():
        raise RetrievalError(f"nothing to resume: {path} does not exist; start without --resume")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several types
        raise RetrievalError(f"cannot resume from {path} ({str(e).splitlines()[0]}); start without --resume") from e


def _trim_log(out: Path, epochs_done: int) -> None:
    """Keep only the log lines of the epochs the saved state has (none for a new run).

    An epoch's line is appended before its state is saved, so a run killed between the two has a line for an
    epoch that --resume runs again; without this the log would hold that epoch twice. A line cut short by
    the kill is dropped too.
    """
    log = out / LOG_FILE
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("epoch"), int) and entry["epoch"] <= epochs_done:
            kept.append(line + "\n")
    atomic_write_text(log, "".join(kept))


def _append_log(out: Path, entry: dict[str, Any]) -> None:
    with (out / LOG_FILE).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _write_skipped(out: Path, skipped: list[tuple[Pair, str]]) -> None:
    """List the unreadable images beside the model so a user can fix or remove them."""
    path = out / "skipped_images.txt"
    if skipped:
        path.write_text("".join(f"{reason}\n" for _, reason in skipped))
    elif path.exists():
        path.unlink()
