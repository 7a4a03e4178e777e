"""Advantage estimators: pure functions of rewards and group ids, plus DDPO's per-prompt tracker.

A *group* is the K samples drawn for one prompt. ``group_ids`` is a (B,) integer tensor that
gives each sample its group; the samples of a group need not be adjacent.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "frac_reward_zero_std",
    "PerPromptStatTracker",
    "batch_normalized_advantages",
    "compute_advantages",
    "group_normalized_advantages",
    "group_reward_std",
    "leave_one_out_advantages",
]

ADVANTAGE_ESTIMATORS = ("loo", "group_norm", "per_prompt_tracker", "batch_norm")


def _group_sums(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sum of ``values`` over its group and the group's size, both (B,)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, inverse, values)
    counts.index_add_(0, inverse, torch.ones_like(values))
    return sums[inverse], counts[inverse]


def leave_one_out_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """LOOP's baseline: ``A_i = r_i - mean of the other K-1 rewards of i's group``.

    Every group needs at least two samples. A group's advantages sum to zero, and adding a
    constant to all rewards leaves them unchanged.
    """
    rewards = rewards.double()
    sums, counts = _group_sums(rewards, group_ids)
    if bool((counts < 2).any()):
        raise ValueError("The leave-one-out advantage needs at least 2 samples per prompt group.")
    baseline = (sums - rewards) / (counts - 1)
    return (rewards - baseline).float()


def group_normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: ``(r_i - group mean) / (group std + eps)``, population std."""
    rewards = rewards.double()
    sums, counts = _group_sums(rewards, group_ids)
    mean = sums / counts
    sq_sums, _ = _group_sums((rewards - mean) ** 2, group_ids)
    std = (sq_sums / counts).sqrt()
    return ((rewards - mean) / (std + eps)).float()


def group_reward_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean over groups of the within-group (population) reward std: how much the K samples differ."""
    rewards = rewards.double()
    sums, counts = _group_sums(rewards, group_ids)
    sq_sums, _ = _group_sums((rewards - sums / counts) ** 2, group_ids)
    # each sample carries its group's std; weight by 1/count so every group counts once
    per_sample_std = (sq_sums / counts).sqrt()
    return ((per_sample_std / counts).sum() / (1 / counts).sum()).float()


def frac_reward_zero_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """The share of groups whose rewards are all equal (TRL GRPO's ``frac_reward_zero_std``): such a group's
    leave-one-out or group-normalised advantages are all zero, so it gives no learning signal."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    rewards = rewards.double()
    high = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, rewards, "amax")
    low = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, rewards, "amin")
    return (high == low).double().mean().item()


def batch_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """DDPO without tracking: ``(r - batch mean) / (batch std + eps)``."""
    rewards = rewards.double()
    return ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)).float()


class PerPromptStatTracker:
    """DDPO's persistent per-prompt reward statistics.

    Keeps the last ``buffer_size`` rewards seen for each prompt. A reward is normalised by
    its prompt's buffered mean and std once the buffer holds ``min_count`` rewards, and by the
    whole batch's statistics before that. ``last_tracked_fraction`` is the fraction of the last
    update's rewards that were normalised by their own prompt's statistics (0 means the tracker
    has not engaged yet and the update was plain batch normalisation).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if buffer_size < 1 or min_count < 1:
            raise ValueError("PerPromptStatTracker needs buffer_size >= 1 and min_count >= 1.")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque] = {}
        self.last_tracked_fraction = 0.0

    def update(self, prompts: Sequence[str], rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Add ``rewards`` (B,) to the buffers of ``prompts`` and return the advantages (B,)."""
        values = rewards.detach().double().cpu().numpy()
        if len(prompts) != len(values):
            raise ValueError(f"Got {len(prompts)} prompts for {len(values)} rewards.")
        advantages = np.empty_like(values)
        prompt_array = np.array(prompts, dtype=object)
        tracked = 0
        for prompt in dict.fromkeys(prompts):
            mask = prompt_array == prompt
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = values.mean(), values.std()
            else:
                mean, std = np.mean(buffer), np.std(buffer)
                tracked += int(mask.sum())
            advantages[mask] = (values[mask] - mean) / (std + eps)
        self.last_tracked_fraction = tracked / max(1, len(values))
        return torch.from_numpy(advantages).float().to(rewards.device)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {prompt: list(buffer) for prompt, buffer in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state["stats"].items()}


def compute_advantages(
    estimator: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    prompts: Sequence[str] | None = None,
    tracker: PerPromptStatTracker | None = None,
) -> torch.Tensor:
    """Dispatch to one of :data:`ADVANTAGE_ESTIMATORS`; ``prompts`` and ``tracker`` serve the tracker."""
    if estimator == "loo":
        return leave_one_out_advantages(rewards, group_ids)
    if estimator == "group_norm":
        return group_normalized_advantages(rewards, group_ids)
    if estimator == "batch_norm":
        return batch_normalized_advantages(rewards)
    if estimator == "per_prompt_tracker":
        if tracker is None or prompts is None:
            raise ValueError("advantage_estimator='per_prompt_tracker' needs prompts and a PerPromptStatTracker.")
        return tracker.update(prompts, rewards)
    raise ValueError(f"Unknown advantage_estimator {estimator!r}; choose one of {ADVANTAGE_ESTIMATORS}.")
