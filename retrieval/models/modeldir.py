"""Models on disk, without torch: our model directories (config.json validation) and `hf:` references to
Hugging Face CLIP/SigLIP checkpoints; for both, the fingerprint, the embedding size and where text runs.

Indexes and the numpy query tower read models too, and must not pay for a torch import.

Format versions: a model directory is never rewritten when it is read. Its fingerprint is the hash of its files,
and every index built with it holds that hash, so an in-place upgrade would orphan those indexes; an older layout
is instead upgraded in memory as it is read. Version 1 has only grown by keys with defaults (the towers' kind and
trainable parts, the heads: model_config_from_dict fills what an older file lacks), so every version-1 directory
reads as it is. A newer version than FORMAT_VERSION is refused: upgrade retrieval.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from retrieval.atomic import atomic_write_json
from retrieval.errors import RetrievalError
from retrieval.models.config import ModelConfig, model_config_from_dict, model_config_to_dict

FORMAT_VERSION = 1  # config.json's layout; a change that an older retrieval would misread bumps it
ARCHITECTURE = "retrieval-dual-encoder"
FILES = ("config.json", "tokenizer.json", "model.safetensors")
TEXT_TOWER_FILE = "text_tower.json"  # only beside a pretrained text tower: its checkpoint's architecture
NUMPY_TEXT_TOWERS = ("own", "minilm")  # config.TEXT_TOWERS that text_numpy.py runs without torch
HF_PREFIX = "hf:"
HF_FAMILIES = ("clip", "siglip")  # checkpoint model_type values with an image and a text tower we can run
HF_INSTALL_HINT = "pip install 'retrieval[hf]'"
# what defines a checkpoint's embeddings: architecture, preprocessing, tokenizer and weights (not our logs)
HF_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "special_tokens_map.json",
)
HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")

ModelRef = str | Path  # a model directory, or "hf:" + a Hugging Face checkpoint directory or hub name


def hf_name(ref: ModelRef) -> str | None:
    """The checkpoint name or directory of an `hf:` reference; None for our own model directories."""
    return str(ref)[len(HF_PREFIX) :] if str(ref).startswith(HF_PREFIX) else None


def hf_dir(ref: ModelRef) -> Path:
    """The local directory of an `hf:` checkpoint: the directory itself, or the hub's cached download.

    A hub name is fetched on first use (that needs a network); afterwards it loads from the cache, offline
    and unchanged, so an index built with it keeps matching its fingerprint.
    """
    name = hf_name(ref)
    assert name is not None, ref
    if Path(name).is_dir():
        return Path(name)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise RetrievalError(f"{ref}: no such directory, and not a hub name like openai/clip-vit-base-patch32")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RetrievalError(f"{ref} needs Hugging Face support: {HF_INSTALL_HINT}") from None
    try:
        return Path(snapshot_download(name, allow_patterns=[*HF_FILES, "*.safetensors"], local_files_only=True))
    except Exception:  # not cached yet: fetch it below
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=[*HF_FILES, "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, gated repo: the hub raises many types
        raise RetrievalError(
            f"cannot get {name} from the Hugging Face hub ({type(e).__name__}); it is not in the local cache "
            "either: download it once where there is a network, or give a local directory (hf:PATH)"
        ) from e


def hf_config(ref: ModelRef) -> dict:
    """config.json of an `hf:` checkpoint, checked to be a CLIP or SigLIP dual encoder."""
    path = hf_dir(ref) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RetrievalError(f"{ref}: cannot read {path} ({e}); is it a Hugging Face checkpoint?") from e
    if d.get("model_type") not in HF_FAMILIES:
        raise RetrievalError(
            f"{ref} is a {d.get('model_type')!r} checkpoint; hf: takes {' or '.join(HF_FAMILIES)} models"
        )
    return d


def read_model_config(path: str | Path) -> ModelConfig:
    """Validate config.json of a model directory, with a message that says what to do when it is off."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RetrievalError(f"{path} is not a model directory (no config.json); train one with `retrieval train`")
    try:
        d = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise RetrievalError(f"{path}/config.json is not valid JSON ({e}); retrain the model") from e
    if isinstance(d, dict) and d.get("model_type") in HF_FAMILIES:
        raise RetrievalError(f"{path} is a Hugging Face {d['model_type']} checkpoint: give it as hf:{path}")
    if not isinstance(d, dict) or d.get("architecture") != ARCHITECTURE:
        arch = d.get("architecture") if isinstance(d, dict) else None
        raise RetrievalError(f"{path} holds a {arch!r} model, not {ARCHITECTURE!r}")
    version = d.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise RetrievalError(f"{path}/config.json has no valid format_version ({version!r}); retrain the model")
    if version > FORMAT_VERSION:
        raise RetrievalError(
            f"{path} is model format {version}, newer than this retrieval reads ({FORMAT_VERSION}): upgrade retrieval"
        )
    return model_config_from_dict(d["model"])


