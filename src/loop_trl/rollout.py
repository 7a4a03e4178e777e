"""Rollout: an epoch's sampling batches of whole prompt groups, their group ids, and their scores
(in worker threads while the next batch samples, with ``async_reward_computation``)."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .config import LOOPConfig
from .engine import clock, seeded_generator
from .pipelines.base import DiffusionPolicy, Trajectories
from .prompts import PromptSource
from .scoring import RewardScorer

__all__ = ["Rollout", "RolloutCollector"]


@dataclass
class Rollout:
    """One epoch's samples on this process.

    Attributes:
        trajectories: the B sampled trajectories, K adjacent ones per prompt, with globally unique group ids.
        rewards: (B,) float32 rewards, 0 where a sample was dropped.
        valid: (B,) bool, the samples kept by the fault policy.
        prompt_image_data: one ``[images, prompts, prompt_metadata, rewards, reward_metadata]`` per
            sampling batch (what TRL's DDPO ``image_samples_hook`` receives).
    """

    trajectories: Trajectories
    rewards: torch.Tensor
    valid: torch.Tensor
    prompt_image_data: list


class RolloutCollector:
    """Samples ``sample_num_batches_per_epoch`` batches of ``sample_batch_size / K`` prompts, each K times,
    and scores them. With ``async_reward_computation`` each batch is scored in a worker thread while
    the next one samples; the results, and what a reward fault does, are the same as scoring in turn."""

    def __init__(self, policy: DiffusionPolicy, prompts: PromptSource, scorer: RewardScorer, config: LOOPConfig,
                 accelerator: Accelerator, stochastic_steps: Sequence[int] | None):
        self.policy, self.prompts, self.scorer = policy, prompts, scorer
        self.config, self.accelerator = config, accelerator
        self.stochastic_steps = stochastic_steps
        self.pool = (ThreadPoolExecutor(config.max_workers, thread_name_prefix="loop-trl-reward")
                     if config.async_reward_computation else None)

    def collect(self, epoch: int, timers: defaultdict[str, float] | None = None) -> Rollout:
        """Sample and score the epoch's batches; adds seconds spent to ``timers['sampling']`` and
        ``timers['reward']`` (the scoring time that sampling did not hide)."""
        config, accelerator = self.config, self.accelerator
        timers = timers if timers is not None else defaultdict(float)
        k = config.num_samples_per_prompt
        prompts_per_batch = config.sample_batch_size // k
        generator = seeded_generator(config.seed, epoch, accelerator.process_index)
        sampled, scores = [], []  # (trajectories, prompts, metadata) and their scores (or futures) per batch
        for batch in tqdm(range(config.sample_num_batches_per_epoch), desc=f"epoch {epoch}: sampling", leave=False,
                          disable=not accelerator.is_local_main_process):
            prompts, metadata = self.prompts.draw(prompts_per_batch, epoch, batch, config.sample_num_batches_per_epoch)
            prompts = [p for p in prompts for _ in range(k)]  # K adjacent copies of each prompt
            metadata = [m for m in metadata for _ in range(k)]
            started = clock(accelerator)
            traj = self.policy.sample(prompts, num_steps=config.sample_num_steps,
                                      guidance_scale=config.sample_guidance_scale, eta=config.sample_eta,
                                      generator=generator, negative_prompt=config.negative_prompts,
                                      stochastic_steps=self.stochastic_steps)
            # globally unique group ids: one per (epoch, batch, process, prompt)
            slot = (epoch * config.sample_num_batches_per_epoch + batch) * accelerator.num_processes + accelerator.process_index
            traj.group_ids = slot * prompts_per_batch + torch.arange(len(prompts), device=traj.group_ids.device) // k
            if config.offload_trajectories:
                traj = traj.to("cpu")
            done = clock(accelerator)
            timers["sampling"] += done - started
            sampled.append((traj, prompts, metadata))
            if self.pool is not None:
                scores.append(self.pool.submit(self.scorer, traj.images, prompts, metadata, epoch, batch))
            else:
                scores.append(self.scorer(traj.images, prompts, metadata, epoch, batch))
                timers["reward"] += clock(accelerator) - done
        waiting = clock(accelerator)
        scores = [score.result() if isinstance(score, Future) else score for score in scores]
        if self.pool is not None:
            timers["reward"] += clock(accelerator) - waiting
        prompt_image_data = [[traj.images, prompts, metadata, rewards, reward_metadata]
                             for (traj, prompts, metadata), (rewards, reward_metadata, _) in zip(sampled, scores)]
        trajectories = Trajectories.cat([traj for traj, _, _ in sampled])
        check_log_probs(trajectories, epoch)
        rewards = torch.cat([torch.as_tensor(batch[3]) for batch in prompt_image_data]).float()
        valid = torch.cat([batch_valid for _, _, batch_valid in scores])
        return Rollout(trajectories, rewards, valid, prompt_image_data)


def check_log_probs(trajectories: Trajectories, epoch: int) -> None:
    """Refuse a rollout with a non-finite sampled log-probability: training on it would be off-policy garbage."""
    if not bool(torch.isfinite(trajectories.log_probs).all()):
        bad = (~torch.isfinite(trajectories.log_probs)).nonzero()[0].tolist()
        raise RuntimeError(f"Sampling recorded a non-finite log-probability (sample {bad[0]}, step {bad[1]} of epoch "
                           f"{epoch}); training on it would be off-policy garbage. Check the scheduler config and "
                           "mixed_precision (try 'no' or 'bf16'); the last checkpoint is intact.")
