"""The WordPiece tokenizer of a pretrained text tower (MiniLM).

It lives apart from minilm.py, which imports torch, so that the numpy text tower (text_numpy.py) can
tokenize MiniLM queries without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.models.tokenizer import Tokens


class WordPieceTokenizer:
    """A pretrained tower's own tokenizer (a `tokenizers` JSON file) behind our Tokenizer's interface."""

    def __init__(self, spec: str):
        from tokenizers import Tokenizer as FastTokenizer  # comes with transformers: only MiniLM models need it

        self.spec = spec
        self.fast = FastTokenizer.from_str(spec)
        self.fast.no_padding()
        self.fast.no_truncation()
        self.pad_id = self.fast.token_to_id("[PAD]") or 0

    @classmethod
    def load(cls, path: str | Path) -> WordPieceTokenizer:
        try:
            return cls(Path(path).read_text())
        except Exception as e:  # OSError, or the tokenizers library's own parse error
            raise RetrievalError(f"cannot read tokenizer {path} ({str(e).splitlines()[0]}); retrain the model") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.spec)

    def __len__(self) -> int:
        return self.fast.get_vocab_size()

    def encode(self, texts: Sequence[str], context_length: int) -> Tokens:
        """(n, L) ids, [CLS] ... [SEP], cut at context_length and padded to the longest text of the call."""
        rows = [
            e.ids[: context_length - 1] + e.ids[-1:] if len(e.ids) > context_length else e.ids
            for e in self.fast.encode_batch(list(texts))
        ]
        out = np.full((len(rows), max((len(r) for r in rows), default=0)), self.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out
