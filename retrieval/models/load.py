"""The one way to open a model: `load_model` dispatches by what the reference names.

- A model directory of ours (modeldir.py, written by dual_encoder.save_model): our towers, a pretrained image
  tower, the MiniLM text tower, the zero-shot ConSE head; the config says which, the weights file holds them all.
- `hf:<dir or hub name>`: a Hugging Face CLIP or SigLIP checkpoint (hf.py).

Model definitions never import this module, so towers stay independent of one another and of loading.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from retrieval.errors import RetrievalError
from retrieval.models.dual_encoder import DualEncoder
from retrieval.models.encoder import Encoder
from retrieval.models.hf import load_hf
from retrieval.models.minilm import saved_text_tower
from retrieval.models.modeldir import ModelRef, hf_name, read_model_config
from retrieval.models.tokenizer import Tokenizer


def load_model(ref: ModelRef) -> Encoder:
    """Load a model directory written by save_model, or an `hf:` checkpoint, in eval mode."""
    if hf_name(ref) is not None:
        return load_hf(ref)
    path = Path(ref)
    config = read_model_config(path)
    if config.text.kind == "own":
        model = DualEncoder(config, Tokenizer.load(path / "tokenizer.json"))
    else:
        tower, tokenizer = saved_text_tower(path, config.text)
        model = DualEncoder(config, tokenizer, tower)
    try:
        state = load_file(path / "model.safetensors")
        model.load_state_dict(state)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise RetrievalError(
            f"cannot load weights from {path}/model.safetensors ({str(e).splitlines()[0]}); retrain"
        ) from e
    return model.eval()
