"""A model directory on disk: config.json validation and the model fingerprint. No torch here.

Indexes and the numpy query tower read model directories too, and must not pay for a torch import.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import ModelConfig, model_config_from_dict
from .errors import RetrievalError

FORMAT_VERSION = 1
ARCHITECTURE = "retrieval-dual-encoder"
FILES = ("config.json", "tokenizer.json", "model.safetensors")
TEXT_TOWER_FILE = "text_tower.json"  # only beside a pretrained text tower: its checkpoint's architecture


def read_model_config(path: str | Path) -> ModelConfig:
    """Validate config.json of a model directory, with a message that says what to do when it is off."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RetrievalError(f"{path} is not a model directory (no config.json); train one with `retrieval train`")
    try:
        d = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise RetrievalError(f"{path}/config.json is not valid JSON ({e}); retrain the model") from e
    if not isinstance(d, dict) or d.get("architecture") != ARCHITECTURE:
        arch = d.get("architecture") if isinstance(d, dict) else None
        raise RetrievalError(f"{path} holds a {arch!r} model, not {ARCHITECTURE!r}")
    if not isinstance(d.get("format_version"), int) or d["format_version"] > FORMAT_VERSION:
        raise RetrievalError(
            f"{path} is model format {d.get('format_version')}, newer than this retrieval reads ({FORMAT_VERSION}): "
            "upgrade retrieval"
        )
    return model_config_from_dict(d["model"])


def fingerprint(path: str | Path) -> str:
    """sha256 over the model's files: an index built with one model refuses queries from another."""
    h = hashlib.sha256()
    for name in FILES + ((TEXT_TOWER_FILE,) if (Path(path) / TEXT_TOWER_FILE).is_file() else ()):
        try:
            h.update(name.encode() + b"\0" + (Path(path) / name).read_bytes())
        except OSError as e:
            raise RetrievalError(f"{path} is not a complete model directory ({name}: {e.strerror})") from e
    return h.hexdigest()[:16]
