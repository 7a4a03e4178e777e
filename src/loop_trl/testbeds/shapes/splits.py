"""Fixed prompt splits for RL on the shapes testbed, and held-out evaluation.

Four (colour, shape) pairings are held out: no training prompt contains one, and every held-out
prompt contains at least one. Held-out accuracy therefore measures whether what RL teaches
(binding the right colour to the right shape, counting, left and right) transfers to
combinations the RL prompts never asked for.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import torch

from .scenes import COLORS, FAMILIES, NUMBERS, SHAPES
from .verifier import ShapesReward, parse_prompt

__all__ = ["HELD_OUT_PAIRS", "all_prompts", "evaluate", "heldout_prompts", "train_prompts"]

HELD_OUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "circle"))


def _pairs_of(prompt: str) -> list[tuple[str, str]]:
    family, f = parse_prompt(prompt)
    if family == "single":
        return [(f[0], f[1])]
    if family == "counting":
        return [(f[1], f[2])]
    return [(f[0], f[1]), (f[2], f[3])]


def all_prompts() -> dict[str, list[str]]:
    """Every testbed prompt, by family (two objects always differ in both colour and shape)."""
    pairs = list(itertools.product(COLORS, SHAPES))
    two = [(a, b) for a, b in itertools.permutations(pairs, 2) if a[0] != b[0] and a[1] != b[1]]
    return {
        "single": [f"a {c} {s}" for c, s in pairs],
        "binding": [f"a {a[0]} {a[1]} and a {b[0]} {b[1]}" for a, b in two],
        "counting": [f"{NUMBERS[n]} {c} {s}s" for n in (2, 3) for c, s in pairs],
        "spatial": [f"a {a[0]} {a[1]} to the left of a {b[0]} {b[1]}" for a, b in two],
    }


def _split(held_out: bool) -> dict[str, list[str]]:
    keep = {}
    for family, prompts in all_prompts().items():
        keep[family] = [p for p in prompts if any(pair in HELD_OUT_PAIRS for pair in _pairs_of(p)) == held_out]
    return keep


def train_prompts() -> list[str]:
    """The RL training prompts of all four families (no held-out pairing)."""
    return [p for prompts in _split(False).values() for p in prompts]


def heldout_prompts(per_family: int | None = None, seed: int = 0) -> dict[str, list[str]]:
    """Held-out prompts by family; ``per_family`` draws a fixed subset of each."""
    split = _split(True)
    if per_family is None:
        return split
    rng = np.random.default_rng(seed)
    return {f: sorted(rng.choice(p, size=min(per_family, len(p)), replace=False).tolist()) for f, p in split.items()}


@torch.no_grad()
def evaluate(pipeline: Any, prompts: Sequence[str] | dict[str, Sequence[str]], n_per_prompt: int = 4, seed: int = 0,
             num_steps: int = 20, guidance_scale: float = 5.0, batch_size: int = 32) -> dict[str, float]:
    """Strict accuracy per prompt family (and ``mean_score``, ``overall``) of ``pipeline``'s images.

    ``pipeline`` is a ``LOOPStableDiffusionPipeline`` (its current weights are evaluated). Images
    are sampled with the same stochastic DDIM sampler as training (eta=1) from a fixed seed.
    """
    if isinstance(prompts, dict):
        prompts = [p for family_prompts in prompts.values() for p in family_prompts]
    jobs = [p for p in prompts for _ in range(n_per_prompt)]
    reward = ShapesReward()
    generator = torch.Generator().manual_seed(seed)
    passed: dict[str, list[bool]] = {family: [] for family in FAMILIES}
    scores = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        traj = pipeline.sample(batch, num_steps=num_steps, guidance_scale=guidance_scale, eta=1.0, generator=generator)
        values, meta = reward(traj.images, batch, [{}] * len(batch))
        scores.extend(values.tolist())
        for family, ok in zip(meta["family"], meta["strict"].tolist()):
            passed[family].append(ok)
    result = {family: float(np.mean(v)) for family, v in passed.items() if v}
    result["overall"] = float(np.mean([ok for v in passed.values() for ok in v]))
    result["mean_score"] = float(np.mean(scores))
    return result
