"""Reward functions with the ``reward_function(images, prompts, prompt_metadata) -> (rewards, metadata)`` signature.

``images`` is a (B, 3, H, W) float tensor in [0, 1]; ``rewards`` a (B,) tensor. Several rewards
at once: pass the trainer a list or ``{name: reward}`` dict (see :class:`MultiReward`). Videos
(the Wan family) go to rewards with ``accepts_video = True``; :class:`PerFrameReward` makes one
out of any image reward.
"""

from .aesthetic import AestheticMLP, AestheticReward, AestheticScorer
from .base import MultiReward
from .clip import CLIPScore, HPSv2, PickScore
from .image_reward import ImageReward
from .jpeg import JpegCompressibility, JpegIncompressibility
from .ocr import OCRReward
from .remote import RemoteReward
from .video import PerFrameReward

__all__ = ["AestheticMLP", "AestheticReward", "AestheticScorer", "CLIPScore", "HPSv2", "ImageReward", "JpegCompressibility",
           "JpegIncompressibility", "MultiReward", "OCRReward", "PerFrameReward", "PickScore",
           "RemoteReward"]
