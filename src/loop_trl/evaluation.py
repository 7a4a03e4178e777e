"""Evaluation on fixed prompts and fixed noise: sample, score, summarise.

:func:`sample_and_score` draws ``images_per_prompt`` images for each prompt. Image ``j`` of the
job list always gets the noise of its own generator, seeded with ``(seed, j)``, so the images do
not depend on the batch size, on how many processes share the work or on when in the run it is
done: two evaluations of the same weights give the same images, and two of different weights
differ only by the weights.

:func:`summarize` turns the scored samples into metrics: the mean reward and its standard error,
the mean and standard error of every per-image number the reward reports in its metadata (for
example ``strict`` for the shapes verifier), and each of these per category when the metadata
carries a ``category`` list (one name per image).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .rewards.base import as_reward_tensor

__all__ = ["EvalSamples", "eval_batches", "evaluate_across_processes", "sample_and_score", "summarize"]

logger = logging.getLogger(__name__)


@dataclass
class EvalSamples:
    """Scored evaluation images, one entry per image: prompts, rewards, per-image metadata numbers, categories."""

    prompts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    categories: list[str] | None = None
    num_dropped: int = 0  # images left out for a non-finite reward

    def extend(self, other: "EvalSamples") -> None:
        self.num_dropped += other.num_dropped
        self.prompts += other.prompts
        self.rewards += other.rewards
        for key, values in other.values.items():
            self.values.setdefault(key, []).extend(values)
        if other.categories is not None:
            self.categories = (self.categories or []) + other.categories


def _per_image_numbers(reward_metadata: Any, n: int) -> tuple[dict[str, list[float]], list[str] | None]:
    """The per-image numbers (bools count as 0/1) and the ``category`` list of a reward's metadata dict; a
    :class:`~loop_trl.rewards.MultiReward`'s components (its ``rewards`` dict) as ``rewards/{name}``."""
    if not isinstance(reward_metadata, dict):
        return {}, None
    numbers = {}
    components = reward_metadata.get("rewards")
    items = list(reward_metadata.items())
    if isinstance(components, dict):
        items += [(f"rewards/{name}", value) for name, value in components.items()]
    for key, value in items:
        if torch.is_tensor(value):
            value = value.detach().cpu()
            if value.ndim == 1 and len(value) == n and (value.is_floating_point() or value.dtype in (torch.bool, torch.int64, torch.int32)):
                numbers[key] = value.double().tolist()
        elif isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, (bool, int, float)) for v in value):
            numbers[key] = [float(v) for v in value]
    categories = reward_metadata.get("category")
    if not (isinstance(categories, (list, tuple)) and len(categories) == n):
        categories = None
    return numbers, None if categories is None else [str(c) for c in categories]


def eval_batches(prompts: Sequence[str], images_per_prompt: int, batch_size: int) -> list[list[int]]:
    """The evaluation's jobs as batches of prompt indices (each prompt repeated ``images_per_prompt`` times)."""
    jobs = [i for i in range(len(prompts)) for _ in range(images_per_prompt)]
    return [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]


@torch.no_grad()
def sample_and_score(
    policy: Any,
    reward_function: Callable,
    prompts: Sequence[str],
    prompt_metadata: Sequence[Any] | None = None,
    *,
    images_per_prompt: int = 4,
    seed: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    batch_size: int = 32,
    negative_prompt: str | None = None,
    batch_indices: Sequence[int] | None = None,
    progress: bool = False,
    stochastic_steps: Sequence[int] | None = None,
    skip_nonfinite: bool = False,
) -> EvalSamples:
    """Sample ``images_per_prompt`` images per prompt from fixed noise and score them.

    ``batch_indices`` picks which of the :func:`eval_batches` to run (all by default; processes
    pass their share). The result keeps the order of the batches run. ``stochastic_steps`` are the
    steps that carry noise (None: all; an SDE window: those); ``eta=0`` samples every step
    deterministically (DDIM eta 0, the flow ODE), as the plain diffusers pipelines do.

    The reward's output is checked as in training: a wrong type or length raises; a non-finite reward
    raises, or with ``skip_nonfinite`` that image is left out and counted in ``num_dropped``.
    """
    if eta == 0:
        stochastic_steps = []
    prompts = list(prompts)
    metadata = list(prompt_metadata) if prompt_metadata is not None else [{} for _ in prompts]
    batches = eval_batches(prompts, images_per_prompt, batch_size)
    chosen = range(len(batches)) if batch_indices is None else batch_indices
    out = EvalSamples()
    for b in tqdm(chosen, desc="evaluating", leave=False, disable=not progress):
        batch_prompts = [prompts[i] for i in batches[b]]
        batch_metadata = [metadata[i] for i in batches[b]]
        generator = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))
                     for j in range(b * batch_size, b * batch_size + len(batch_prompts))]
        traj = policy.sample(batch_prompts, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                             generator=generator, negative_prompt=negative_prompt, stochastic_steps=stochastic_steps)
        output = reward_function(traj.images, batch_prompts, batch_metadata)
        if not (isinstance(output, tuple) and len(output) == 2):
            raise TypeError(f"reward_function must return (rewards, reward_metadata), got {type(output).__name__}.")
        rewards = as_reward_tensor(output[0], batch_prompts)
        numbers, categories = _per_image_numbers(output[1], len(batch_prompts))
        finite = torch.isfinite(rewards)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            message = (f"reward_function returned {rewards[i].item()} for evaluation prompt {batch_prompts[i]!r} "
                       f"({int((~finite).sum())} non-finite in evaluation batch {b})")
            if not skip_nonfinite:
                raise ValueError(message + "; rewards must be finite.")
            logger.warning(message + "; those images are left out of the evaluation.")
            keep = finite.tolist()
            batch_prompts = [p for p, k in zip(batch_prompts, keep) if k]
            rewards = rewards[finite]
            numbers = {key: [v for v, k in zip(values, keep) if k] for key, values in numbers.items()}
            categories = None if categories is None else [c for c, k in zip(categories, keep) if k]
        out.extend(EvalSamples(batch_prompts, rewards.tolist(), numbers, categories))
        out.num_dropped += int((~finite).sum())
    return out


