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

from ...evaluation import sample_and_score, summarize
from .scenes import COLORS, FAMILIES, NUMBERS, SHAPES
from .verifier import ShapesReward, parse_prompt

__all__ = ["HELD_OUT_PAIRS", "all_prompts", "evaluate", "heldout_prompts", "train_eval_prompts", "train_prompts"]

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


def train_prompts(families: Sequence[str] | None = None) -> list[str]:
    """The RL training prompts (no held-out pairing) of ``families`` (default: all four)."""
    unknown = set(families or ()) - set(FAMILIES)
    if unknown:
        raise ValueError(f"Unknown prompt families {sorted(unknown)}; choose from {FAMILIES}.")
    return [p for family, prompts in _split(False).items() if families is None or family in families for p in prompts]


def train_eval_prompts(per_family: int = 12, seed: int = 0) -> dict[str, list[str]]:
    """A fixed subset of the training prompts, by family, for measuring learning on what was trained
    (with other noise than training saw); ``per_family`` prompts of each family."""
    rng = np.random.default_rng([seed, 1])
    return {f: sorted(rng.choice(p, size=min(per_family, len(p)), replace=False).tolist()) for f, p in _split(False).items()}


def heldout_prompts(per_family: int | None = None, seed: int = 0) -> dict[str, list[str]]:
    """Held-out prompts by family; ``per_family`` draws a fixed subset of each."""
    split = _split(True)
    if per_family is None:
        return split
    rng = np.random.default_rng(seed)
    return {f: sorted(rng.choice(p, size=min(per_family, len(p)), replace=False).tolist()) for f, p in split.items()}


def evaluate(pipeline: Any, prompts: Sequence[str] | dict[str, Sequence[str]], n_per_prompt: int = 4, seed: int = 0,
             num_steps: int = 20, guidance_scale: float = 5.0, batch_size: int = 32, eta: float = 1.0) -> dict[str, float]:
    """Strict accuracy per prompt family (and ``overall``, its standard error ``overall_sem``, and
    ``mean_score``) of ``pipeline``'s images.

    ``pipeline`` is a ``LOOPStableDiffusionPipeline`` (its current weights are evaluated). Images
    are sampled with the stochastic DDIM sampler of training (``eta``) from fixed noise
    (:func:`loop_trl.evaluation.sample_and_score`).
    """
    if isinstance(prompts, dict):
        prompts = [p for family_prompts in prompts.values() for p in family_prompts]
    samples = sample_and_score(pipeline, ShapesReward(), prompts, images_per_prompt=n_per_prompt, seed=seed,
                               num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, batch_size=batch_size)
    metrics = summarize(samples)
    result = {family: metrics[f"strict_mean/{family}"] for family in FAMILIES if f"strict_mean/{family}" in metrics}
    result.update(overall=metrics["strict_mean"], overall_sem=metrics["strict_sem"], mean_score=metrics["reward_mean"],
                  mean_score_sem=metrics["reward_sem"])
    return result


def evaluate_plain_pipeline(pipe: Any, prompts: Sequence[str], n_per_prompt: int, seed: int, num_steps: int,
                            guidance_scale: float) -> dict[str, float]:
    """Strict accuracy and mean verifier score, with standard errors, of a plain diffusers pipeline's images as
    users sample them: ``pipe(prompts, ...)`` with its own scheduler (the testbed's: deterministic DDIM), all
    ``n_per_prompt * len(prompts)`` images in one call from one generator seeded with ``seed``."""
    from ...evaluation import EvalSamples

    jobs = [p for p in prompts for _ in range(n_per_prompt)]
    images = pipe(jobs, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    scores, meta = ShapesReward()(images, jobs, [{}] * len(jobs))
    m = summarize(EvalSamples(jobs, scores.tolist(), {"strict": meta["strict"].double().tolist()}))
    return {"strict": m["strict_mean"], "strict_sem": m["strict_sem"], "mean_score": m["reward_mean"],
            "mean_score_sem": m["reward_sem"]}
