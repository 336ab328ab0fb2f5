"""Shared option types and checks: what several commands parse (a model, a size) or check before the work."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, ClassVar

import click

from retrieval.choices import MAX_MEMORY_LIMIT, check_params
from retrieval.errors import RetrievalError
from retrieval.models.modeldir import HF_PREFIX


class ModelParam(click.ParamType):
    """A model directory (it must exist), or hf:<dir or hub name> for a Hugging Face CLIP/SigLIP checkpoint."""

    name = "model"
    directory = click.Path(exists=True, file_okay=False, path_type=str)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return value if str(value).startswith(HF_PREFIX) else self.directory.convert(value, param, ctx)


MODEL = ModelParam()


class BytesParam(click.ParamType):
    """A size in bytes, with an optional K, M, G or T suffix (powers of 1024): 512M, 8G."""

    name = "size"
    units: ClassVar[dict[str, int]] = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in self.units else ""
        try:
            size = float(text[: len(text) - len(unit)]) * self.units[unit]
        except ValueError:
            self.fail(f"{value!r} is not a size; write it like 512M or 8G", param, ctx)
        if (
            not math.isfinite(size) or size >= MAX_MEMORY_LIMIT
        ):  # nan, inf, 1e300G: int() would raise, or no machine has it
            self.fail(f"{value!r} is not a size a machine has; write it like 512M or 8G", param, ctx)
        if int(size) <= 0:  # 0.0001 is no whole byte
            self.fail(f"{value!r} must be at least one byte", param, ctx)
        return int(size)


BYTES = BytesParam()


def check_writable(path: str | None, option: str, folder: bool = False) -> None:
    """An output path checked before the work, so an unwritable one fails in a second, not after an hour: it (a file,
    or a folder when `folder`) must be writable where it is, or creatable in the nearest folder above it that exists.
    Nothing is created here; what slips past (a full disk, a race) still ends as one line at the error boundary."""
    if path is None:
        return
    target = Path(path).absolute()
    if target.exists() and target.is_dir() != folder:
        want, got = ("folder", "file") if folder else ("file", "folder")
        raise RetrievalError(f"{option} {path} is a {got}; give a {want} path")
    existing = target if target.exists() else next(p for p in target.parents if p.exists())
    if not existing.is_dir() and existing != target:
        raise RetrievalError(f"{option} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        why = "is read-only" if os.statvfs(existing).f_flag & os.ST_RDONLY else "cannot be written (no permission)"
        raise RetrievalError(f"{option} {path}: {existing} {why}; choose another path")


def write_report(out: str, text: str) -> None:
    """--out's file, its folder made if missing. A failed write (a full disk: the error names no file) names --out."""
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    except OSError as e:
        e.filename = e.filename or out
        raise


def check_knobs(ef_search: int | None, nprobe: int | None) -> dict[str, int]:
    """The ANN knobs given, checked now: a value FAISS cannot hold would fail inside it, or be stored in a manifest."""
    knobs = {k: v for k, v in (("ef_search", ef_search), ("nprobe", nprobe)) if v is not None}
    check_params(knobs)
    return knobs
