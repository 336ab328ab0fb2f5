"""A word-level tokenizer trained on the training captions and saved beside the model.

Captions are short and plain, so lower-cased words and punctuation marks are enough; a word that was
rare in training maps to [UNK]. Token ids: 0 [PAD], 1 [UNK], 2 [BOS], 3 [EOS], then words by frequency.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from retrieval.atomic import atomic_write_text
from retrieval.errors import RetrievalError

FORMAT_VERSION = 1
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD, UNK, BOS, EOS = range(len(SPECIALS))
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

Tokens: TypeAlias = npt.NDArray[np.int64]


class TextTokenizer(Protocol):
    """What DualEncoder needs of a tokenizer: ours (Tokenizer) or a pretrained tower's (WordPieceTokenizer)."""

    def __len__(self) -> int: ...

    def encode(self, texts: Sequence[str], context_length: int) -> Tokens: ...

    def save(self, path: str | Path) -> None: ...


def split_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Tokenizer:
    pad_id = PAD

    def __init__(self, vocab: Sequence[str]):
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise RetrievalError(f"tokenizer vocabulary must start with {SPECIALS}")
        self.vocab = list(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def train(cls, texts: Iterable[str], max_size: int = 20000, min_count: int = 2) -> Tokenizer:
        """Keep the words seen at least min_count times, most frequent first, ties alphabetical (deterministic)."""
        counts = Counter(w for t in texts for w in split_words(t))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words[: max_size - len(SPECIALS)]])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: Sequence[str], context_length: int) -> Tokens:
        """(n, context_length) ids: [BOS] words [EOS] then [PAD]s; a long text is cut but keeps its [EOS]."""
        out = np.full((len(texts), context_length), PAD, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.ids.get(w, UNK) for w in split_words(text)][: context_length - 2]
            out[row, : len(ids) + 2] = [BOS, *ids, EOS]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i >= len(SPECIALS))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({"format_version": FORMAT_VERSION, "type": "word", "vocab": self.vocab}))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise RetrievalError(f"cannot read tokenizer {path}: {e}") from e
        if not isinstance(d, dict) or not isinstance(d.get("vocab"), list):
            raise RetrievalError(f"{path} is not a tokenizer file (no vocab list); retrain the model")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise RetrievalError(
                f"tokenizer {path} is format {d['format_version']}, newer than {FORMAT_VERSION}: upgrade retrieval"
            )
        if d.get("type") != "word":
            raise RetrievalError(f"tokenizer {path} has unknown type {d.get('type')!r}")
        return cls(d["vocab"])
