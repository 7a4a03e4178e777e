"""Reward functions with the ``reward_function(images, prompts, prompt_metadata) -> (rewards, metadata)`` signature.

``images`` is a (B, 3, H, W) float tensor in [0, 1]; ``rewards`` a (B,) tensor.
"""

from .aesthetic import AestheticMLP, AestheticReward, AestheticScorer
from .jpeg import JpegCompressibility, JpegIncompressibility

__all__ = ["AestheticMLP", "AestheticReward", "AestheticScorer", "JpegCompressibility", "JpegIncompressibility"]
