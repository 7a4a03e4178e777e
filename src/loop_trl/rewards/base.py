"""What rewards share: the image conversions, CLIP preprocessing, and several rewards as one.

A reward is any callable ``reward_function(images, prompts, prompt_metadata) -> (rewards,
reward_metadata)`` with ``images`` a (B, 3, H, W) float tensor in [0, 1] (or PIL images) and
``rewards`` B numbers. A reward may return NaN for an image it cannot score.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MultiReward", "clip_preprocess", "component_metrics", "load_state_dict_file", "reward_name", "score_in_batches",
           "to_image_tensor"]

RewardFunction = Callable[[Any, Sequence[str], Sequence[Any]], tuple[Any, Any]]


def to_image_tensor(images: Any) -> torch.Tensor:
    """Images as a (B, 3, H, W) fp32 tensor in [0, 1], from such a tensor or array, or from PIL images."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).float()
    from .jpeg import to_pil_images

    arrays = [np.asarray(image, dtype=np.float32) / 255 for image in to_pil_images(images)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def clip_preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP's image preprocessing on tensors: short side to ``size`` (bicubic, antialiased), centre crop, normalise."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    images = F.interpolate(images, size=resized, mode="bicubic", align_corners=False, antialias=True)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    images = images[..., top:top + size, left:left + size].clamp(0, 1)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def score_in_batches(images: Any, prompts: Sequence[str], batch_size: int,
                     score: Callable[[torch.Tensor, list[str]], torch.Tensor]) -> torch.Tensor:
    """``score(images, prompts)`` over consecutive batches of (image, prompt) pairs, concatenated on the CPU as fp32.

    ``images`` is anything :func:`to_image_tensor` takes; there must be one prompt per image.
    """
    images = to_image_tensor(images)
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images for {len(prompts)} prompts; the reward scores each image with its prompt.")
    return torch.cat([score(images[start:start + batch_size], list(prompts[start:start + batch_size])).float().cpu()
                      for start in range(0, len(prompts), batch_size)])


def load_state_dict_file(checkpoint: str) -> dict[str, torch.Tensor]:
    """The state dict in a torch checkpoint: a local file, or ``"<repo id>/<file name>"`` on the Hub.

    Read with ``torch.load(weights_only=True)``, so nothing in the file is executed; a checkpoint
    that holds more than tensors and plain containers is refused with a ValueError. A top-level
    ``state_dict`` entry (training checkpoints) is unwrapped.
    """
    path = checkpoint
    if not os.path.isfile(path):
        repo_id, _, filename = checkpoint.rpartition("/")
        if not repo_id:
            raise ValueError(f"checkpoint {checkpoint!r} is neither a file nor '<repo id>/<file name>'.")
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, filename)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an UnpicklingError names the object that is not plain data
        raise ValueError(f"{checkpoint!r} is not a plain state dict (torch.load(weights_only=True) refused it: "
                         f"{error}); it is not loaded.") from error
    return state.get("state_dict", state)


def reward_name(reward: Callable) -> str:
    """A reward's display name: its ``__name__``, or its class name."""
    return getattr(reward, "__name__", type(reward).__name__)


class MultiReward:
    """Several rewards as one ``reward_function``: the weighted sum of their scores.

    ``total_i = nansum_r(w_r * reward_r(image_i))``: a component that returns NaN for an image it
    cannot score is left out of that image's sum, as TRL's GRPO does; an image that no component
    scores gets NaN, which the trainer treats as a reward fault (``reward_error``). The metadata
    holds each component's scores under ``"rewards"`` (``{name: (B,) tensor}``), which the trainer
    logs as ``rewards/{name}/mean`` and ``/std``, and each component's own metadata under
    ``"components"``.

    Args:
        rewards: a list of rewards, or a ``{name: reward}`` dict (names then come from the keys).
        weights: one weight per reward (TRL GRPO's ``reward_weights``); default 1 each.
    """

    def __init__(self, rewards: Sequence[RewardFunction] | Mapping[str, RewardFunction],
                 weights: Sequence[float] | None = None):
        if isinstance(rewards, Mapping):
            named = dict(rewards)
        else:
            named = {}
            for reward in rewards:
                name = reward_name(reward)
                named[name if name not in named else f"{name}_{len(named)}"] = reward
        if not named:
            raise ValueError("reward_function is an empty list; give at least one reward.")
        for name, reward in named.items():
            if not callable(reward):
                raise TypeError(f"reward {name!r} is not callable: each reward is reward(images, prompts, prompt_metadata).")
        weights = [1.0] * len(named) if weights is None else [float(w) for w in weights]
        if len(weights) != len(named):
            raise ValueError(f"reward_weights has {len(weights)} weights for {len(named)} rewards ({', '.join(named)}); "
                             "give one weight per reward.")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights must be finite numbers, got {weights}.")
        self.rewards, self.weights = named, torch.tensor(weights, dtype=torch.float64)
        self.__name__ = " + ".join(f"{w:g} x {n}" for n, w in zip(named, weights))

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        columns, extra = [], {}
        for name, reward in self.rewards.items():
            scores, metadata = reward(images, prompts, prompt_metadata)
            scores = torch.as_tensor(np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores,
                                                dtype=np.float64)).reshape(-1)
            if len(scores) != len(prompts):
                raise ValueError(f"reward {name!r} returned {len(scores)} scores for {len(prompts)} images.")
            columns.append(scores)
            extra[name] = metadata
        matrix = torch.stack(columns, dim=1)  # (B, R)
        total = torch.nansum(matrix * self.weights, dim=1)
        total[torch.isnan(matrix).all(dim=1)] = float("nan")
        return total, {"rewards": {name: matrix[:, i] for i, name in enumerate(self.rewards)}, "components": extra}


def component_metrics(components: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``rewards/{name}/mean``, ``/std`` (over the images it scored) and ``/nan_count`` of each component."""
    metrics = {}
    for name, values in components.items():
        values = torch.as_tensor(values, dtype=torch.float64)
        scored = values[~torch.isnan(values)]
        metrics[f"rewards/{name}/mean"] = scored.mean().item() if len(scored) else float("nan")
        metrics[f"rewards/{name}/std"] = scored.std(unbiased=False).item() if len(scored) else float("nan")
        metrics[f"rewards/{name}/nan_count"] = int(len(values) - len(scored))
    return metrics
