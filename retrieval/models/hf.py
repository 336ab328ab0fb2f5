"""Whole Hugging Face CLIP and SigLIP checkpoints (`hf:<dir or hub name>`) with our encoders' interface
(encoder.Encoder), so index, search and eval use them unchanged.

Inputs are preprocessed as the checkpoint's own image processor and tokenizer prepare them, and the model can be
fine-tuned (train, `--init`). transformers is imported only inside load_hf, i.e. only when a model uses it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.atomic import atomic_write_json
from retrieval.data.images import Transform
from retrieval.errors import RetrievalError
from retrieval.models.encoder import Encoder
from retrieval.models.modeldir import HF_INSTALL_HINT, ModelRef, hf_config, hf_dir, hf_embed_dim
from retrieval.models.tokenizer import Tokens

if TYPE_CHECKING:
    from transformers import CLIPModel, SiglipModel


class HFTokenizer:
    """A checkpoint's own tokenizer. Ids are padded with -1, which no real token has, so the model can tell
    padding from a pad token that is also a real one (CLIP's pad is its end-of-text token)."""

    pad_id = -1

    def __init__(self, tokenizer: Any, max_length: int, pad_to_max: bool):
        self.tokenizer, self.max_length, self.pad_to_max = tokenizer, max_length, pad_to_max

    def encode(self, texts: Sequence[str]) -> Tokens:
        """(n, L) ids. SigLIP pads to max_length with its pad token, as it was trained; CLIP to the longest."""
        padding = "max_length" if self.pad_to_max else False
        rows = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=padding)["input_ids"]
        out = np.full((len(rows), max((len(r) for r in rows), default=0)), self.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out


def processor_transform(d: dict[str, Any], path: Path) -> Transform:
    """images.Transform from a checkpoint's preprocessor_config.json `d` (CLIP: shortest edge + centre crop;
    SigLIP: squash to a square), so images are prepared as the checkpoint's own processor prepares them."""
    size, crop = d.get("size", 224), d.get("crop_size", d.get("size", 224))
    size = {"shortest_edge": size} if isinstance(size, int) else size  # older configs hold plain integers
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    mean, std = tuple(d.get("image_mean", (0.5,) * 3)), tuple(d.get("image_std", (0.5,) * 3))
    resample = int(d.get("resample", 3))
    if abs(d.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12 or not d.get("do_normalize", True):
        raise RetrievalError(f"{path}: only processors that scale pixels to [0, 1] and normalise them are supported")
    if "shortest_edge" in size and d.get("do_center_crop", True) and crop.get("height") == crop.get("width"):
        return Transform(
            crop["height"], mean, std, resize="shortest_edge", resize_to=size["shortest_edge"], resample=resample
        )
    if size.get("height") and size.get("height") == size.get("width") and not d.get("do_center_crop", False):
        return Transform(size["height"], mean, std, resize="squash", resample=resample)
    raise RetrievalError(f"{path}: image size {size} with crop {crop} is not supported (square model inputs only)")


class HFDualEncoder(Encoder):
    """A Hugging Face CLIPModel or SiglipModel with our encoders' interface: encode_image / encode_text give
    its get_image_features / get_text_features, L2-normalised; forward and inverse_temperature let it fine-tune."""

    def __init__(
        self, hf_model: CLIPModel | SiglipModel, tokenizer: HFTokenizer, processor_config: dict[str, Any], path: Path
    ):
        super().__init__()
        self.hf: CLIPModel | SiglipModel = hf_model
        self.tokenizer, self.family = tokenizer, hf_model.config.model_type
        self.processor_config, self.transform = processor_config, processor_transform(processor_config, path)
        self.embed_dim = self.text_width = hf_embed_dim(hf_model.config.to_dict())
        self.pad_token_id = tokenizer.tokenizer.pad_token_id or 0

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(_pooled(self.hf.get_image_features(pixel_values=pixels)).float(), dim=-1)  # (B, D)

    def text_outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """get_text_features: projected, not yet normalised. CLIP sees an attention mask; SigLIP, trained on
        text padded to its full length without one, sees its pad tokens, as its processor gives them."""
        real = tokens != HFTokenizer.pad_id  # (B, L)
        ids = torch.where(real, tokens, torch.full_like(tokens, self.pad_token_id))
        mask = {"attention_mask": real.long()} if self.family == "clip" else {}
        return _pooled(self.hf.get_text_features(input_ids=ids, **mask))  # (B, D)

    def text_features(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize((text if text.is_floating_point() else self.text_outputs(text)).float(), dim=-1)  # (B, D)

    def text_parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain(*(m.parameters() for m in _parts(self.hf, "text")))

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer.encode(texts)

    def inverse_temperature(self) -> torch.Tensor:
        scale = self.hf.logit_scale.exp()
        return scale.clamp(max=100.0) if self.family == "clip" else scale

    @property
    def logit_bias(self) -> torch.Tensor:
        bias = self.hf.logit_bias  # SigLIP only: its loss is the only user
        assert isinstance(bias, torch.Tensor), "only SigLIP has a logit bias"
        return bias

    def freeze(self, part: str) -> None:
        """Lock the image or the text side for fine-tuning (a locked text side is then cached)."""
        for module in _parts(self.hf, part):
            module.requires_grad_(False)

    def save(self, path: str | Path) -> Path:
        """A Hugging Face checkpoint directory (safetensors), loadable again as hf:PATH."""
        path = Path(path)
        self.hf.save_pretrained(path, safe_serialization=True)
        self.tokenizer.tokenizer.save_pretrained(path)
        atomic_write_json(path / "preprocessor_config.json", self.processor_config)
        return path


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (its pooler_output), 4.x the tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _parts(hf_model: nn.Module, part: str) -> list[nn.Module]:
    """The modules of one side: its transformer and, for CLIP, its projection."""
    if part not in ("image", "text"):
        raise RetrievalError(f"--freeze takes image or text, got {part!r}")
    names = ("vision_model", "visual_projection") if part == "image" else ("text_model", "text_projection")
    return [getattr(hf_model, n) for n in names if hasattr(hf_model, n)]


def load_hf(ref: ModelRef) -> HFDualEncoder:
    """An hf: checkpoint (local directory, or hub name fetched once and then cached), in eval mode."""
    family = hf_config(ref)["model_type"]
    path = hf_dir(ref)
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise RetrievalError(f"{ref} needs Hugging Face transformers: {HF_INSTALL_HINT}") from None
    hf_logging.set_verbosity_error()  # its load reports and progress bars would otherwise print on every query
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
        hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise RetrievalError(f"cannot load {ref} ({str(e).splitlines()[0]}); is the checkpoint complete?") from e
    try:
        processor_config = json.loads((path / "preprocessor_config.json").read_text())
    except (OSError, ValueError) as e:
        raise RetrievalError(f"cannot read {path}/preprocessor_config.json ({e}); is the checkpoint complete?") from e
    max_length = model.config.text_config.max_position_embeddings
    tokenizer = HFTokenizer(hf_tokenizer, max_length, pad_to_max=family == "siglip")
    return HFDualEncoder(model, tokenizer, processor_config, path / "preprocessor_config.json").eval()
