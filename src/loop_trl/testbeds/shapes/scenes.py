"""Synthetic scenes of flat shapes and the prompts that describe them.

A scene holds 1 to 3 shapes (circle, square, triangle) in one of six colours on a white
background. Four prompt families describe scenes:

* ``single``:  "a red circle"
* ``binding``: "a red circle and a blue square"
* ``counting``: "two green triangles" (2 or 3 of the same coloured shape)
* ``spatial``: "a red circle to the left of a blue square"

Shapes never overlap and keep a margin, so every shape is one connected region of one colour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["BACKGROUND", "COLORS", "FAMILIES", "SHAPES", "Scene", "Thing", "describe", "render", "random_scene"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 190),
    "cyan": (20, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
FAMILIES = ("single", "binding", "counting", "spatial")
BACKGROUND = (255, 255, 255)
NUMBERS = {2: "two", 3: "three"}


@dataclass(frozen=True)
class Thing:
    """One shape: colour, kind, centre (x, y) and size (the side of its bounding box), in pixels."""

    color: str
    shape: str
    x: float
    y: float
    size: float


@dataclass
class Scene:
    family: str
    things: list[Thing] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return describe(self)


def describe(scene: Scene) -> str:
    """The scene's prompt."""
    t = scene.things
    if scene.family == "single":
        return f"a {t[0].color} {t[0].shape}"
    if scene.family == "binding":
        return f"a {t[0].color} {t[0].shape} and a {t[1].color} {t[1].shape}"
    if scene.family == "counting":
        return f"{NUMBERS[len(t)]} {t[0].color} {t[0].shape}s"
    if scene.family == "spatial":
        left, right = sorted(t[:2], key=lambda thing: thing.x)
        return f"a {left.color} {left.shape} to the left of a {right.color} {right.shape}"
    raise ValueError(f"Unknown prompt family {scene.family!r}; choose one of {FAMILIES}.")


def _place(rng: np.random.Generator, count: int, image_size: int, min_size: float, max_size: float,
           separated_x: bool = False) -> list[tuple[float, float, float]]:
    """Centres and sizes of ``count`` non-overlapping boxes (with a 2 px gap), by rejection sampling."""
    for _ in range(1000):
        boxes = []
        for _ in range(count):
            size = rng.uniform(min_size, max_size)
            half = size / 2
            boxes.append((rng.uniform(half + 1, image_size - half - 1), rng.uniform(half + 1, image_size - half - 1), size))
        ok = all(
            max(abs(a[0] - b[0]) - (a[2] + b[2]) / 2, abs(a[1] - b[1]) - (a[2] + b[2]) / 2) >= 2
            for i, a in enumerate(boxes) for b in boxes[i + 1:]
        )
        if ok and separated_x:  # spatial prompts need an unambiguous left and right
            ok = abs(boxes[0][0] - boxes[1][0]) >= (boxes[0][2] + boxes[1][2]) / 2
        if ok:
            return boxes
    raise RuntimeError("Could not place the shapes; lower max_size or the count.")


def random_scene(rng: np.random.Generator, family: str, image_size: int = 32,
                 colors: tuple[str, ...] = tuple(COLORS), shapes: tuple[str, ...] = SHAPES,
                 pairs: list[tuple[str, str]] | None = None) -> Scene:
    """A random scene of ``family``. ``pairs`` restricts which (colour, shape) pairs may appear."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown prompt family {family!r}; choose one of {FAMILIES}.")
    allowed = pairs or [(c, s) for c in colors for s in shapes]
    count = {"single": 1, "binding": 2, "spatial": 2, "counting": int(rng.integers(2, 4))}[family]
    if family == "counting":
        kinds = [allowed[rng.integers(len(allowed))]] * count
    elif family == "single":
        kinds = [allowed[rng.integers(len(allowed))]]
    else:  # two different (colour, shape) pairs that differ in both colour and shape
        while True:
            a, b = (allowed[i] for i in rng.choice(len(allowed), 2, replace=False))
            if a[0] != b[0] and a[1] != b[1]:
                kinds = [a, b]
                break
    small = count > 2
    max_size = image_size * (0.3 if small else 0.42 if count == 2 else 0.6)
    boxes = _place(rng, count, image_size, image_size * 0.25, max_size, separated_x=family == "spatial")
    return Scene(family, [Thing(c, s, x, y, size) for (c, s), (x, y, size) in zip(kinds, boxes)])


def render(scene: Scene, image_size: int = 32) -> Image.Image:
    """Draw the scene without anti-aliasing, so each shape has exactly its palette colour."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for t in scene.things:
        h = t.size / 2
        box = [t.x - h, t.y - h, t.x + h - 1, t.y + h - 1]
        color = COLORS[t.color]
        if t.shape == "circle":
            draw.ellipse(box, fill=color)
        elif t.shape == "square":
            draw.rectangle(box, fill=color)
        elif t.shape == "triangle":
            draw.polygon([(t.x, t.y - h), (t.x - h, t.y + h - 1), (t.x + h - 1, t.y + h - 1)], fill=color)
        else:
            raise ValueError(f"Unknown shape {t.shape!r}; choose one of {SHAPES}.")
    return image
