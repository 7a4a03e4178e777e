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
    policy = LOOPStableDiffusionPipeline.from_pretrained(MODEL_DIR, **kwargs)
    # what a model card tells users to load: the model ships inside the package, not at this machine's path
    policy.base_model_name = "loop-trl shapes testbed (shipped in the loop-trl package)"
    policy.base_model_loader = ("# pip install loop-trl  (the testbed's base model ships inside the package)\n"
                                "from loop_trl.testbeds.shapes import load_pipeline\n"
                                "pipe = load_pipeline()")
    return policy
