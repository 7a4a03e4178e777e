"""loop-trl: reinforcement learning for text-to-image diffusion models with LOOP (leave-one-out PPO)."""

import logging as _logging


class _NoTorchvisionFallbackNotice(_logging.Filter):
    """transformers 5 warns, on import, that the CLIP and SigLIP image processors fall back to their PIL
    versions without torchvision; diffusers imports them for a safety checker loop-trl never builds, and the
    PIL versions are what loop-trl's rewards want. Drop exactly that notice so importing stays quiet."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())

from .advantages import PerPromptStatTracker, compute_advantages, leave_one_out_advantages
from .callbacks import ImageSamplesCallback, LOOPCallback
from .config import LOOPConfig
from .objective import clipped_surrogate
from .flow_sampling import flow_sde_step_with_logprob
from .pipelines import (DiffusionPolicy, LOOPFlux2KleinPipeline, LOOPFlux2Pipeline, LOOPFluxPipeline, LOOPQwenImagePipeline,
                        LOOPStableDiffusion3Pipeline, LOOPStableDiffusionPipeline,
                        LOOPStableDiffusionXLPipeline, LOOPWanPipeline, LOOPZImagePipeline, Trajectories, load_policy,
                        policy_class_for)
from .sampling import ddim_step_with_logprob
from .trainer import LOOPTrainer

__version__ = "0.1.0"

__all__ = [
    "DiffusionPolicy",
    "ImageSamplesCallback",
    "LOOPCallback",
    "LOOPConfig",
    "LOOPFlux2KleinPipeline",
    "LOOPFlux2Pipeline",
    "LOOPFluxPipeline",
    "LOOPQwenImagePipeline",
    "LOOPStableDiffusion3Pipeline",
    "LOOPStableDiffusionPipeline",
    "LOOPStableDiffusionXLPipeline",
    "LOOPWanPipeline",
    "LOOPZImagePipeline",
    "LOOPTrainer",
    "PerPromptStatTracker",
    "Trajectories",
    "clipped_surrogate",
    "compute_advantages",
    "ddim_step_with_logprob",
    "flow_sde_step_with_logprob",
    "leave_one_out_advantages",
    "load_policy",
    "policy_class_for",
]