def write_model_config(path: Path, config: ModelConfig) -> None:
    """config.json, the file that makes a directory a model directory (read_model_config reads it back)."""
    atomic_write_json(
        path / "config.json",
        {
            "format_version": FORMAT_VERSION,
            "architecture": ARCHITECTURE,
            "model": model_config_to_dict(config),
            "tokenizer": "tokenizer.json",
        },
    )


def embed_dim(ref: ModelRef) -> int:
    """The size of the shared embedding space."""
    return read_model_config(ref).embed_dim if hf_name(ref) is None else hf_embed_dim(hf_config(ref))


def hf_embed_dim(config: dict) -> int:
    """CLIP projects both towers to projection_dim; SigLIP's text head gives projection_size (= hidden size)."""
    if config["model_type"] == "clip":
        return int(config.get("projection_dim", 512))
    text = config.get("text_config", {})
    return int(text.get("projection_size") or text.get("hidden_size", 768))


def numpy_text(ref: ModelRef) -> bool:
    """Whether text queries can run in numpy (text_numpy.py): our own directories' towers can, hf: ones cannot."""
    return hf_name(ref) is None and read_model_config(ref).text.kind in NUMPY_TEXT_TOWERS


def text_tower_config(path: str | Path) -> dict:
    """text_tower.json: the architecture (a transformers BertConfig dict) of a model directory's pretrained
    text tower."""
    path = Path(path) / TEXT_TOWER_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RetrievalError(f"cannot read {path} ({e}); retrain the model") from e


def canonical(ref: ModelRef) -> str:
    """The reference an index stores: an absolute path (kept behind `hf:`), or a hub name as given."""
    name = hf_name(ref)
    if name is None:
        return str(Path(ref).resolve())
    return HF_PREFIX + (str(Path(name).resolve()) if Path(name).is_dir() else name)


def fingerprint(ref: ModelRef) -> str:
    """sha256 over the files that define the model's embeddings: an index built with one model refuses
    queries from another, and retraining or fine-tuning changes it."""
    h = hashlib.sha256()
    if hf_name(ref) is None:
        path = Path(ref)
        read_model_config(path)  # says what is wrong with a directory that is not one of ours
        names = FILES + ((TEXT_TOWER_FILE,) if (path / TEXT_TOWER_FILE).is_file() else ())
        for name in names:
            if not (path / name).is_file():
                raise RetrievalError(f"{path} is not a complete model directory ({name}: no such file)")
    else:
        path = hf_dir(ref)
        names = tuple(n for n in HF_FILES if (path / n).is_file())
        names += tuple(sorted({p.name for pattern in HF_WEIGHTS for p in path.glob(pattern)}))
        if not any(n.endswith((".safetensors", ".bin")) for n in names):
            raise RetrievalError(f"{ref}: no weights (*.safetensors) in {path}")
    for name in names:
        _hash_file(h, name, path / name)
    return h.hexdigest()[:16]


def _hash_file(h: hashlib._Hash, name: str, path: Path, chunk: int = 1 << 22) -> None:
    """Streams name, NUL, content: the same digest as hashing them joined, without holding a large file."""
    h.update(name.encode() + b"\0")
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
