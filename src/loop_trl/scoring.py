"""From images to advantages: calling the reward, vetting what it returns, the fault policy, per-reward
metrics, and the advantages computed over every process's prompt groups."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .advantages import PerPromptStatTracker, compute_advantages, frac_reward_zero_std, group_reward_std
from .config import LOOPConfig
from .rewards.base import MultiReward, accepts_video, as_reward_tensor, component_metrics, is_thread_safe, reward_name

__all__ = ["Advantages", "RewardScorer", "check_reward_input", "advantages_across_processes", "reward_component_metrics"]

logger = logging.getLogger(__name__)  # every process logs its own reward faults

RewardFunction = Callable[[torch.Tensor, Sequence[str], Sequence[Any]], tuple[Any, Any]]


def check_reward_input(reward_function: RewardFunction, video: bool) -> None:
    """Raise TypeError when the reward cannot take what the policy samples (videos or images)."""
    if video and not accepts_video(reward_function):
        raise TypeError(f"The policy samples videos, (B, F, 3, H, W), and reward_function {reward_name(reward_function)} "
                        "scores images. Wrap it as loop_trl.rewards.PerFrameReward(reward) to average it over each "
                        "video's frames, or give a video reward (one with accepts_video = True).")
    if not video and accepts_video(reward_function):
        raise TypeError(f"reward_function {reward_name(reward_function)} scores videos, and the policy samples images; "
                        "pass the image reward itself (without PerFrameReward).")


class RewardScorer:
    """Calls ``reward_function`` on a sampling batch and applies the config's fault policy.

    Worker threads (``async_reward_computation``) call the reward one at a time unless it says it is
    thread-safe (``thread_safe = True``): a Hugging Face fast tokenizer, for one, raises "Already
    borrowed" when two threads use it at once.
    """

    def __init__(self, reward_function: RewardFunction, config: LOOPConfig):
        self.reward_function = reward_function
        self.k = config.num_samples_per_prompt
        self.skip = config.reward_error == "skip_group"
        self.lock = contextlib.nullcontext() if is_thread_safe(reward_function) else threading.Lock()

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list, epoch: int,
                 batch: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Call the reward function and vet its output.

        Returns rewards (B,) with every dropped sample set to 0, the reward metadata, and a (B,)
        mask of the samples kept. A fault either raises (``reward_error="raise"``) or drops the
        prompt groups it touches (``"skip_group"``): all of them when the call itself fails.
        """
        try:
            with self.lock:
                output = self.reward_function(images, prompts, metadata)
            if not (isinstance(output, tuple) and len(output) == 2):
                raise TypeError(f"reward_function must return (rewards, reward_metadata), got {type(output).__name__}.")
            values = as_reward_tensor(output[0], prompts)
        except Exception as error:
            where = f"epoch {epoch}, sampling batch {batch}, prompts {sorted(set(prompts))}"
            if not self.skip:
                raise type(error)(f"{error} [{where}]") if type(error) in (TypeError, ValueError) else \
                    RuntimeError(f"reward_function raised {type(error).__name__}: {error} [{where}]") from error
            logger.warning(f"reward_function failed ({type(error).__name__}: {error}) at {where}; "
                           f"dropping the batch's {len(prompts) // self.k} prompt groups.")
            return torch.zeros(len(prompts), dtype=torch.float64), None, torch.zeros(len(prompts), dtype=torch.bool)
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            message = (f"reward_function returned {values[i].item()} for sample {i} of sampling batch {batch} "
                       f"(epoch {epoch}, prompt {prompts[i]!r}); rewards must be finite "
                       f"({int((~finite).sum())} non-finite in this batch).")
            if not self.skip:
                raise ValueError(message)
            logger.warning(message + " Dropping the affected prompt groups.")
        valid = finite.view(-1, self.k).all(dim=1).repeat_interleave(self.k)  # a group is kept only if all K are finite
        return torch.where(valid, values, torch.zeros_like(values)), output[1], valid


