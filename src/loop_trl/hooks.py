"""Ready-made ``image_samples_hook`` callables for :class:`LOOPTrainer`."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

__all__ = ["log_images_hook"]


def log_images_hook(max_images: int = 8) -> Callable[[list, int, Any], None]:
    """A hook that sends the first ``max_images`` samples of each epoch, captioned with prompt and
    reward, to the tracker (tensorboard or wandb). Without a tracker it does nothing."""

    def hook(prompt_image_data: list, global_step: int, tracker: Any) -> None:
        if tracker is None or not hasattr(tracker, "log_images"):
            return
        images, prompts, _, rewards, _ = prompt_image_data[0]
        images = torch.as_tensor(images[:max_images]).float().clamp(0, 1)
        arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # (N, H, W, 3)
        if getattr(tracker, "name", "") == "wandb":
            import wandb

            captions = [f"{p} | {float(r):.3f}" for p, r in zip(prompts, rewards)]
            tracker.log({"samples": [wandb.Image(a, caption=c) for a, c in zip(arrays, captions)]}, step=global_step)
        else:
            tracker.log_images({"samples": arrays}, step=global_step, dataformats="NHWC")

    return hook
