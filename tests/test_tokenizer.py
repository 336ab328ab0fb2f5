"""The word tokenizer: deterministic training, the [BOS] ... [EOS] [PAD] layout, and its file on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import RetrievalError
from retrieval.models.tokenizer import BOS, EOS, FORMAT_VERSION, PAD, SPECIALS, UNK, Tokenizer, split_words

TEXTS = [
    "a red circle",
    "a blue square",
    "a red square",
    "the blue circle",
    "a green triangle",
    "a red circle",
]
# counts: a 5, red 3, blue 2, circle 3, square 2, the 1, green 1, triangle 1


def test_specials_have_the_documented_ids() -> None:
    assert SPECIALS == ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
    assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)


def test_training_keeps_words_by_min_count_most_frequent_first_ties_alphabetical() -> None:
    tok = Tokenizer.train(TEXTS, min_count=2)
    assert tok.vocab == [*SPECIALS, "a", "circle", "red", "blue", "square"]
    tok1 = Tokenizer.train(TEXTS, min_count=1)
    assert tok1.vocab == [*SPECIALS, "a", "circle", "red", "blue", "square", "green", "the", "triangle"]
    assert len(tok1) == 12


def test_training_does_not_depend_on_the_order_of_the_texts() -> None:
    assert Tokenizer.train(TEXTS, min_count=1).vocab == Tokenizer.train(TEXTS[::-1], min_count=1).vocab


def test_max_size_counts_the_specials_and_keeps_the_most_frequent() -> None:
    tok = Tokenizer.train(TEXTS, max_size=6, min_count=1)
    assert tok.vocab == [*SPECIALS, "a", "circle"]


def test_training_lower_cases_and_splits_punctuation() -> None:
    assert split_words("A Red-Circle, LEFT of 2 cats!") == [
        "a",
        "red",
        "-",
        "circle",
        ",",
        "left",
        "of",
        "2",
        "cats",
        "!",
    ]
    tok = Tokenizer.train(["Red, red.", "RED!"], min_count=3)
    assert tok.vocab == [*SPECIALS, "red"]


def test_encode_lays_out_bos_words_eos_then_pad() -> None:
    tok = Tokenizer.train(TEXTS, min_count=2)
    ids = tok.encode(["a red circle", "blue"], context_length=7)
    a, circle, red, blue = (tok.ids[w] for w in ("a", "circle", "red", "blue"))
    assert ids.dtype == np.int64 and ids.shape == (2, 7)
    assert ids[0].tolist() == [BOS, a, red, circle, EOS, PAD, PAD]
    assert ids[1].tolist() == [BOS, blue, EOS, PAD, PAD, PAD, PAD]


def test_unknown_words_become_unk_and_case_and_punctuation_are_normalised() -> None:
    tok = Tokenizer.train(TEXTS, min_count=2)
    a, red, square = (tok.ids[w] for w in ("a", "red", "square"))
    # "purple" never seen, "the" seen once (below min_count), "," and "!" not in the vocabulary.
    ids = tok.encode(["A RED, purple Square!", "the square"], context_length=10)
    assert ids[0].tolist() == [BOS, a, red, UNK, UNK, square, UNK, EOS, PAD, PAD]
    assert ids[1].tolist() == [BOS, UNK, square, EOS, PAD, PAD, PAD, PAD, PAD, PAD]


def test_a_long_text_is_cut_but_keeps_its_eos() -> None:
    tok = Tokenizer.train(TEXTS, min_count=1)
    words = "a red circle the blue square a green triangle".split()
    ids = tok.encode([" ".join(words)], context_length=6)[0]
    assert ids.tolist() == [BOS, *(tok.ids[w] for w in words[:4]), EOS]
    # Exactly fitting: no cut and no padding.
    ids = tok.encode(["a red circle"], context_length=5)[0]
    assert ids.tolist() == [BOS, tok.ids["a"], tok.ids["red"], tok.ids["circle"], EOS]


def test_empty_and_blank_texts_give_bos_eos() -> None:
    tok = Tokenizer.train(TEXTS)
    ids = tok.encode(["", "   "], context_length=4)
    assert ids.tolist() == [[BOS, EOS, PAD, PAD], [BOS, EOS, PAD, PAD]]


def test_decode_drops_specials() -> None:
    tok = Tokenizer.train(TEXTS, min_count=1)
    assert tok.decode(tok.encode(["The red  Circle"], 8)[0].tolist()) == "the red circle"


def test_a_vocabulary_without_the_specials_first_is_refused() -> None:
    with pytest.raises(RetrievalError, match=r"must start with"):
        Tokenizer(["a", "[PAD]", "[UNK]", "[BOS]", "[EOS]"])


def test_save_load_round_trip_gives_identical_encodings(tmp_path: Path) -> None:
    tok = Tokenizer.train(TEXTS, min_count=1)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab == tok.vocab
    probe = ["a red circle", "THE green, triangle!", "unknown words here", ""]
    np.testing.assert_array_equal(loaded.encode(probe, 9), tok.encode(probe, 9))
    on_disk = json.loads(path.read_text())
    assert on_disk["format_version"] == FORMAT_VERSION and on_disk["type"] == "word"
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed into place


def test_a_newer_format_version_says_to_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"format_version": FORMAT_VERSION + 1, "type": "word", "vocab": list(SPECIALS)}))
    with pytest.raises(RetrievalError, match=r"upgrade") as e:
        Tokenizer.load(path)
    assert "tokenizer.json" in str(e.value) and str(FORMAT_VERSION + 1) in str(e.value)


def test_a_corrupt_file_is_a_retrieval_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"format_version": 1, "type": "word", "vocab": ["[PAD]"')
    with pytest.raises(RetrievalError, match=r"cannot read tokenizer .*tokenizer\.json"):
        Tokenizer.load(path)


def test_a_missing_file_is_a_retrieval_error(tmp_path: Path) -> None:
    with pytest.raises(RetrievalError, match=r"cannot read tokenizer .*nope\.json"):
        Tokenizer.load(tmp_path / "nope.json")


def test_an_unknown_tokenizer_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"format_version": 1, "type": "bpe", "vocab": list(SPECIALS)}))
    with pytest.raises(RetrievalError, match=r"unknown type 'bpe'"):
        Tokenizer.load(path)


def test_valid_json_that_is_not_an_object_is_a_retrieval_error(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(list(SPECIALS)))
    with pytest.raises(RetrievalError, match=r"tokenizer\.json"):
        Tokenizer.load(path)


def test_a_file_without_a_vocabulary_is_a_retrieval_error(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"format_version": 1, "type": "word"}))
    with pytest.raises(RetrievalError, match=r"tokenizer\.json"):
        Tokenizer.load(path)
