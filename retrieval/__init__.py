"""Cross-modal retrieval: a text-image dual encoder, its training and evaluation.

The public Python API; no logic lives here.
"""

from .api import encode_pairs, evaluate_model, run_demo, train_model
from .data import Pair, read_pairs, read_split
from .errors import ImageError, RetrievalError
from .model import DualEncoder, load_model, save_model

__all__ = [
    "DualEncoder",
    "ImageError",
    "Pair",
    "RetrievalError",
    "encode_pairs",
    "evaluate_model",
    "load_model",
    "read_pairs",
    "read_split",
    "run_demo",
    "save_model",
    "train_model",
]
