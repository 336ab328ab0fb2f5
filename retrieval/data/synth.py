"""A built-in synthetic image-caption collection: flat coloured shapes on a light background.

Sample data for the demo and the tests. Every caption is true of its image and names each object's
size, colour and shape, so a tiny dual encoder can learn the collection in minutes on a CPU.
`generate` writes the on-disk format of the real sets in ../shared/data: images/, pairs.jsonl, split.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from retrieval.atomic import atomic_write_text
from retrieval.errors import RetrievalError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 135, 20),
    "yellow": (235, 205, 20),
    "green": (40, 160, 60),
    "blue": (40, 90, 225),
    "purple": (145, 55, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: dict[str, float] = {"small": 0.1, "large": 0.19}  # bounding-circle radius / image side
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")

_MARGIN = 0.02  # kept between a shape's bounding circle and the image edge (fraction of the side)
_GAP = 0.04  # kept between two shapes' bounding circles, so no shape ever covers another
_CLEAR = 2.0  # a described offset is at least this many times longer on its axis than across it
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}

Outline = tuple[tuple[float, float], ...]  # polygon vertices inside the unit circle, y downwards


@dataclass(frozen=True)
class Shape:
    """One drawn object; (x, y) is its centre in [0, 1] image coordinates, y downwards."""

    colour: str
    shape: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """What one image shows: the objects and the background they sit on."""

    objects: tuple[Shape, ...]
    background: tuple[int, int, int]


def _ring(n: int, radii: tuple[float, ...], start_deg: float) -> Outline:
    """n vertices at equal angles, cycling through radii: regular polygons and stars alike."""
    vertices = []
    for i in range(n):
        angle, radius = math.radians(start_deg + 360 * i / n), radii[i % len(radii)]
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    return tuple(vertices)


def _cross(w: float, scale: float) -> Outline:
    """A plus sign: one arm's three corners, turned four times by 90 degrees."""
    arm, corners = [(-w, -1.0), (w, -1.0), (w, -w)], []
    for _ in range(4):
        corners += arm
        arm = [(-y, x) for x, y in arm]
    return tuple((scale * x, scale * y) for x, y in corners)


# Every outline fits the unit circle; circle and square have the same area, so "size" reads alike.
_OUTLINES: dict[str, Outline] = {
    "circle": _ring(32, (0.8,), 0),
    "square": _ring(4, (1.0,), 45),
    "triangle": _ring(3, (1.0,), -90),
    "star": _ring(10, (1.0, 0.45), -90),
    "cross": _cross(0.35, 0.94),
}


def describe(obj: Shape) -> str:
    """The noun phrase every caption uses for an object, e.g. "small red circle"."""
    return f"{obj.size} {obj.colour} {obj.shape}"


