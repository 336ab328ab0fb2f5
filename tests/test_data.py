"""Pair manifests: JSONL, CSV and folders all give the same Pair records, and a bad row names its file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from retrieval.data.pairs import Pair, image_caption_pairs, read_pairs, read_split, select
from retrieval.errors import RetrievalError


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (255, 0, 0)).save(path)
    return path


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- JSONL -------------------------------------------------------------------------------------------------


def test_jsonl_reads_captions_lists_caption_strings_and_keeps_extra_fields(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "pairs.jsonl",
        [
            json.dumps(
                {
                    "id": "a",
                    "image": "images/a.png",
                    "captions": ["a red circle", "  a round red thing "],
                    "split": "train",
                }
            ),
            "",
            "   ",
            json.dumps({"id": "b", "image": "b.png", "caption": "a blue square", "objects": [{"shape": "square"}]}),
        ],
    )
    a, b = read_pairs(path)
    assert a == Pair("a", tmp_path / "images" / "a.png", ("a red circle", "a round red thing"))
    assert a.extra == {"split": "train"}
    assert b == Pair("b", tmp_path / "b.png", ("a blue square",))
    assert b.extra == {"objects": [{"shape": "square"}]}


def test_jsonl_images_resolve_against_the_manifests_folder_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "pairs.jsonl", [json.dumps({"id": "x", "image": "img/x.png", "caption": "c"})])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (pair,) = read_pairs(Path("..") / "data" / "pairs.jsonl")
    assert pair.image is not None and pair.image.resolve() == (tmp_path / "data" / "img" / "x.png").resolve()


def test_jsonl_text_only_and_image_only_rows_and_default_ids(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "pairs.jsonl",
        [
            json.dumps({"caption": "just words"}),
            json.dumps({"image": "only.png"}),
            json.dumps({"image": "empty.png", "captions": ["", "  "]}),
        ],
    )
    text_only, image_only, blank_captions = read_pairs(path)
    assert text_only == Pair("1", None, ("just words",))
    assert image_only == Pair("2", tmp_path / "only.png", ())
    assert blank_captions == Pair("3", tmp_path / "empty.png", ())
    assert image_caption_pairs([text_only, image_only, blank_captions]) == []


def test_a_malformed_json_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "pairs.jsonl",
        [json.dumps({"id": "a", "caption": "ok"}), "", '{"id": "b", "caption": "missing brace"'],
    )
    with pytest.raises(RetrievalError, match=r"pairs\.jsonl:3: not valid JSON"):
        read_pairs(path)


def test_a_line_that_is_not_an_object_names_the_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "pairs.jsonl", [json.dumps({"caption": "ok"}), json.dumps(["a", "list"])])
    with pytest.raises(RetrievalError, match=r"pairs\.jsonl:2: each line must be a JSON object"):
        read_pairs(path)


def test_a_row_with_neither_image_nor_caption_names_the_line(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "pairs.jsonl",
        [json.dumps({"id": "a", "caption": "ok"}), json.dumps({"id": "b", "image": "", "captions": ["  "], "note": 1})],
    )
    with pytest.raises(RetrievalError, match=r"pairs\.jsonl:2: a row needs an 'image', a caption, or both"):
        read_pairs(path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"image": "a.png", "captions": ["ok", 3]}, r"pairs\.jsonl:1: captions must be a string or a list of strings"),
        (
            {"image": "a.png", "caption": {"text": "x"}},
            r"pairs\.jsonl:1: captions must be a string or a list of strings",
        ),
        ({"image": ["a.png"], "caption": "x"}, r"pairs\.jsonl:1: 'image' must be a path string"),
    ],
)
def test_badly_typed_fields_name_the_line(tmp_path: Path, row: dict, message: str) -> None:
    path = _jsonl(tmp_path / "pairs.jsonl", [json.dumps(row)])
    with pytest.raises(RetrievalError, match=message):
        read_pairs(path)


def test_duplicate_ids_are_an_error_naming_the_id(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "pairs.jsonl",
        [
            json.dumps({"id": "a", "caption": "x"}),
            json.dumps({"id": "b", "caption": "y"}),
            json.dumps({"id": "a", "caption": "z"}),
        ],
    )
    with pytest.raises(RetrievalError, match=r"pairs\.jsonl: id 'a' appears twice; ids must be unique"):
        read_pairs(path)


def test_numeric_ids_become_strings(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "pairs.jsonl", [json.dumps({"id": 17, "caption": "x"}), json.dumps({"id": 5, "caption": "y"})]
    )
    assert [p.id for p in read_pairs(path)] == ["17", "5"]


def test_an_id_of_zero_is_kept(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "pairs.jsonl", [json.dumps({"id": 0, "caption": "x"}), json.dumps({"id": 1, "caption": "y"})]
    )
    assert [p.id for p in read_pairs(path)] == ["0", "1"]


# --- CSV ---------------------------------------------------------------------------------------------------


def test_csv_reads_image_and_caption_columns_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(
        'id,image,caption,source\nx,img/x.png,"a red, round circle",web\n,y.png,a square,\n,,only text,book\n'
    )
    x, y, t = read_pairs(path)
    assert x == Pair("x", tmp_path / "img" / "x.png", ("a red, round circle",))
    assert x.extra == {"source": "web"}
    assert y == Pair("3", tmp_path / "y.png", ("a square",))  # no id: the file's line number
    assert t == Pair("4", None, ("only text",))


def test_csv_with_only_an_image_column_gives_image_only_pairs(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("image\na.png\nb.png\n")
    assert read_pairs(path) == [Pair("2", tmp_path / "a.png", ()), Pair("3", tmp_path / "b.png", ())]


def test_csv_without_image_or_caption_header_says_what_is_needed(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("path,text\na.png,hello\n")
    with pytest.raises(RetrievalError, match=r"pairs\.csv:1: the header needs an 'image' and/or a 'caption' column"):
        read_pairs(path)


def test_an_empty_csv_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("")
    with pytest.raises(RetrievalError, match=r"pairs\.csv:1: the header needs"):
        read_pairs(path)


def test_a_csv_row_with_neither_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\na.png,one\nb.png,two\n,\n")
    with pytest.raises(RetrievalError, match=r"pairs\.csv:4: a row needs"):
        read_pairs(path)


def test_a_csv_error_after_a_blank_line_names_the_physical_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\na.png,one\n\n,\n")
    with pytest.raises(RetrievalError, match=r"pairs\.csv:4: a row needs"):
        read_pairs(path)


# --- folders -----------------------------------------------------------------------------------------------


def test_a_folder_pairs_each_image_with_its_sidecar_lines(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _png(root / "b.png")
    (root / "b.txt").write_text("a blue square\n\n  a square that is blue  \n")
    _png(root / "a.jpg")  # no sidecar: image-only
    _png(root / "nested" / "deeper" / "c.PNG")
    (root / "nested" / "deeper" / "c.txt").write_text("a green triangle")
    (root / "notes.txt").write_text("not a caption of anything")
    (root / "readme.md").write_text("ignored")
    _png(root / ".hidden.png")
    _png(root / ".cache" / "d.png")
    _png(root / "nested" / ".thumbs" / "e.png")
    pairs = read_pairs(root)
    assert pairs == [
        Pair("a.jpg", root / "a.jpg", ()),
        Pair("b.png", root / "b.png", ("a blue square", "a square that is blue")),
        Pair("nested/deeper/c.PNG", root / "nested" / "deeper" / "c.PNG", ("a green triangle",)),
    ]


def test_a_folder_under_a_hidden_parent_is_still_read(tmp_path: Path) -> None:
    # Only parts below the folder itself count as hidden.
    root = tmp_path / ".data" / "photos"
    _png(root / "a.png")
    assert [p.id for p in read_pairs(root)] == ["a.png"]


def test_an_empty_folder_says_which_suffixes_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrievalError, match=r"empty: no images found \(looked for .*\.jpg.*\.png"):
        read_pairs(tmp_path / "empty")


def test_a_folder_of_only_hidden_or_non_images_has_no_images(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _png(root / ".hidden.png")
    (root / "a.txt").write_text("caption without an image")
    with pytest.raises(RetrievalError, match=r"no images found"):
        read_pairs(root)


# --- the source itself -------------------------------------------------------------------------------------


def test_a_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(RetrievalError, match=r"no such manifest or folder: .*nothing\.jsonl"):
        read_pairs(tmp_path / "nothing.jsonl")


def test_an_unknown_suffix_lists_the_known_kinds(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("image\tcaption\n")
    with pytest.raises(RetrievalError, match=r"pairs\.tsv: unknown manifest type; use \.jsonl, \.csv or a folder"):
        read_pairs(path)


def test_suffixes_are_matched_case_insensitively(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "PAIRS.JSONL", [json.dumps({"id": "a", "caption": "x"})])
    assert read_pairs(path) == [Pair("a", None, ("x",))]


# --- splits ------------------------------------------------------------------------------------------------


def test_read_split_returns_string_ids_and_select_keeps_manifest_order(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["b", 3], "test": ["a"], "note": "not a split"}))
    assert read_split(path, "train") == {"b", "3"}
    pairs = [Pair("3", None, ("x",)), Pair("a", None, ("y",)), Pair("b", None, ("z",))]
    assert [p.id for p in select(pairs, read_split(path, "train"))] == ["3", "b"]


def test_a_missing_split_lists_the_ones_there_are(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a"], "test": ["b"], "note": "not a split"}))
    with pytest.raises(RetrievalError, match=r"split\.json has no split 'val'; it has train, test$"):
        read_split(path, "val")


def test_a_split_file_with_no_splits_says_none(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text("{}")
    with pytest.raises(RetrievalError, match=r"no split 'train'; it has none"):
        read_split(path, "train")


def test_an_unreadable_split_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RetrievalError, match=r"cannot read split file .*missing\.json"):
        read_split(tmp_path / "missing.json", "train")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RetrievalError, match=r"cannot read split file .*bad\.json"):
        read_split(bad, "train")


def test_a_split_file_that_is_not_an_object_is_a_retrieval_error(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(json.dumps(["a", "b"]))
    with pytest.raises(RetrievalError, match=r"split\.json"):
        read_split(path, "train")
