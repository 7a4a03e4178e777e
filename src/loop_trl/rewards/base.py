"""What rewards share: the image conversions, CLIP preprocessing, and several rewards as one.

A reward is any callable ``reward_function(images, prompts, prompt_metadata) -> (rewards,
reward_metadata)`` with ``images`` a (B, 3, H, W) float tensor in [0, 1] (or PIL images) and
``rewards`` B numbers. A reward may return NaN for an image it cannot score. A reward that sets
``accepts_video = True`` scores videos instead: ``images`` is then (B, F, 3, H, W) (the video families).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MultiReward", "accepts_video", "as_reward_tensor", "clip_preprocess", "component_metrics", "is_thread_safe",
           "letterbox_preprocess", "load_state_dict_file", "quantize_8bit", "reward_name", "score_in_batches",
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


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] rounded to the 256 levels of an 8-bit image, as diffusers' ``numpy_to_pil`` (and so a
    saved PNG) has them: what the reward models' authors score."""
    return (images.clamp(0, 1) * 255).round() / 255


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """OpenAI CLIP's image transform, as ``clip.load`` builds it and its users apply it to 8-bit PIL images.

    ImageReward, the LAION aesthetic predictor and CLIPScore (Hessel et al.) all score with it:
    ``Resize(size, BICUBIC)`` on the PIL image (the short side to ``size``, the long side to
    ``int(size * long / short)``: truncated, torchvision's rule), ``CenterCrop(size)`` (offsets
    rounded), ``ToTensor``, ``Normalize(mean, std)``. Here too on 8-bit PIL images, so the resize is
    PIL's, with its rounding to 8 bits. Returns (B, 3, size, size) on the images' device.
    """
    from PIL import Image

    pixels = (quantize_8bit(images.float()) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for array in pixels:
        image = Image.fromarray(array)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = size, int(size * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize((new_width, new_height), Image.BICUBIC)
        top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
        out.append(np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255)
    return _normalize(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device), mean, std)


def letterbox_preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """OpenCLIP's ``ResizeMaxSize`` transform, as HPSv2's ``img_score.py`` scores with it (``light_augmentation``).

    The 8-bit image as floats (``ToTensor``), the longest side to ``size`` (bicubic, antialiased, the
    new sides ``round(side * size / longest)``), black padding to a square (half on each side, the odd
    pixel right or bottom), ``Normalize(mean, std)``; no clamping after the resize. Nothing is cropped:
    a non-square image keeps its whole content. (OpenCLIP leaves an image whose longest side already
    is ``size`` unpadded, which no ViT takes when it is not square; such an image is padded here.)
    """
    images = quantize_8bit(images.float())
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_height, new_width = round(height * scale), round(width * scale)
        images = F.interpolate(images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True)
        height, width = new_height, new_width
    pad_h, pad_w = size - height, size - width
    images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return _normalize(images, mean, std)


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


def as_reward_tensor(rewards: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Check the type and length of what a reward_function returned; a float64 (B,) tensor (may hold NaN/inf)."""
    if rewards is None or isinstance(rewards, (str, bytes, int, float)):
        raise TypeError(f"reward_function must return a sequence of numbers as its first output (one per image); "
                        f"got {type(rewards).__name__}.")
    try:
        values = torch.as_tensor(np.asarray(rewards.detach().cpu() if torch.is_tensor(rewards) else rewards, dtype=np.float64))
    except (TypeError, ValueError) as error:
        raise TypeError(f"reward_function must return a sequence of numbers as its first output; got "
                        f"{type(rewards).__name__}: {error}") from error
    values = values.reshape(-1) if values.ndim == 2 and values.shape[-1] == 1 else values
    if values.ndim != 1 or len(values) != len(prompts):
        raise ValueError(f"reward_function returned {tuple(values.shape)} rewards for {len(prompts)} images; "
                         f"it must return one number per image.")
    return values


def accepts_video(reward: Callable) -> bool:
    """Whether ``reward`` scores videos, (B, F, 3, H, W) in [0, 1]: only when it says so (``accepts_video = True``,
    as :class:`~loop_trl.rewards.PerFrameReward` does); other rewards score images."""
    return bool(getattr(reward, "accepts_video", False))


def is_thread_safe(reward: Callable) -> bool:
    """Whether several threads may call ``reward`` at once: only when it says so (``thread_safe = True``)."""
    return bool(getattr(reward, "thread_safe", False))


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
        video = {name: accepts_video(reward) for name, reward in named.items()}
        if len(set(video.values())) > 1:
            raise ValueError(f"rewards {[n for n, v in video.items() if v]} score videos and {[n for n, v in video.items() if not v]} "
                             "images; wrap the image rewards in PerFrameReward so that all of them score videos.")
        self.rewards, self.weights = named, torch.tensor(weights, dtype=torch.float64)
        self.thread_safe = all(is_thread_safe(reward) for reward in named.values())
        self.accepts_video = all(video.values())
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
