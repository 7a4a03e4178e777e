"""The shipped base model of the shapes testbed (trained by ``train_base.py``)."""

from __future__ import annotations

import os

from diffusers import StableDiffusionPipeline

from ...pipelines import LOOPStableDiffusionPipeline

__all__ = ["MODEL_DIR", "load_pipeline", "load_policy"]

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")


def _check() -> None:
    if not os.path.isfile(os.path.join(MODEL_DIR, "model_index.json")):
        raise FileNotFoundError(f"No shapes base model in {MODEL_DIR}; train one with "
                                f"python -m loop_trl.testbeds.shapes.train_base --output_dir {MODEL_DIR}")


def load_pipeline(**kwargs) -> StableDiffusionPipeline:
    """The base model as a plain diffusers ``StableDiffusionPipeline`` (offline, from the package)."""
    _check()
    return StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None, requires_safety_checker=False, **kwargs)


def load_policy(**kwargs) -> LOOPStableDiffusionPipeline:
    """The base model wrapped for LOOP; ``kwargs`` go to ``LOOPStableDiffusionPipeline`` (``lora_rank``, ...)."""
    _check()
    return LOOPStableDiffusionPipeline.from_pretrained(MODEL_DIR, **kwargs)
