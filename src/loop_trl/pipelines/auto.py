"""One way in for every family: :func:`load_policy` picks the policy from a checkpoint's ``model_index.json``."""

from __future__ import annotations

import json
import os

from .diffusers_policy import DiffusersPolicy
from .flux import LOOPFluxPipeline
from .flux2 import LOOPFlux2KleinPipeline, LOOPFlux2Pipeline
from .qwen_image import LOOPQwenImagePipeline
from .stable_diffusion import LOOPStableDiffusionPipeline
from .stable_diffusion_3 import LOOPStableDiffusion3Pipeline
from .stable_diffusion_xl import LOOPStableDiffusionXLPipeline
from .wan import LOOPWanPipeline
from .z_image import LOOPZImagePipeline

__all__ = ["POLICY_CLASSES", "load_policy", "policy_class_for"]

#: diffusers pipeline class name -> the loop-trl policy that trains it
POLICY_CLASSES: dict[str, type[DiffusersPolicy]] = {
    cls.pipeline_class.__name__: cls
    for cls in (LOOPStableDiffusionPipeline, LOOPStableDiffusionXLPipeline, LOOPStableDiffusion3Pipeline, LOOPFluxPipeline,
                LOOPFlux2KleinPipeline, LOOPFlux2Pipeline, LOOPQwenImagePipeline, LOOPZImagePipeline,
                LOOPWanPipeline)
}


def _model_index(name_or_path: str, revision: str | None) -> dict:
    path = str(name_or_path)
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise ValueError(f"{path!r} has no model_index.json: it is not a diffusers pipeline folder.")
    else:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(path, "model_index.json", revision=revision)
    with open(index) as f:
        return json.load(f)


def policy_class_for(name_or_path: str, revision: str | None = None) -> type[DiffusersPolicy]:
    """The policy class for a pipeline folder or Hub id, read from its ``model_index.json``."""
    class_name = _model_index(name_or_path, revision).get("_class_name")
    if class_name not in POLICY_CLASSES:
        raise ValueError(f"{name_or_path!r} is a {class_name}; loop-trl trains {', '.join(POLICY_CLASSES)}.")
    return POLICY_CLASSES[class_name]


def load_policy(name_or_path: str, *, revision: str | None = None, **kwargs) -> DiffusersPolicy:
    """Load any supported pipeline (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, FLUX.2 [dev] and [klein], Qwen-Image, Z-Image, Wan
    text-to-video) as the right LOOP policy.

    ``kwargs`` go to the policy's ``from_pretrained`` (``torch_dtype``, ``use_lora``, ``lora_rank``,
    ``lora_alpha``, ``lora_target_modules``, ``adapter``, ``lora_seed``, ``resolution``, ...).
    """
    return policy_class_for(name_or_path, revision).from_pretrained(name_or_path, revision=revision, **kwargs)
