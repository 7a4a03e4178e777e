"""``ShapesReward``: checks an image against its prompt by detecting the shapes in it.

Detection: each pixel takes the nearest palette colour (or background, if no colour is near),
pixels of one colour are grouped into 4-connected components, small specks are ignored, and each
component is classified by how much of its bounding box it fills (square ~1, circle ~pi/4,
triangle ~1/2). The score is the fraction of the prompt's requirements that hold:

* single "a red circle": a red circle exists;
* binding "a red circle and a blue square": each of the two exists;
* counting "two green triangles": one exists, and there are exactly two;
* spatial "a red circle to the left of a blue square": each exists, and the first is left of the second.

``reward_metadata["strict"]`` says whether all requirements hold, ``reward_metadata["score"]`` is
the fraction itself and ``reward_metadata["category"]`` names each prompt's family (evaluation
breaks its metrics down by it). With ``strict_bonus=b`` the reward is ``(score + b * strict) / (1 + b)``:
still 0 when nothing holds and 1 when all do, but a full pass is worth more than the partial
credit on the way to it.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .scenes import BACKGROUND, COLORS, SHAPES

__all__ = ["Detection", "ShapesReward", "detect", "parse_prompt", "score"]

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_PATTERNS = {
    "spatial": re.compile(rf"^a ({_COLOR}) ({_SHAPE}) to the left of a ({_COLOR}) ({_SHAPE})$"),
    "binding": re.compile(rf"^a ({_COLOR}) ({_SHAPE}) and a ({_COLOR}) ({_SHAPE})$"),
    "counting": re.compile(rf"^(two|three) ({_COLOR}) ({_SHAPE})s$"),
    "single": re.compile(rf"^a ({_COLOR}) ({_SHAPE})$"),
}


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    x: float  # centroid, pixels
    y: float
    area: int


def parse_prompt(prompt: str) -> tuple[str, tuple]:
    """``(family, fields)`` of a testbed prompt; ValueError for anything else."""
    text = prompt.strip().lower()
    for family, pattern in _PATTERNS.items():
        match = pattern.match(text)
        if match:
            return family, match.groups()
    raise ValueError(f"{prompt!r} is not a shapes-testbed prompt (single, binding, counting or spatial).")


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, as lists of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    components = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pixels = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        components.append(pixels)
    return components


def detect(image: np.ndarray, min_area_fraction: float = 0.012, max_color_distance: float = 90.0) -> list[Detection]:
    """Shapes in an (H, W, 3) uint8 image."""
    height, width, _ = image.shape
    palette = np.array([BACKGROUND] + list(COLORS.values()), dtype=np.float32)  # (7, 3)
    distance = np.linalg.norm(image[:, :, None, :].astype(np.float32) - palette[None, None], axis=-1)  # (H, W, 7)
    nearest = distance.argmin(-1)
    nearest[distance.min(-1) > max_color_distance] = 0  # far from every colour: background
    names = list(COLORS)
    min_area = max(4, int(min_area_fraction * height * width))
    detections = []
    for index, color in enumerate(names, start=1):
        for pixels in _components(nearest == index):
            if len(pixels) < min_area:
                continue
            rows, cols = np.array(pixels).T
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            fill = len(pixels) / box
            shape = "square" if fill >= 0.9 else "circle" if fill >= 0.65 else "triangle"
            detections.append(Detection(color, shape, float(cols.mean()), float(rows.mean()), len(pixels)))
    return detections


def score(prompt: str, detections: Sequence[Detection]) -> tuple[float, bool]:
    """Fraction of the prompt's requirements met by ``detections``, and whether all are."""
    family, fields = parse_prompt(prompt)

    def find(color: str, shape: str) -> list[Detection]:
        return [d for d in detections if d.color == color and d.shape == shape]

    if family == "single":
        checks = [bool(find(*fields))]
    elif family == "binding":
        checks = [bool(find(fields[0], fields[1])), bool(find(fields[2], fields[3]))]
    elif family == "counting":
        matches = find(fields[1], fields[2])
        checks = [bool(matches), len(matches) == {"two": 2, "three": 3}[fields[0]]]
    else:  # spatial
        left, right = find(fields[0], fields[1]), find(fields[2], fields[3])
        checks = [bool(left), bool(right), bool(left and right and min(d.x for d in left) < max(d.x for d in right))]
    return sum(checks) / len(checks), all(checks)


class ShapesReward:
    """``reward_function`` for the shapes testbed: the fraction of the prompt's requirements met, in [0, 1].

    ``strict_bonus`` (>= 0) adds weight to a full pass: the reward is ``(score + strict_bonus * strict)
    / (1 + strict_bonus)``, in [0, 1]. ``reward_metadata`` holds ``score`` (the fraction met, a (B,)
    float tensor), ``strict`` (a (B,) bool tensor: all requirements met), ``family`` and ``category``
    (each prompt's family) and ``detections``.
    """

    def __init__(self, min_area_fraction: float = 0.012, max_color_distance: float = 90.0, strict_bonus: float = 0.0):
        if not strict_bonus >= 0:
            raise ValueError(f"strict_bonus must be >= 0 (0 rewards the fraction of requirements met), got {strict_bonus!r}.")
        self.min_area_fraction = min_area_fraction
        self.max_color_distance = max_color_distance
        self.strict_bonus = float(strict_bonus)
        # the name the trainer's model card gives the reward
        self.__name__ = "ShapesReward" if not strict_bonus else f"ShapesReward(strict_bonus={strict_bonus:g})"

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        array = torch.as_tensor(images).detach().float().clamp(0, 1).mul(255).round().byte()
        array = array.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        scores, strict, families, all_detections = [], [], [], []
        for image, prompt in zip(array, prompts):
            found = detect(image, self.min_area_fraction, self.max_color_distance)
            value, passed = score(prompt, found)
            scores.append(value)
            strict.append(passed)
            families.append(parse_prompt(prompt)[0])
            all_detections.append(found)
        scores, strict = torch.tensor(scores, dtype=torch.float32), torch.tensor(strict)
        reward = (scores + self.strict_bonus * strict.float()) / (1 + self.strict_bonus)
        return reward, {"score": scores, "strict": strict, "family": families, "category": families,
                        "detections": all_detections}
