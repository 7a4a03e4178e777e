"""Which denoising steps a trajectory is trained on, and how much each counts: pure functions.

A trajectory of T steps has step indices 0 (pure noise) .. T-1 (the step that lands on the
image). The trainer trains on ``num_train_timesteps`` of the *eligible* steps
``range(T)[start:stop]`` (Python slice rules, so ``stop=-2`` leaves out the final two), drawn
anew for every sample and inner epoch. Optional per-step weights scale each step's loss.

Why leave out steps: near the end of sampling the transition's standard deviation is tiny
(with 10 DDIM steps the last one's std is about 0.04), so the log-probability is very
sensitive to the weights while the step hardly changes the image. Such a step contributes most
of a minibatch's gradient norm and almost none of its reward signal;
``benchmarks/timestep_diagnostics.py`` prints each step's share for a given model.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["eligible_steps", "normalized_step_weights", "select_timesteps"]


def eligible_steps(num_steps: int, start: int = 0, stop: int | None = None) -> list[int]:
    """The step indices ``range(num_steps)[start:stop]`` that may be trained; ValueError if none."""
    steps = list(range(num_steps))[start:stop]
    if not steps:
        raise ValueError(f"train_timestep_start={start} and train_timestep_stop={stop} leave no step of the "
                         f"{num_steps} sampling steps to train; they follow Python slice rules over range({num_steps}).")
    return steps


def select_timesteps(num_samples: int, steps: Sequence[int], per_sample: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``per_sample`` distinct step indices out of ``steps`` for each sample, without replacement.

    Returns a (num_samples, per_sample) long tensor; each row is in random order.
    """
    if not 1 <= per_sample <= len(steps):
        raise ValueError(f"Cannot draw {per_sample} steps per sample out of {len(steps)} eligible steps.")
    pool = torch.as_tensor(list(steps), dtype=torch.long)
    return torch.stack([pool[torch.randperm(len(pool), generator=generator)[:per_sample]] for _ in range(num_samples)])


def normalized_step_weights(weights: Sequence[float] | None, num_steps: int, steps: Sequence[int]) -> torch.Tensor:
    """Per-step loss weights (num_steps,), scaled to mean 1 over the eligible ``steps`` (0 elsewhere).

    ``weights`` has one non-negative number per sampling step; None weighs every eligible step 1.
    Normalising keeps the learning rate's meaning when weights are introduced.
    """
    full = torch.ones(num_steps, dtype=torch.float32) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if full.shape != (num_steps,):
        raise ValueError(f"train_timestep_weights must have one weight per sampling step ({num_steps}), got {len(full)}.")
    if bool((full < 0).any()) or not bool(torch.isfinite(full).all()):
        raise ValueError(f"train_timestep_weights must be finite and >= 0, got {full.tolist()}.")
    index = torch.as_tensor(list(steps), dtype=torch.long)
    total = full[index].sum()
    if total <= 0:
        raise ValueError("train_timestep_weights are 0 on every trained step; give the trained steps positive weight.")
    out = torch.zeros(num_steps, dtype=torch.float32)
    out[index] = full[index] * len(index) / total
    return out


def refuse_untrainable_steps(zero_variance_steps: Sequence[int], train_steps: Sequence[int], num_steps: int) -> None:
    """Raise if a trained step is one the scheduler makes deterministic (no log-probability to train)."""
    untrainable = sorted(set(zero_variance_steps) & set(train_steps))
    if untrainable:
        trainable = [i for i in range(num_steps) if i not in set(zero_variance_steps)]
        if trainable and max(zero_variance_steps) < min(trainable):  # the untrainable steps come first
            fix = f"train_timestep_start={min(trainable)}"
        else:
            stop = untrainable[0] - num_steps if untrainable[0] < num_steps - 1 else -1
            fix = f"train_timestep_stop={stop}"
        raise ValueError(
            f"Denoising step(s) {untrainable} of the {num_steps}-step schedule carry no noise under this policy's "
            f"sampler, so they are deterministic and have no log-probability to train (DDIM: the schedule's last "
            f"timestep is 0, e.g. timestep_spacing='leading' with steps_offset=0, fixed by the scheduler's "
            f"steps_offset=1 as in the released SD checkpoints; the flow sampler 'cps': the step that lands at sigma "
            f"0; Wan 2.2 A14B: the steps of the expert this run does not train). Leave them out with {fix}.")
