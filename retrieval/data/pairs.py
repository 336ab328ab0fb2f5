"""Image-caption pair manifests: JSONL, CSV, or a folder of images with sidecar .txt captions.

Every reader returns the same `Pair` records, with absolute image paths resolved against the manifest's
folder (so a stored path means the same file from any working directory). A malformed row, a sidecar or a
file name that is not UTF-8, or a number JSON has no spelling for (NaN, Infinity) is an error that names the
file and line; indexing passes a `skipped` list instead, so that one bad row is left out and listed rather
than blocking the rest. Whether the image itself can be decoded is checked later, by whoever loads it (a bad
image is then skipped and counted, not fatal).
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError, shown

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
INDEX_FILES = ("manifest.json", "items.sqlite")  # index.MANIFEST_FILE, index.DB_FILE: a folder holding both is an index


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path | None  # None for a text-only item
    captions: tuple[str, ...]  # may be empty for an image-only item
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def read_pairs(source: str | Path, skipped: list[str] | None = None, exclude: Sequence[str] = ()) -> list[Pair]:
    """Read a manifest by its kind: *.jsonl, *.csv, or a folder; ids matching an `exclude` glob are left out.

    A bad row, sidecar or file name raises RetrievalError; given a `skipped` list, it is left out and its
    one-line reason appended there instead. A source with bad rows and no good one is an error either way,
    so that pointing `index` at the wrong file cannot empty an index."""
    source = Path(source)
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    reader: Callable[[Path, list[str] | None, Sequence[str]], list[Pair]]
    if source.is_dir():
        reader = _read_folder
    elif not source.is_file():
        raise RetrievalError(f"no such manifest or folder: {source}")
    elif source.suffix.lower() in readers:
        reader = readers[source.suffix.lower()]
    else:
        raise RetrievalError(f"{source}: unknown manifest type; use .jsonl, .csv or a folder of images")
    if not _is_utf8(str(source.absolute())):
        raise RetrievalError(
            f"{shown(source.absolute())}: the path is not UTF-8, which the index cannot store; rename it"
        )
    bad: list[str] | None = None if skipped is None else []
    try:
        pairs = _unique_ids(reader(source, bad, exclude), source, bad)
    except OSError as e:
        raise RetrievalError(f"cannot read {source}: {e.strerror or e} (check its permissions)") from e
    if bad and not pairs:
        raise RetrievalError(f"{source}: no readable row or image; the first problem was {bad[0]}")
    if skipped is not None and bad:
        skipped += bad
    return pairs


class Skipped(str):
    """Why an item was left out (one line), with its id where that is known: an item already in an index is kept
    there, not removed, when its row or sidecar turns unreadable (re-saved in another encoding, a NaN added)."""

    id: str | None

    def __new__(cls, reason: str, item_id: str | None = None) -> Skipped:
        skipped = super().__new__(cls, reason)
        skipped.id = item_id
        return skipped


@contextmanager
def _or_skip(skipped: list[str] | None, item_id: str | None = None) -> Iterator[None]:
    """Around one row: its RetrievalError is raised, or, when collecting into `skipped`, noted there instead."""
    try:
        yield
    except RetrievalError as e:
        if skipped is None:
            raise
        skipped.append(Skipped(str(e), item_id))


def _excluded(item_id: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(item_id, g) for g in exclude)


def _is_utf8(text: str) -> bool:
    """False for a str holding lone surrogates: bytes that were not UTF-8 (surrogateescape) or a JSON \\ud800."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_storable(row: dict[str, Any], where: str) -> None:
    """Refuse a row the index could not store: a number that is not finite (Python's json reads NaN, Infinity
    and 1e400; SQLite's json() refuses them, which would break the index for good) or text that is not UTF-8.
    Iterative, since json.loads nests deeper than the recursion left here would allow."""
    todo: deque[tuple[str, Any]] = deque([("", row)])
    while todo:
        name, value = todo.popleft()
        if isinstance(value, float) and not math.isfinite(value):
            raise RetrievalError(
                f"{where}: field {shown(name)} is {json.dumps(value)}, which JSON and the index cannot hold; "
                "use null or a string"
            )
        if isinstance(value, str) and not _is_utf8(value):
            raise RetrievalError(
                f"{where}: field {shown(name)} holds text that is not UTF-8; save the manifest as UTF-8"
            )
        if isinstance(value, dict):
            for k, v in value.items():
                key = f"{name}.{k}" if name else str(k)
                todo.extend([(f"{key} (its name)", k), (key, v)])  # names are text too
        elif isinstance(value, list):
            todo.extend((f"{name}[{i}]", v) for i, v in enumerate(value))


