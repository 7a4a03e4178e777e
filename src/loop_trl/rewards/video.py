"""Rewards for videos: an image reward averaged over a video's frames.

A video reward is a reward with ``accepts_video = True``: it gets ``images`` as (B, F, 3, H, W) in [0, 1]
(the frames of B videos) and returns B numbers. Native video rewards (a video-language model, a motion
score) implement that directly; :class:`PerFrameReward` makes one out of any image reward.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .base import accepts_video, as_reward_tensor, is_thread_safe, reward_name, to_image_tensor

__all__ = ["PerFrameReward"]


class PerFrameReward:
    """An image reward applied to the frames of each video and averaged: ``r(video) = mean_f r(frame_f)``.

    The frames of all B videos are scored in one call of the image reward (B x F' images, each frame's
    prompt its video's), so the image reward's own batching applies. A frame the image reward cannot
    score (NaN) makes its video's reward NaN, which the trainer treats as a reward fault.

    Args:
        reward: an image reward, ``reward(images (N, 3, H, W), prompts, prompt_metadata) -> (rewards, metadata)``.
        frame_stride: score every ``frame_stride``-th frame (1: all of them; larger strides save reward compute
            on long videos). The first frame is always scored.

    The metadata holds the per-frame scores (``"frame_rewards"``, (B, F')) and the image reward's own metadata
    (``"frames"``).
    """

    accepts_video = True

    def __init__(self, reward: Callable[[Any, Sequence[str], Sequence[Any]], tuple[Any, Any]], frame_stride: int = 1):
        if not callable(reward):
            raise TypeError("PerFrameReward wraps an image reward: reward(images, prompts, prompt_metadata).")
        if accepts_video(reward):
            raise ValueError(f"{reward_name(reward)} already scores videos; pass it to the trainer as it is.")
        if int(frame_stride) != frame_stride or frame_stride < 1:
            raise ValueError(f"frame_stride must be a positive integer, got {frame_stride!r}.")
        self.reward, self.frame_stride = reward, int(frame_stride)
        self.thread_safe = is_thread_safe(reward)
        self.__name__ = f"per-frame {reward_name(reward)}"

    def __call__(self, videos: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        videos = torch.as_tensor(videos) if not isinstance(videos, torch.Tensor) else videos
        if videos.ndim != 5:
            raise ValueError(f"PerFrameReward scores videos, (B, F, 3, H, W); got a tensor of shape {tuple(videos.shape)}. "
                             "Pass images to the image reward itself.")
        frames = videos[:, ::self.frame_stride]  # (B, F', 3, H, W)
        batch, count = frames.shape[:2]
        prompt_metadata = [None] * batch if prompt_metadata is None else prompt_metadata
        scores, metadata = self.reward(to_image_tensor(frames.flatten(0, 1)), [p for p in prompts for _ in range(count)],
                                       [m for m in prompt_metadata for _ in range(count)])
        per_frame = as_reward_tensor(scores, [None] * (batch * count)).view(batch, count)
        return per_frame.mean(dim=1), {"frame_rewards": per_frame, "frames": metadata}
