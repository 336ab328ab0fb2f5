"""The index's files and their format: names, manifest.json, the format version and its migrations.

manifest.json says what a reader needs to know before it touches the vectors: the model, the dimension, the
index type and knobs, the database generation the derived files reflect, and the format version. An index of
an older format opens: read_manifest upgrades what it reads, and the next writer stores the current format.
One of a newer format is refused with what to do. No faiss and no torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from retrieval.choices import FUSIONS, INDEX_TYPES
from retrieval.errors import RetrievalError

# 2: the manifest gains image_precision and faiss_digest; 3: index type flat16. Each older format is read (upgraded)
# and written as the current one on its next change, so a version that knows only an older one says to upgrade
# rather than failing on what it does not know (upgraded() has the steps)
FORMAT_VERSION = 3
DB_FILE, FAISS_FILE, MANIFEST_FILE, LOCK_FILE = "items.sqlite", "vectors.faiss", "manifest.json", ".lock"

FIDS_FILE, VECTORS_FILE = "fids.npy", "vectors.npy"  # fused vectors in fid order, memory-mapped for result scores

RECORDS_FILE, OFFSETS_FILE = "records.jsonl", "records.npy"  # what a result shows, a line per item in fid order

IVFDATA_SUFFIX = ".ivfdata"  # a merged on-disk IVF index's inverted lists (faiss OnDiskInvertedLists)

TMP_SUFFIX = ".tmp"  # a derived file being written (atomic_write); one left by a killed writer is removed by the next

CALIBRATION_CUTOFFS = {"flat": "theta", "top_relative": "margin"}  # a calibration rule -> the cutoff stored with it


@dataclass(slots=True)
class Item:
    fid: int
    id: str
    path: str | None
    captions: list[str]
    image_key: str | None
    text_key: str | None
    mtime_ns: int | None = None  # integer nanoseconds: a float would lose digits on the way through JSON
    size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """manifest.json: what a reader needs to know before touching the vectors."""

    model: str  # the model directory the index was built with
    fingerprint: str  # modeldir.fingerprint of that model
    dim: int  # embedding dimension d; FAISS vectors are 2d
    index_type: str = "flat"  # chosen type (never "auto")
    params: dict[str, Any] = field(default_factory=dict)  # efSearch, nprobe, ...
    metric: str = "inner_product"
    format_version: int = FORMAT_VERSION
    generation: int = 0  # the database generation the FAISS file reflects
    counts: dict[str, int] = field(default_factory=dict)
    build_seconds: float = 0.0
    faiss_bytes: int = 0
    faiss_digest: str = ""  # faiss_digest of the FAISS file published with this generation ("" before there was one)
    calibration: dict[str, Any] = field(default_factory=dict)  # per target: the cutoff `retrieval calibrate` chose
    image_precision: str = ""  # what its images were encoded in (fp32, bf16; "" before any): image queries match it


def check_model(manifest: Manifest, path: str | Path, model_fp: str, model_dir: str | Path) -> None:
    """Refuse to add to or query an index with a model other than the one that built it (its vectors would live
    in another space): the one check, for `index` and for search alike."""
    if manifest.fingerprint != model_fp:
        raise RetrievalError(
            f"model mismatch: {path} was built with model {manifest.fingerprint} ({manifest.model}), "
            f"but {model_dir} is {model_fp}; use the model that built it, or build a new index for this one"
        )


def read_manifest(path: Path) -> Manifest:
    try:
        d = json.loads((path / MANIFEST_FILE).read_text())
    except OSError as e:
        raise RetrievalError(
            f"cannot read {path}/{MANIFEST_FILE} ({e.strerror or e}): check the disk, and that the file "
            "and its folder can be read"
        ) from e
    except ValueError as e:
        raise RetrievalError(
            f"{path}/{MANIFEST_FILE} is damaged ({e}); rebuild the index with `retrieval index`"
        ) from e
    if not isinstance(d, dict):
        raise RetrievalError(f"{path}/{MANIFEST_FILE} is not a JSON object; rebuild the index with `retrieval index`")
    version = d.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RetrievalError(
            f"{path} is index format {version}, newer than this retrieval reads ({FORMAT_VERSION}): upgrade retrieval"
        )
    if version < 1:
        raise RetrievalError(f"{path} is index format {version}, which never existed; rebuild the index")
    try:
        manifest = Manifest(**upgraded(d))
    except TypeError as e:
        raise RetrievalError(
            f"{path}/{MANIFEST_FILE} does not match format {FORMAT_VERSION} ({e}); rebuild the index"
        ) from e
    for name, value in asdict(manifest).items():
        problem = _manifest_value_problem(name, value)
        if problem:
            raise RetrievalError(
                f"{path}/{MANIFEST_FILE} is damaged: {name} is {json.dumps(value)[:40]}, {problem}; "
                f"correct it, or delete {path} and run `retrieval index` to build it again"
            )
    return manifest


def upgraded(d: dict[str, Any]) -> dict[str, Any]:
    """An older format's manifest in the current format's terms. Only the manifest changed between versions, so
    reading is the whole migration; the next writer stores the current version (an older retrieval then says to
    upgrade rather than failing on fields it does not know).

    1 -> 2: the manifest gains image_precision and faiss_digest, unknown ("") for an index written before them:
    image queries are then encoded as the model runs today, and the FAISS file is checked against the database
    instead of its digest (faiss_ops.holds_vectors).
    2 -> 3: nothing to change; 3 adds the index type flat16, which a reader of 2 would call damaged."""
    if d["format_version"] < 2:
        d = {"image_precision": "", "faiss_digest": "", **d}
    return {**d, "format_version": FORMAT_VERSION}


MANIFEST_TYPES: dict[str, tuple[tuple[type, ...], str]] = {  # Manifest's annotations: the JSON types and their words
    "str": ((str,), "a string"),
    "int": ((int,), "a whole number"),
    "float": ((int, float), "a number"),
    "dict": ((dict,), "an object"),
}


def _manifest_value_problem(name: str, value: Any) -> str | None:
    """What is wrong with one manifest value, or None: its type (the annotation on Manifest) and its range."""
    annotation = next(f.type for f in fields(Manifest) if f.name == name)
    types, words = MANIFEST_TYPES[str(annotation).split("[")[0]]
    if isinstance(value, bool) or not isinstance(value, types):
        return f"not {words}"
    if isinstance(value, int) and (  # dim, generation, faiss_bytes are ints by now: this narrows `value` to compare
        (name == "dim" and value < 1) or (name in ("generation", "faiss_bytes") and value < 0)
    ):
        return "out of range"
    if name == "index_type" and value not in INDEX_TYPES[1:]:
        return f"not one of {', '.join(INDEX_TYPES[1:])}"
    if name == "image_precision" and value not in ("", "fp32", "bf16"):
        return "not fp32 or bf16"
    if name == "calibration" and isinstance(value, dict):
        return next(filter(None, (_calibration_problem(target, entry) for target, entry in value.items())), None)
    return None


def _calibration_problem(target: str, entry: Any) -> str | None:
    """What is wrong with the cutoff stored for one target, or None: search reads an object as `retrieval calibrate`
    writes it, naming its rule, with that rule's cutoff (theta or margin) and the fusion weight as numbers."""
    rule = entry.get("rule") if isinstance(entry, dict) else None
    cutoff = CALIBRATION_CUTOFFS.get(rule) if isinstance(rule, str) else None
    if (
        cutoff is None
        or not all(_is_number(entry.get(key)) for key in (cutoff, "weight"))
        or entry.get("fusion", "weighted") not in FUSIONS  # none: stored before there were rules, so weighted
    ):
        return (
            f"its {json.dumps(target)} entry is not a cutoff as `retrieval calibrate` stores it (rule flat with theta, "
            f"or top_relative with margin, the weight, and fusion one of {', '.join(FUSIONS)} if given)"
        )
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