def reward_component_metrics(reward_function: RewardFunction, prompt_image_data: list,
                             accelerator: Accelerator) -> dict[str, float]:
    """With several rewards: each component's ``rewards/{name}/mean`` and ``/std`` over every process's
    images (NaN skipped); ``{}`` for a single reward."""
    if not isinstance(reward_function, MultiReward):
        return {}
    names = list(reward_function.rewards)
    rows = []
    for images, _, _, _, reward_metadata in prompt_image_data:
        if isinstance(reward_metadata, dict) and "rewards" in reward_metadata:
            rows.append(torch.stack([torch.as_tensor(reward_metadata["rewards"][n], dtype=torch.float32) for n in names], 1))
        else:  # the batch's reward call failed (skip_group): nothing scored
            rows.append(torch.full((len(images), len(names)), float("nan")))
    matrix = accelerator.gather(torch.cat(rows).to(accelerator.device)).cpu()
    return component_metrics({name: matrix[:, i] for i, name in enumerate(names)})


@dataclass
class Advantages:
    """This process's share of an epoch's advantages (B,) and loss weights (B,), and the epoch's
    reward metrics over every process."""

    advantages: torch.Tensor
    sample_weights: torch.Tensor
    metrics: dict[str, float]


def advantages_across_processes(accelerator: Accelerator, config: LOOPConfig, rewards: torch.Tensor,
                                group_ids: torch.Tensor, prompts: Sequence[str], valid: torch.Tensor,
                                tracker: PerPromptStatTracker) -> Advantages:
    """Gather rewards with their group ids from every process, compute advantages over the kept
    samples (dropped ones get 0), and return this process's share with the epoch's metrics.

    Dropped samples weigh 0 (and are not scored in the PPO passes); the kept ones are weighed up
    by 1 / (kept fraction), so the step is as if the dropped were never sampled. Too many dropped
    groups (``reward_max_skip_fraction``) stop the run.
    """
    device = accelerator.device
    all_rewards = accelerator.gather(rewards.to(device)).cpu()
    all_groups = accelerator.gather(group_ids.to(device)).cpu()
    all_valid = accelerator.gather(valid.to(device)).cpu().bool()
    all_prompts = gather_object(list(prompts)) if accelerator.num_processes > 1 else prompts
    num_groups = len(torch.unique(all_groups))
    skipped = num_groups - len(torch.unique(all_groups[all_valid]))
    if skipped / num_groups > config.reward_max_skip_fraction or not bool(all_valid.any()):
        raise RuntimeError(f"The reward failed for {skipped} of {num_groups} prompt groups this epoch, more than "
                           f"reward_max_skip_fraction={config.reward_max_skip_fraction}; stopping. "
                           "The last checkpoint is intact; fix the reward and resume with resume_from='latest'.")
    kept_rewards, kept_groups = all_rewards[all_valid], all_groups[all_valid]
    advantages = torch.zeros_like(all_rewards)
    advantages[all_valid] = compute_advantages(
        config.advantage_estimator, kept_rewards, kept_groups,
        prompts=[p for p, keep in zip(all_prompts, all_valid.tolist()) if keep], tracker=tracker)
    n = len(rewards)
    mine = slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)
    keep = all_valid.double() * (len(all_valid) / all_valid.sum().double())
    metrics = {"train/reward_mean": kept_rewards.mean().item(),
               "train/reward_std": kept_rewards.std(unbiased=False).item(),
               "train/reward_group_std": group_reward_std(kept_rewards, kept_groups).item(),
               "train/frac_reward_zero_std": frac_reward_zero_std(kept_rewards, kept_groups),
               "train/advantage_abs_mean": advantages[all_valid].abs().mean().item(),
               "train/skipped_groups": skipped}
    if config.advantage_estimator == "per_prompt_tracker":  # did the per-prompt statistics engage?
        metrics["train/tracker_engaged_fraction"] = tracker.last_tracked_fraction
    return Advantages(advantages[mine].to(device), keep[mine].float().to(device), metrics)