def side(obj: Shape) -> str:
    """The side of the image an object sits at: the farthest from the centre along its dominant axis."""
    dx, dy = obj.x - 0.5, obj.y - 0.5
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def relation(a: Shape, b: Shape) -> str:
    """Where a lies relative to b, along the axis their centres differ most in."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _clear(dx: float, dy: float) -> bool:
    """Whether an offset is unmistakably horizontal or vertical, so its caption is not a judgement call."""
    return max(abs(dx), abs(dy)) >= _CLEAR * min(abs(dx), abs(dy))


def _apart(a: Shape, b: Shape) -> bool:
    """Whether two bounding circles keep _GAP between them."""
    return math.hypot(a.x - b.x, a.y - b.y) >= SIZES[a.size] + SIZES[b.size] + _GAP


def _shape(kind: tuple[str, str, str], x: float, y: float) -> Shape:
    """A Shape with its centre rounded, so pairs.jsonl holds exactly the coordinates that were drawn."""
    return Shape(*kind, x=round(float(x), 4), y=round(float(y), 4))


def _kind(rng: np.random.Generator) -> tuple[str, str, str]:
    """A uniformly random (colour, shape, size)."""
    colours, sizes = list(COLOURS), list(SIZES)
    return colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], sizes[rng.integers(len(sizes))]


def _lone(rng: np.random.Generator) -> Shape:
    """One object near the middle of a side, far enough out that the side is unambiguous."""
    kind = _kind(rng)
    where = POSITIONS[rng.integers(len(POSITIONS))]
    along = rng.uniform(0.22, 0.5 - SIZES[kind[2]] - _MARGIN) * (-1 if where in ("left", "top") else 1)
    across = rng.uniform(-0.08, 0.08)
    dx, dy = (along, across) if where in ("left", "right") else (across, along)
    return _shape(kind, 0.5 + dx, 0.5 + dy)


def _group(rng: np.random.Generator, k: int) -> tuple[Shape, ...]:
    """k objects that never overlap, each later one clearly left of/right of/above/below the first."""
    kinds = [_kind(rng) for _ in range(k)]
    lows = [SIZES[size] + _MARGIN for _, _, size in kinds]
    while True:  # rejection sampling; even three large shapes are accepted within a few hundred draws
        objs = tuple(_shape(kind, *rng.uniform(low, 1 - low, 2)) for kind, low in zip(kinds, lows, strict=True))
        apart = all(_apart(a, b) for i, a in enumerate(objs) for b in objs[i + 1 :])
        if apart and all(_clear(o.x - objs[0].x, o.y - objs[0].y) for o in objs[1:]):
            return objs


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """Near-white to light grey with a faint tint: varied, but never close to an object colour."""
    base = int(rng.integers(215, 251))
    r, g, b = (min(255, base + int(rng.integers(-6, 7))) for _ in range(3))
    return r, g, b


def random_scene(rng: np.random.Generator) -> Scene:
    """Half the scenes hold one object at a side, half hold 2-3 objects in clear relations."""
    background = _background(rng)
    if rng.random() < 0.5:
        return Scene((_lone(rng),), background)
    return Scene(_group(rng, int(rng.integers(2, 4))), background)


def draw(scene: Scene, size: int) -> Image.Image:
    """Render a scene at size x size pixels: flat fills, no outlines, no noise, so colours stay exact."""
    image = Image.new("RGB", (size, size), scene.background)
    pen = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * size, obj.y * size, SIZES[obj.size] * size
        pen.polygon([(cx + r * u, cy + r * v) for u, v in _OUTLINES[obj.shape]], fill=COLOURS[obj.colour])
    return image


def captions(scene: Scene) -> list[str]:
    """2-3 different true captions, each naming every object's size, colour and shape."""
    objs, names = scene.objects, [describe(o) for o in scene.objects]
    if len(objs) == 1:
        where = _WHERE[side(objs[0])]
        return [f"a {names[0]} {where}", f"{where}, a single {names[0]}"]
    a, b = objs[0], objs[1]
    first = f"a {names[0]} {relation(a, b)} a {names[1]}"
    second = f"a {names[1]} {relation(b, a)} a {names[0]}"
    if len(objs) == 2:
        return [first, second]
    c = objs[2]
    return [
        f"{first}, and a {names[2]}",
        f"a {names[2]} {relation(c, a)} a {names[0]}, and a {names[1]}",
        f"three shapes: a {names[0]}, a {names[1]} and a {names[2]}",
    ]


def generate(out: str | Path, n: int, seed: int = 0, size: int = 96, test_fraction: float = 0.2) -> Path:
    """Write n scenes under out (images/, pairs.jsonl, split.json); the same seed gives the same files."""
    if n < 1:
        raise RetrievalError(f"cannot generate {n} synthetic images: n must be at least 1.")
    if size < 16:
        raise RetrievalError(f"synthetic image size {size} px is too small to draw shapes in: use size >= 16.")
    if not 0 <= test_fraction < 1:
        raise RetrievalError(f"test_fraction {test_fraction} is outside [0, 1): use e.g. 0.2 for 20% test.")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids, lines = [], []
    for i in range(n):
        pair_id, scene = f"synth-{i:06d}", random_scene(rng)
        draw(scene, size).save(out / "images" / f"{pair_id}.png", format="PNG")
        record = {
            "id": pair_id,
            "image": f"images/{pair_id}.png",
            "captions": captions(scene),
            "objects": [asdict(o) for o in scene.objects],
        }
        ids.append(pair_id)
        lines.append(json.dumps(record) + "\n")
    test = {ids[j] for j in rng.permutation(n)[: round(n * test_fraction)]}
    split = {"train": [i for i in ids if i not in test], "test": [i for i in ids if i in test]}
    atomic_write_text(out / "split.json", json.dumps(split) + "\n", unique=True)  # two runs may write one folder
    atomic_write_text(out / "pairs.jsonl", "".join(lines), unique=True)
    return out / "pairs.jsonl"
