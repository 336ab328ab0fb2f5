"""Cross-modal retrieval: a text-image dual encoder, its training and evaluation, and a search index.

The public Python API. Names resolve on first use (PEP 562), so `retrieval search --text` and other
commands that never touch torch do not pay its 1.6 s import.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DualEncoder": "models.dual_encoder",
    "Encoder": "models.encoder",
    "load_model": "models.load",
    "save_model": "models.dual_encoder",
    "Index": "index.handle",
    "Hit": "index.search",
    "BuildOptions": "index.build",
    "build_index": "index.build",
    "remove_items": "index.build",
    "Pair": "data.pairs",
    "read_pairs": "data.pairs",
    "read_split": "data.pairs",
    "ImageError": "errors",
    "RetrievalError": "errors",
    "encode_pairs": "jobs.evaluate",
    "evaluate_model": "jobs.evaluate",
    "run_demo": "jobs.demo",
    "train_model": "jobs.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
