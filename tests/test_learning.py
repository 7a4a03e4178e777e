"""End to end: LOOP raises JPEG compressibility on the tiny pipeline within a few epochs (fixed seeds), and the
gain survives where users sample: the saved weights in a plain diffusers pipeline, deterministic DDIM (eta 0)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from loop_trl import LOOPConfig, LOOPStableDiffusionPipeline, LOOPTrainer
from loop_trl.rewards import JpegCompressibility

EPOCHS = 14
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a cat"]
# Measured with these seeds: the mean reward of the last 3 epochs exceeds that of the first 3 by
# about 0.07 kB (the within-batch reward std is about 0.01 kB); we require half of that.
MARGIN_KB = 0.035
# Under the deployed sampler (below, 32 images from fixed noise) the trained weights gained 0.074, 0.249 and
# 0.070 kB over the base model with training seeds 0, 1 and 2 (standard errors 0.002-0.004): we require half
# the smallest, with seed 0.
DEPLOYED_MARGIN_KB = 0.035


def deployed_rewards(pipe: StableDiffusionPipeline) -> torch.Tensor:
    """The reward of 8 images per prompt sampled as users sample: plain diffusers, DDIM with eta 0, fixed noise."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in PROMPTS for _ in range(8)]
    images = pipe(prompt=prompts, num_inference_steps=4, guidance_scale=1.0, eta=0.0, height=32, width=32,
                  output_type="pt", generator=torch.Generator().manual_seed(123)).images
    return torch.as_tensor(JpegCompressibility()(images, prompts, [{}] * len(prompts))[0]).float()


@pytest.mark.slow
def test_loop_raises_jpeg_compressibility(tmp_path, tiny_sd_path):
    config = LOOPConfig(num_epochs=EPOCHS, seed=0, sample_num_steps=4, sample_guidance_scale=1.0,
                        num_samples_per_prompt=4, sample_batch_size=16, sample_num_batches_per_epoch=1,
                        train_batch_size=16, train_learning_rate=3e-3, mixed_precision="no",
                        output_dir=str(tmp_path / "run"), save_freq=EPOCHS)
    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path, use_lora=False)
    trainer = LOOPTrainer(config, JpegCompressibility(), PROMPTS, policy)
    rewards = []
    for epoch in range(EPOCHS):
        trainer.global_step = trainer.step(epoch, trainer.global_step)
        rewards.append(trainer.last_metrics["train/reward_mean"])
        assert trainer.last_metrics["train/onpolicy_max_abs_logratio"] < 1e-5
    gain = np.mean(rewards[-3:]) - np.mean(rewards[:3])
    print("rewards per epoch:", np.round(rewards, 4), "gain:", round(gain, 4))
    assert gain > MARGIN_KB, f"reward rose by only {gain:.4f} kB: {rewards}"

    trainer.save_pretrained(str(tmp_path / "trained"))
    base = deployed_rewards(StableDiffusionPipeline.from_pretrained(tiny_sd_path))
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "trained"), subfolder="unet")
    deployed_gain = (deployed_rewards(StableDiffusionPipeline.from_pretrained(tiny_sd_path, unet=unet)) - base).mean().item()
    print("deployed sampler: base", round(base.mean().item(), 4), "gain", round(deployed_gain, 4))
    assert deployed_gain > DEPLOYED_MARGIN_KB, f"the plain diffusers pipeline gained only {deployed_gain:.4f} kB"
