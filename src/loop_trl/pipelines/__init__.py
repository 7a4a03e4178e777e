"""Model families behind the :class:`DiffusionPolicy` interface, and :func:`load_policy` to pick one."""

from .auto import POLICY_CLASSES, load_policy, policy_class_for
from .base import DiffusionPolicy, Trajectories
from .diffusers_policy import DiffusersPolicy
from .flow_matching import FlowMatchingPolicy
from .flux import LOOPFluxPipeline
from .flux2 import LOOPFlux2KleinPipeline, LOOPFlux2Pipeline
from .qwen_image import LOOPQwenImagePipeline
from .stable_diffusion import LOOPStableDiffusionPipeline
from .stable_diffusion_3 import LOOPStableDiffusion3Pipeline
from .stable_diffusion_xl import LOOPStableDiffusionXLPipeline
from .wan import LOOPWanPipeline
from .z_image import LOOPZImagePipeline

__all__ = [
    "DiffusersPolicy",
    "DiffusionPolicy",
    "FlowMatchingPolicy",
    "LOOPFlux2KleinPipeline",
    "LOOPFlux2Pipeline",
    "LOOPFluxPipeline",
    "LOOPQwenImagePipeline",
    "LOOPStableDiffusion3Pipeline",
    "LOOPStableDiffusionPipeline",
    "LOOPStableDiffusionXLPipeline",
    "LOOPWanPipeline",
    "LOOPZImagePipeline",
    "POLICY_CLASSES",
    "Trajectories",
    "load_policy",
    "policy_class_for",
]
