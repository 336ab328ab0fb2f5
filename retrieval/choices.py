"""The choices and bounds the CLI offers and the engine checks: index types, search targets, the range of the
FAISS search knobs and of a memory budget, the default prompt template.

Standard library only: the CLI builds its options from these, so `retrieval --help` and `retrieval synth
--help` load neither FAISS nor torch (index.py and query.py import them from here).
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

from retrieval.errors import RetrievalError

# "auto": chosen by size and memory (choose_index_type); flat16: exact like flat, from a scan of fp16 copies
# re-ranked in fp32 (index/rerank.py), in about half flat's time at 1M
INDEX_TYPES = ("auto", "flat", "flat16", "hnsw", "ivf", "ivfpq")
TARGETS = ("item", "image", "text")  # what a query matches: whole items (fused), images only, captions only
# how an item's image and caption scores make one (index/fusion.py): mean, weighted by w, max (either), min (both)
FUSIONS = ("mean", "weighted", "max", "min")
C_INT_MAX = 2**31 - 1  # FAISS's efSearch and nprobe are C ints
MAX_MEMORY_LIMIT = 2**63  # bytes (8 EiB): --max-memory at or above this is no budget a machine has; the CLI's bound too


def search_knob(params: dict[str, Any], name: str, default: int) -> int:
    """An HNSW or IVF knob as FAISS takes it: a C int, at least 1. Checked here, where every value arrives (the
    command line, a server request, manifest.json), because SWIG answers a bad one with a traceback."""
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, Integral) or not 1 <= int(value) <= C_INT_MAX:  # np.int64 too
        raise RetrievalError(
            f"{name} must be a whole number from 1 to {C_INT_MAX}, got {value!r}; "
            f"give --{name.replace('_', '-')} a value in that range"
        )
    return int(value)


def check_params(params: dict[str, Any]) -> None:
    """The knobs among an index's params (--ef-search, --nprobe), checked before they are stored."""
    for name in ("ef_search", "nprobe", "ef_construction"):
        if name in params:
            search_knob(params, name, 1)


def check_max_memory(max_memory: int | None) -> None:
    """None (no budget) or a whole number of bytes a machine can have: NaN, infinity or 1e300G is a typo."""
    if max_memory is not None and (
        isinstance(max_memory, bool) or not isinstance(max_memory, int) or not 0 < max_memory < MAX_MEMORY_LIMIT
    ):
        given = repr(max_memory) if len(repr(max_memory)) <= 24 else repr(max_memory)[:20] + "..."
        raise RetrievalError(
            f"--max-memory must be a size from 1 byte to {MAX_MEMORY_LIMIT // 2**60} EiB, like 512M or 8G; got {given}"
        )
