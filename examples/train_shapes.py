"""LOOP on the shapes testbed: a complete RL run on a CPU in a few minutes.

    python examples/train_shapes.py                 # defaults: 30 epochs of 64 images
    python examples/train_shapes.py --help

It loads the testbed's shipped base model, measures held-out accuracy per prompt family, trains a
LoRA adapter with LOOP against the shapes verifier on the training prompts, measures again, and
writes to --output_dir: the adapter and model card, reward_curve.png, before_after.png (the same
prompts and seeds before and after) and metrics.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm
from trl import TrlParser

from loop_trl import LOOPConfig, LOOPTrainer
from loop_trl.testbeds.shapes import ShapesReward, evaluate, heldout_prompts, load_policy, train_prompts

logger = logging.getLogger("train_shapes")


@dataclass
class ShapesArguments:
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    eval_prompts_per_family: int = field(default=8, metadata={"help": "Held-out prompts per family in the evaluation."})
    eval_images_per_prompt: int = field(default=4, metadata={"help": "Images per held-out prompt in the evaluation."})
    grid_prompts: int = field(default=6, metadata={"help": "Held-out prompts shown in before_after.png."})


def defaults() -> dict:
    """LOOPConfig values of this example (any flag overrides them)."""
    # 64 images (16 prompts x K=4) per epoch and one optimizer step per epoch: on this testbed the
    # policy gradient of 16-32 trajectories was mostly noise (see docs/shapes.md)
    return dict(num_epochs=30, seed=0, output_dir="shapes-loop", mixed_precision="no", sample_num_steps=10,
                sample_guidance_scale=4.0, num_samples_per_prompt=4, sample_batch_size=16,
                sample_num_batches_per_epoch=4, train_batch_size=16, train_gradient_accumulation_steps=4,
                train_learning_rate=3e-3, train_timestep_fraction=0.5, train_clip_range=1e-4,
                train_num_inner_epochs=1, save_freq=10)


def grid(policy, prompts: list[str], seed: int, steps: int, guidance: float) -> Image.Image:
    """One row per prompt, 4 images each, from a fixed seed; captions underneath."""
    images = policy.sample([p for p in prompts for _ in range(4)], num_steps=steps, guidance_scale=guidance, eta=1.0,
                           generator=torch.Generator().manual_seed(seed)).images
    tiles = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
    scale, size = 3, images.shape[-1] * 3
    canvas = Image.new("RGB", (4 * size + 260, len(prompts) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, 4)
        canvas.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST), (col * size, row * size))
    for row, prompt in enumerate(prompts):
        draw.text((4 * size + 6, row * size + size // 2 - 6), prompt, fill="black")
    return canvas


def plot_curve(curve: list[float], images_per_epoch: int, path: str, window: int = 5) -> None:
    """Mean training reward per epoch against sampled images, with a moving average over ``window`` epochs
    (each epoch draws other prompts, so single epochs are noisy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.arange(1, len(curve) + 1) * images_per_epoch
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(images, curve, marker=".", alpha=0.4, label="epoch mean")
    if len(curve) >= window:
        smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
        ax.plot(images[window - 1:], smooth, linewidth=2, label=f"mean of the last {window} epochs")
    ax.set_xlabel("sampled images")
    ax.set_ylabel("mean training reward")
    ax.set_title("LOOP on the shapes testbed (K=4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = TrlParser((LOOPConfig, ShapesArguments))
    parser.set_defaults(**defaults())
    config, args = parser.parse_args_and_config()
    os.makedirs(config.output_dir, exist_ok=True)
    held_out = heldout_prompts(per_family=args.eval_prompts_per_family, seed=0)
    shown = [held_out[f][0] for f in held_out][: args.grid_prompts]
    shown += [p for f in held_out for p in held_out[f][1:]][: max(0, args.grid_prompts - len(shown))]
    steps, guidance = config.sample_num_steps, config.sample_guidance_scale

    policy = load_policy(lora_rank=args.lora_rank)
    started = time.time()
    before = evaluate(policy, held_out, args.eval_images_per_prompt, seed=1, num_steps=steps, guidance_scale=guidance)
    logger.info(f"held-out accuracy before: {json.dumps(before)}")
    grid_before = grid(policy, shown, 2, steps, guidance)

    trainer = LOOPTrainer(config, ShapesReward(), train_prompts(), policy)
    curve = []
    for epoch in (bar := tqdm(range(trainer.first_epoch, config.num_epochs), desc="LOOP epochs")):
        trainer.global_step = trainer.step(epoch, trainer.global_step)
        trainer.first_epoch = epoch + 1
        curve.append(trainer.last_metrics["reward_mean"])
        if trainer.first_epoch % config.save_freq == 0:
            trainer.save_checkpoint()
        bar.set_postfix(reward=f"{curve[-1]:.3f}")
    trainer.save_pretrained(config.output_dir)

    after = evaluate(policy, held_out, args.eval_images_per_prompt, seed=1, num_steps=steps, guidance_scale=guidance)
    logger.info(f"held-out accuracy after: {json.dumps(after)}")
    grid_after = grid(policy, shown, 2, steps, guidance)
    both = Image.new("RGB", (grid_before.width, grid_before.height * 2 + 20), "white")
    both.paste(grid_before, (0, 0))
    both.paste(grid_after, (0, grid_before.height + 20))
    ImageDraw.Draw(both).text((4, grid_before.height + 4), "above: base model; below: after LOOP", fill="black")
    both.save(os.path.join(config.output_dir, "before_after.png"))

    plot_curve(curve, config.sample_batch_size * config.sample_num_batches_per_epoch,
               os.path.join(config.output_dir, "reward_curve.png"))
    metrics = {"before": before, "after": after, "reward_curve": curve, "minutes": (time.time() - started) / 60}
    with open(os.path.join(config.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    logger.info(f"done in {metrics['minutes']:.1f} minutes; results in {config.output_dir}")


if __name__ == "__main__":
    main()
