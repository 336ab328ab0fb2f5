"""The training loop: contrastive training of the dual encoder on image-caption pairs.

Images are decoded once, up front, into a small in-memory bank (bank.py; a bad image is reported and skipped
there, so no epoch can crash on one). Each step trains on a batch of images (batches.py), augmented together in
torch (augment.py), and every caption of them. Locked towers run once, before the first epoch (features.py): a
locked text tower on every caption, a locked pretrained image tower on a few views of every image. The
learning rate warms up linearly, then follows a cosine to zero over the run, where the run ends at the last
epoch or at the time budget (which counts the locked towers' runs), whichever comes first. After every
epoch the held-out recall is measured, the best model is kept in the output directory (selection.py), and the
full training state is saved so `--resume` loses at most one epoch (checkpoint.py).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.data.pairs import Pair, image_caption_pairs
from retrieval.errors import RetrievalError
from retrieval.models.config import ModelConfig, TrainConfig
from retrieval.models.encoder import Encoder, use_bf16
from retrieval.progress import progress_bar
from retrieval.threads import ThreadFit
from retrieval.train.augment import augment_batch
from retrieval.train.bank import as_tensor, bank_images
from retrieval.train.batches import batch_captions, epoch_batches, stream_seed
from retrieval.train.build import build_model
from retrieval.train.checkpoint import append_log, load_state, save_state, trim_log, write_skipped
from retrieval.train.features import ImageCache, TextCache
from retrieval.train.loss import clip_loss, siglip_loss
from retrieval.train.selection import MAX_EVAL_IMAGES, evaluate_bank, is_best, selection_score


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
    with ThreadFit() as threads:  # as many threads as cores other jobs leave free, re-counted as steps run
        threads.update()
        state = load_state(out) if resume else None
        model = build_model(model_cfg, train_cfg, train_pairs, state, init, freeze)
        # torch's stubs lack Module.to's memory_format overload, which it takes at runtime
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        train_bank, val_bank = (
            bank_images(train_pairs, model.transform, progress),
            bank_images(val_pairs, model.transform, progress),
        )
        if len(train_bank.images) < 2:
            raise RetrievalError(f"only {len(train_bank.images)} readable training image(s); need at least 2")

        opt = torch.optim.AdamW(
            param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr, betas=(0.9, 0.98), eps=1e-6
        )
        start_epoch, best, elapsed_before = 0, -1.0, 0.0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            start_epoch, best, elapsed_before = state["epoch"] + 1, state["best"], state["elapsed"]
        text_cache = None
        if model.text_locked:
            text_cache = TextCache(model, (c for p in train_bank.pairs + val_bank.pairs for c in p.captions), progress)
        out.mkdir(parents=True, exist_ok=True)
        trim_log(out, start_epoch)

        images = as_tensor(train_bank.images)  # (N, 3, S', S') uint8
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
                val_cache = ImageCache(model, as_tensor(val_bank.images), 1, None, views_seed, bf16, progress)
        step = start_epoch * steps_per_epoch
        for epoch in range(start_epoch, train_cfg.epochs):
            seed = stream_seed(train_cfg.seed, "draws", epoch)
            generator = torch.Generator().manual_seed(seed)  # augmentation, captions
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
                threads.update()
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
                "threads": threads.threads,
                "elapsed_s": time.monotonic() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "val": report,
                "best": saved,  # this epoch's model is the one in `out` (is_best)
                "skipped_images": len(train_bank.skipped) + len(val_bank.skipped),
            }
            append_log(out, entry)
            save_state(out, model, opt, epoch, best, time.monotonic() - t0, train_cfg)
            if on_epoch:
                on_epoch(entry)
            if step >= total_steps or time.monotonic() - t0 >= budget:
                break
        write_skipped(out, train_bank.skipped + val_bank.skipped)
        return out


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
