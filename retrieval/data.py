"""Image-caption pair manifests: JSONL, CSV, or a folder of images with sidecar .txt captions.

Every reader returns the same `Pair` records, with image paths resolved against the manifest's folder.
A malformed row is an error that names the file and line; whether the image itself can be decoded is
checked later, by whoever loads it (a bad image is then skipped and counted, not fatal).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RetrievalError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path | None  # None for a text-only item
    captions: tuple[str, ...]  # may be empty for an image-only item
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def read_pairs(source: str | Path) -> list[Pair]:
    """Read a manifest by its kind: *.jsonl, *.csv, or a folder."""
    source = Path(source)
    if source.is_dir():
        return _read_folder(source)
    if not source.is_file():
        raise RetrievalError(f"no such manifest or folder: {source}")
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    if source.suffix.lower() not in readers:
        raise RetrievalError(f"{source}: unknown manifest type; use .jsonl, .csv or a folder of images")
    pairs = readers[source.suffix.lower()](source)
    _check_unique_ids(pairs, source)
    return pairs


def _captions(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise RetrievalError(f"{where}: captions must be a string or a list of strings")
    return tuple(c.strip() for c in value if c.strip())


def _read_jsonl(path: Path) -> list[Pair]:
    pairs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise RetrievalError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise RetrievalError(f"{where}: each line must be a JSON object")
            pairs.append(_pair(row, path.parent, where, default_id=str(line_no)))
    return pairs


def _read_csv(path: Path) -> list[Pair]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} & set(reader.fieldnames):
            raise RetrievalError(f"{path}:1: the header needs an 'image' and/or a 'caption' column")
        # reader.line_num is the physical line the row ended on: right after blank lines and multi-line quotes
        return [_pair(row, path.parent, f"{path}:{reader.line_num}", str(reader.line_num)) for row in reader]


def _pair(row: dict[str, Any], root: Path, where: str, default_id: str) -> Pair:
    """One manifest row -> Pair. 'captions' (list) or 'caption' (string); 'image' relative to the manifest."""
    image, captions = row.get("image") or None, _captions(row.get("captions", row.get("caption")), where)
    if image is not None and not isinstance(image, str):
        raise RetrievalError(f"{where}: 'image' must be a path string")
    if image is None and not captions:
        raise RetrievalError(f"{where}: a row needs an 'image', a caption, or both")
    extra = {k: v for k, v in row.items() if k not in ("id", "image", "captions", "caption")}
    row_id = row.get("id")
    return Pair(default_id if row_id in (None, "") else str(row_id), root / image if image else None, captions, extra)


def _read_folder(folder: Path) -> list[Pair]:
    """Every image below the folder (hidden ones skipped), its caption lines from a sidecar NAME.txt."""
    pairs = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        sidecar = path.with_suffix(".txt")
        lines = sidecar.read_text(encoding="utf-8").splitlines() if sidecar.is_file() else []
        pairs.append(Pair(rel.as_posix(), path, _captions(lines, str(sidecar))))
    if not pairs:
        raise RetrievalError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return pairs


def _check_unique_ids(pairs: Sequence[Pair], source: Path) -> None:
    seen: set[str] = set()
    for p in pairs:
        if p.id in seen:
            raise RetrievalError(f"{source}: id {p.id!r} appears twice; ids must be unique")
        seen.add(p.id)


def read_split(path: str | Path, split: str) -> set[str]:
    """The ids of one split ('train', 'test', ...) from a split.json of {split: [ids]}."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RetrievalError(f"cannot read split file {path}: {e}") from e
    if not isinstance(d, dict):
        raise RetrievalError(f"{path} must hold a JSON object of {{split: [ids]}}")
    if not isinstance(d.get(split), list):
        names = [k for k, v in d.items() if isinstance(v, list)]
        raise RetrievalError(f"{path} has no split {split!r}; it has {', '.join(names) or 'none'}")
    return set(map(str, d[split]))


def select(pairs: Iterable[Pair], ids: set[str]) -> list[Pair]:
    return [p for p in pairs if p.id in ids]


def image_caption_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """Only the pairs that have both parts: what contrastive training and paired evaluation need."""
    return [p for p in pairs if p.image is not None and p.captions]
