"""Cross-modal retrieval: a text-image dual encoder, its training and evaluation, and a search index.

The public Python API. Names resolve on first use (PEP 562), so `retrieval search --text` and other
commands that never touch torch do not pay its 1.6 s import.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DualEncoder": "model",
    "Encoder": "model",
    "load_model": "model",
    "save_model": "model",
    "Index": "query",
    "Hit": "query",
    "build_index": "indexing",
    "remove_items": "indexing",
    "Pair": "data",
    "read_pairs": "data",
    "read_split": "data",
    "ImageError": "errors",
    "RetrievalError": "errors",
    "encode_pairs": "api",
    "evaluate_model": "api",
    "run_demo": "api",
    "train_model": "api",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