def _mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over the values that are not NaN (a reward component that could not score an image)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    if not len(array):
        return float("nan"), float("nan")
    sem = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else float("nan")
    return float(array.mean()), sem


def summarize(samples: EvalSamples) -> dict[str, float]:
    """Metrics of scored samples: ``reward_mean``/``reward_sem``, ``{key}_mean``/``{key}_sem`` for each
    per-image metadata number, and ``{metric}/{category}`` breakdowns of the means; ``num_images``."""
    columns = {"reward": samples.rewards, **samples.values}
    metrics: dict[str, float] = {"num_images": float(len(samples.rewards))}
    if samples.num_dropped:
        metrics["num_dropped"] = float(samples.num_dropped)
    for key, values in columns.items():
        joint = "/" if key.startswith("rewards/") else "_"  # rewards/{name}/mean, as in training
        metrics[f"{key}{joint}mean"], metrics[f"{key}{joint}sem"] = _mean_and_sem(values)
    if samples.categories is not None:
        for category in sorted(set(samples.categories)):
            rows = [i for i, c in enumerate(samples.categories) if c == category]
            for key, values in columns.items():
                joint = "/" if key.startswith("rewards/") else "_"
                metrics[f"{key}{joint}mean/{category}"] = _mean_and_sem([values[i] for i in rows])[0]
    return metrics


def evaluate_across_processes(policy, reward_function: Callable, eval_prompts: Sequence[tuple[str, Any]], config,
                              accelerator, *, stochastic_steps: Sequence[int] | None, sharded: bool,
                              guidance_scale: float | None = None, deterministic: bool = False) -> dict[str, float]:
    """:func:`summarize` of the evaluation of ``eval_prompts`` (``(prompt, metadata)`` rows) with the config's
    ``eval_*`` settings, the batches shared among the processes (the images do not depend on how many).

    ``deterministic`` samples with every step deterministic (DDIM eta 0, the flow ODE), as users deploy
    the model; otherwise with the training sampler (``eval_eta``, else ``sample_eta``, with the SDE window
    ``stochastic_steps``). ``sharded`` (FSDP, ZeRO-3): every forward pass gathers weights collectively,
    so a process with a batch fewer runs a throw-away batch to make the same calls as the others.
    """
    prompts = [p for p, _ in eval_prompts]
    metadata = [m for _, m in eval_prompts]
    batch_size = config.eval_batch_size or config.sample_batch_size
    num_batches = len(eval_batches(prompts, config.eval_num_images_per_prompt, batch_size))
    mine = list(range(accelerator.process_index, num_batches, accelerator.num_processes))
    settings = dict(images_per_prompt=config.eval_num_images_per_prompt, seed=config.eval_seed,
                    num_steps=config.eval_num_steps or config.sample_num_steps,
                    guidance_scale=guidance_scale or config.eval_guidance_scale or config.sample_guidance_scale,
                    eta=0.0 if deterministic else config.sample_eta if config.eval_eta is None else config.eval_eta,
                    stochastic_steps=stochastic_steps, batch_size=batch_size, negative_prompt=config.negative_prompts,
                    progress=accelerator.is_local_main_process, skip_nonfinite=config.reward_error == "skip_group")
    samples = sample_and_score(policy, reward_function, prompts, metadata, batch_indices=mine, **settings)
    short = -(-num_batches // accelerator.num_processes) - len(mine)
    if sharded and short:
        sample_and_score(policy, reward_function, prompts, metadata, batch_indices=[0] * short, **settings)
    if accelerator.num_processes > 1:
        everyone = EvalSamples()
        for part in gather_object([samples]):
            everyone.extend(part)
        samples = everyone
    return summarize(samples)
