"""The synthetic collection: deterministic files in the shared pair format, and captions true of their images."""

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.synth import COLOURS, POSITIONS, SHAPES, SIZES, Scene, captions, draw, generate, random_scene
from retrieval.errors import RetrievalError

OBJECT = r"(small|large) (\w+) (\w+)"
RELATION = re.compile(rf"^a {OBJECT} (left of|right of|above|below) a {OBJECT}$")


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(123)
    return [random_scene(rng) for _ in range(400)]


def _files(folder: Path) -> tuple[bytes, bytes, list[np.ndarray]]:
    images = [np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]
    return (folder / "pairs.jsonl").read_bytes(), (folder / "split.json").read_bytes(), images


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    runs = [("a", 5), ("b", 5), ("c", 6)]
    a, b, c = (_files(generate(tmp_path / name, 12, seed=seed, size=32).parent) for name, seed in runs)
    assert a[:2] == b[:2]
    assert all(np.array_equal(x, y) for x, y in zip(a[2], b[2], strict=True))
    assert a[0] != c[0] and a[1] != c[1]


def test_writes_n_pairs_in_the_shared_format(tmp_path: Path) -> None:
    pairs = generate(tmp_path / "synth", 30, seed=1, size=40)
    assert pairs == tmp_path / "synth" / "pairs.jsonl"
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"synth-{i:06d}" for i in range(30)]
    for r in records:
        assert {"id", "image", "captions", "objects"} <= r.keys()
        assert r["image"] == f"images/{r['id']}.png"
        with Image.open(pairs.parent / r["image"]) as image:
            assert image.mode == "RGB" and image.size == (40, 40)
        assert set(r["objects"][0]) == {"colour", "shape", "size", "x", "y"}
    assert len(list((pairs.parent / "images").iterdir())) == 30
    split = json.loads((pairs.parent / "split.json").read_text())
    assert len(split["test"]) == 6
    assert sorted(split["train"] + split["test"]) == [r["id"] for r in records]
    assert not list(pairs.parent.glob("*.tmp"))


def test_vocabulary_is_all_used(scenes: list[Scene]) -> None:
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == set(COLOURS) and len(COLOURS) >= 6
    assert {o.shape for o in objects} == set(SHAPES) and len(SHAPES) >= 4
    assert {o.size for o in objects} == set(SIZES) == {"small", "large"}
    said = {p for s in scenes if len(s.objects) == 1 for p in POSITIONS if f" {p}" in captions(s)[0]}
    assert said == set(POSITIONS)


def test_about_half_the_scenes_hold_two_or_three_objects(scenes: list[Scene]) -> None:
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3}
    assert 0.4 < (counts[2] + counts[3]) / len(scenes) < 0.6


def test_every_caption_names_every_object_once(scenes: list[Scene]) -> None:
    for scene in scenes:
        texts = captions(scene)
        assert 2 <= len(texts) <= 3 and len(set(texts)) == len(texts)
        wanted = Counter(f"{o.size} {o.colour} {o.shape}" for o in scene.objects)
        for text in texts:
            assert text == text.lower()
            assert Counter(" ".join(m) for m in re.findall(OBJECT, text)) == wanted, text


def test_relations_and_sides_agree_with_coordinates(scenes: list[Scene]) -> None:
    for scene in scenes:
        if len(scene.objects) == 1:
            o = scene.objects[0]
            where = {"on the left": o.x < 0.5, "on the right": o.x > 0.5}
            where |= {"at the top": o.y < 0.5, "at the bottom": o.y > 0.5}
            phrase = next(p for p in where if captions(scene)[0].endswith(p))
            assert where[phrase] and abs(o.x - 0.5) != abs(o.y - 0.5)
        elif len(scene.objects) == 2:
            for text, (a, b) in zip(captions(scene), [scene.objects, scene.objects[::-1]], strict=True):
                match = RELATION.match(text)
                assert match, text
                dx, dy = b.x - a.x, b.y - a.y
                horizontal = abs(dx) > 2 * abs(dy) - 1e-9
                truth = {"left of": horizontal and dx > 0, "right of": horizontal and dx < 0}
                truth |= {"above": not horizontal and dy > 0, "below": not horizontal and dy < 0}
                assert truth[match.group(4)], (text, a, b)


def test_objects_never_overlap_and_show_their_colour_at_the_centre(scenes: list[Scene]) -> None:
    size = 96
    for scene in scenes[:150]:
        objs = scene.objects
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert math.hypot(a.x - b.x, a.y - b.y) > SIZES[a.size] + SIZES[b.size]
        pixels = np.asarray(draw(scene, size)).astype(int)
        for o in objs:
            assert 0 < o.x < 1 and 0 < o.y < 1
            centre = pixels[int(o.y * size), int(o.x * size)]
            assert np.abs(centre - COLOURS[o.colour]).max() <= 10, (o, centre)


def test_bad_arguments_raise_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RetrievalError, match="n must be at least 1"):
        generate(tmp_path, 0)
    with pytest.raises(RetrievalError, match="use size >= 16"):
        generate(tmp_path, 5, size=8)
    with pytest.raises(RetrievalError, match="test_fraction"):
        generate(tmp_path, 5, test_fraction=1.0)
