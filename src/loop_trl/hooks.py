"""Ready-made ``image_samples_hook`` callables for :class:`LOOPTrainer`."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["log_images_hook", "write_gif"]


def write_gif(frames: np.ndarray, path: str, fps: float = 8.0) -> str:
    """Write (F, H, W, 3) uint8 frames as a looping animated GIF with PIL (no video codec needed); returns ``path``."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def log_images_hook(max_images: int = 8, fps: float = 8.0) -> Callable[[list, int, Any], None]:
    """A hook that sends the first ``max_images`` samples of each epoch, captioned with prompt and
    reward, to the tracker (tensorboard or wandb). Without a tracker it does nothing.

    Videos (a video family's (N, F, 3, H, W) samples) go to wandb as animated GIFs at ``fps`` frames per
    second, and to other trackers as one image per video with its frames side by side.
    """

    def hook(prompt_image_data: list, global_step: int, tracker: Any) -> None:
        if tracker is None or not hasattr(tracker, "log_images"):
            return
        images, prompts, _, rewards, _ = prompt_image_data[0]
        images = torch.as_tensor(images[:max_images]).float().clamp(0, 1)
        arrays = (images.movedim(-3, -1).cpu().numpy() * 255).round().astype(np.uint8)  # (N, [F,] H, W, 3)
        captions = [f"{p} | {float(r):.3f}" for p, r in zip(prompts, rewards)]
        if getattr(tracker, "name", "") == "wandb":
            import wandb

            if arrays.ndim == 5:
                folder = tempfile.mkdtemp(prefix="loop-trl-videos-")
                media = [wandb.Video(write_gif(a, os.path.join(folder, f"{i}.gif"), fps), caption=c, format="gif")
                         for i, (a, c) in enumerate(zip(arrays, captions))]
            else:
                media = [wandb.Image(a, caption=c) for a, c in zip(arrays, captions)]
            tracker.log({"samples": media}, step=global_step)
            return
        if arrays.ndim == 5:  # (N, F, H, W, 3) -> (N, H, F * W, 3): each video's frames in a row
            arrays = np.concatenate(list(arrays.transpose(1, 0, 2, 3, 4)), axis=2)
        tracker.log_images({"samples": arrays}, step=global_step, dataformats="NHWC")

    return hook