def _captions(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise RetrievalError(f"{where}: captions must be a string or a list of strings")
    return tuple(c.strip() for c in value if c.strip())


def _read_jsonl(path: Path, skipped: list[str] | None, exclude: Sequence[str]) -> list[Pair]:
    """Bytes that are not UTF-8 are read as surrogates (surrogateescape), so they fail their own row only."""
    pairs, root = [], path.absolute().parent
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where, row = f"{path}:{line_no}", None
            with _or_skip(skipped):
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
                    raise RetrievalError(f"{where}: not valid JSON ({e})") from e
                if not isinstance(row, dict):
                    raise RetrievalError(f"{where}: each line must be a JSON object")
            if isinstance(row, dict):
                with _or_skip(skipped, _row_id(row, str(line_no))):
                    pairs.append(_pair(row, root, where, default_id=str(line_no)))
    return [p for p in pairs if not _excluded(p.id, exclude)]


def _read_csv(path: Path, skipped: list[str] | None, exclude: Sequence[str]) -> list[Pair]:
    """As _read_jsonl; a row the csv module refuses (a field over its size limit) fails that row only."""
    pairs, root = [], path.absolute().parent
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} & set(reader.fieldnames):
            raise RetrievalError(f"{path}:1: the header needs an 'image' and/or a 'caption' column")
        while True:
            # reader.line_num is the physical line the row ended on: right after blank lines and multi-line quotes
            row = None
            with _or_skip(skipped):
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:  # raised before line_num counts the line it failed on
                    raise RetrievalError(f"{path}:{reader.line_num + 1}: not a valid CSV row ({e})") from e
            if row is not None:
                with _or_skip(skipped, _row_id(row, str(reader.line_num))):
                    pairs.append(_pair(row, root, f"{path}:{reader.line_num}", str(reader.line_num)))
    return [p for p in pairs if not _excluded(p.id, exclude)]


def _pair(row: dict[str, Any], root: Path, where: str, default_id: str) -> Pair:
    """One manifest row -> Pair. 'captions' (list) or 'caption' (string); 'image' relative to the manifest."""
    _check_storable(row, where)
    image, captions = row.get("image") or None, _captions(row.get("captions", row.get("caption")), where)
    if image is not None and not isinstance(image, str):
        raise RetrievalError(f"{where}: 'image' must be a path string")
    if image is None and not captions:
        raise RetrievalError(f"{where}: a row needs an 'image', a caption, or both")
    extra = {k: v for k, v in row.items() if k not in ("id", "image", "captions", "caption")}
    return Pair(_row_id(row, default_id), root / image if image else None, captions, extra)


def _row_id(row: dict[str, Any], default_id: str) -> str:
    """The row's 'id', or default_id (its line number) without one."""
    row_id = row.get("id")
    return default_id if row_id in (None, "") else str(row_id)


def _read_folder(folder: Path, skipped: list[str] | None, exclude: Sequence[str]) -> list[Pair]:
    """Every image below the folder, its caption lines from a sidecar NAME.txt. Hidden files and folders are
    skipped, and so is an index kept inside the folder (its cached thumbnails are not photos). An excluded
    image's sidecar is never read, so --exclude can step around a bad one."""
    root, found, pairs = folder.absolute(), 0, []
    for path in sorted(_folder_files(root)):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        found += 1
        item_id = path.relative_to(root).as_posix()
        if _excluded(item_id, exclude):
            continue
        with _or_skip(skipped, item_id):
            if not _is_utf8(str(path)):
                raise RetrievalError(
                    f"{shown(path)}: the file name is not UTF-8, which the index cannot store; rename it"
                )
            pairs.append(Pair(item_id, path, _sidecar_captions(path.with_suffix(".txt"))))
    if not found:
        raise RetrievalError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return pairs


def _folder_files(root: Path) -> Iterator[Path]:
    """The files below root, not descending into hidden folders or indexes (os.walk: symlinked folders are
    not followed, as Path.rglob does not follow them)."""
    for parent, dirs, files in os.walk(root):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and not all(os.path.isfile(os.path.join(parent, d, f)) for f in INDEX_FILES)
        ]
        yield from (Path(parent, f) for f in files if not f.startswith(".") and os.path.isfile(os.path.join(parent, f)))


def _sidecar_captions(sidecar: Path) -> tuple[str, ...]:
    """The caption lines of an image's NAME.txt, () without one. One that is not UTF-8 is refused rather than
    read leniently: its captions would be stored with replacement characters and never match a search."""
    if not sidecar.is_file():
        return ()
    try:
        lines = sidecar.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RetrievalError(
            f"{shown(sidecar)}: captions are not UTF-8 (byte {e.object[e.start]:#04x} at offset "
            f"{e.start}); save it as UTF-8"
        ) from e
    except OSError as e:
        raise RetrievalError(
            f"{shown(sidecar)}: cannot read captions: {e.strerror or e} (check its permissions)"
        ) from e
    return _captions(lines, shown(sidecar))


def _unique_ids(pairs: Sequence[Pair], source: Path, skipped: list[str] | None) -> list[Pair]:
    """The pairs with their first id each; a later repeat raises, or is left out and noted in `skipped`."""
    seen: set[str] = set()
    unique = []
    for p in pairs:
        with _or_skip(skipped):
            if p.id in seen:
                raise RetrievalError(f"{source}: id {p.id!r} appears twice; ids must be unique")
            seen.add(p.id)
            unique.append(p)
    return unique


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


def load_split_pairs(data: str | Path, split_file: str | Path | None, split: str | None) -> list[Pair]:
    """The pairs of one split; split_file defaults to split.json beside the manifest when there is one."""
    pairs = read_pairs(data)
    split_file = split_file or default_split_file(data)
    if split is None:
        return pairs
    if split_file is None:
        raise RetrievalError(f"--split {split} needs a split file; none given and no split.json beside {data}")
    chosen = select(pairs, read_split(split_file, split))
    if not chosen:
        raise RetrievalError(f"split {split!r} of {split_file} matches no id in {data}")
    return chosen


def default_split_file(data: str | Path) -> Path | None:
    """split.json beside a manifest file, or inside a folder of images, when there is one."""
    candidate = Path(data).parent / "split.json" if Path(data).is_file() else Path(data) / "split.json"
    return candidate if candidate.is_file() else None


def image_caption_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """Only the pairs that have both parts: what contrastive training and paired evaluation need."""
    return [p for p in pairs if p.image is not None and p.captions]
