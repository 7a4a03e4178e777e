"""The shipped shapes base model: loads offline, is the trained model, and LOOP improves it."""

import os
import shutil
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline

from loop_trl import LOOPConfig, LOOPTrainer
from loop_trl.testbeds.shapes import (MODEL_DIR, ShapesReward, all_prompts, evaluate, load_pipeline, load_policy,
                                      train_eval_prompts)

# Measured by `python -m loop_trl.testbeds.shapes.report` (docs/shapes.md): SINGLE_MEASURED on
# 8 images of each of the 18 single-object prompts at 20 DDIM steps, guidance 5. The test samples 4
# per prompt (72 images; at 0.99 one standard error is about 0.012, far inside the tolerance).
SINGLE_MEASURED = 0.99
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
    result = evaluate(load_policy(), all_prompts()["single"], n_per_prompt=4, seed=0, num_steps=20, guidance_scale=5.0)
    assert result["single"] >= SINGLE_MEASURED - TOLERANCE, result


# The training of `python examples/train_shapes.py` with its defaults (seed 0, all 40 epochs): LOOP on
# 48 binding training prompts, scored by the trainer's fixed-noise evaluation of those prompts
# (4 images each, eval_seed 1) before and after, under the training sampler and under the deployed one
# (DDIM eta 0 from the same noise, which the model card's plain pipeline reproduces). With the defaults
# of 2026-12-07 (steps 0-3 trained, the SDE window, 40 epochs; docs/shapes.md) the mean verifier score
# rose from 0.427 by +0.154 / +0.208 / +0.172 (seeds 0-2, two threads; one standard error of the
# 192-image score is 0.022-0.024), strict accuracy from 0.125 by +0.151 / +0.255 / +0.214 (s.e. 0.032-0.035),
# and the deployed sampler's strict accuracy from 0.073 by +0.182 / +0.229 / +0.177 (s.e. 0.031-0.033).
# Under the README's `pytest -n 2` each worker computes with one thread (float sums in another order
# than two threads, so another run: seed 0 there gave score +0.172, strict +0.198, deployed +0.172). Margins: score +0.07 (3 evaluation
# standard errors, below half the smallest run), strict +0.075 and deployed strict +0.085 (half the smallest run).
LEARN_MARGIN = 0.07
STRICT_MARGIN = 0.075
DEPLOYED_MARGIN = 0.085


def example_settings(tmp_path, **overrides) -> tuple[LOOPConfig, ShapesReward]:
    """examples/train_shapes.py's defaults and its training reward, read from the script itself so the
    two cannot drift apart."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    try:
        from train_shapes import ShapesArguments, defaults
    finally:
        sys.path.pop(0)
    settings = {**defaults(), "output_dir": str(tmp_path / "run"), "save_freq": 10**6, "eval_freq": 0}
    return LOOPConfig(**{**settings, **overrides}), ShapesReward(strict_bonus=ShapesArguments().strict_bonus)


@pytest.mark.slow(minutes=10)
def test_the_example_raises_a_fixed_noise_score(tmp_path):
    prompts = train_eval_prompts(48)["binding"]  # the example's 48 binding prompts
    config, reward = example_settings(tmp_path)
    trainer = LOOPTrainer(config, reward, prompts, load_policy(lora_rank=8, lora_seed=0), eval_prompts=prompts)
    before, deployed_before = trainer.evaluate(log=False), trainer.evaluate(log=False, deterministic=True)
    trainer.train()
    after, deployed_after = trainer.evaluate(log=False), trainer.evaluate(log=False, deterministic=True)
    gain = after["score_mean"] - before["score_mean"]  # the plain verifier score, whatever the training reward
    print(f"fixed-noise score: {before['score_mean']:.4f} -> {after['score_mean']:.4f}; strict "
          f"{before['strict_mean']:.3f} -> {after['strict_mean']:.3f}; deployed sampler strict "
          f"{deployed_before['strict_mean']:.3f} -> {deployed_after['strict_mean']:.3f}")
    assert gain > LEARN_MARGIN, (before, after)
    assert after["strict_mean"] - before["strict_mean"] > STRICT_MARGIN, (before, after)
    assert deployed_after["strict_mean"] - deployed_before["strict_mean"] > DEPLOYED_MARGIN, (deployed_before, deployed_after)


def test_tokenizer_also_ships_the_files_transformers_4_needs(tmp_path):
    """TRL 0.23.1 runs on transformers 4, which builds CLIPTokenizer from vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    folder = os.path.join(MODEL_DIR, "tokenizer")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # everything but tokenizer.json
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    from_files = CLIPTokenizer.from_pretrained(str(tmp_path))
    shipped = load_pipeline().tokenizer
    for prompt in all_prompts()["spatial"][:5] + ["two cyan triangles", "a cat"]:
        assert from_files(prompt).input_ids == shipped(prompt).input_ids


def test_text_encoder_weights_carry_the_names_transformers_4_loads():
    """transformers 5 writes CLIPTextModel keys without the ``text_model.`` prefix; transformers 4 would then
    start from random weights without an error. The shipped file uses the names both versions load."""
    from safetensors import safe_open

    with safe_open(os.path.join(MODEL_DIR, "text_encoder", "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
