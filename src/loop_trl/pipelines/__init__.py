"""Model families behind the :class:`DiffusionPolicy` interface."""

from .base import DiffusionPolicy, Trajectories
from .stable_diffusion import LOOPStableDiffusionPipeline

__all__ = ["DiffusionPolicy", "LOOPStableDiffusionPipeline", "Trajectories"]
