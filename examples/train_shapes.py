"""LOOP on the shapes testbed: a complete RL run on a CPU in a few minutes, with a visible gain.

    python examples/train_shapes.py                 # defaults: see defaults() below
    python examples/train_shapes.py --help

It loads the testbed's shipped base model, trains a LoRA adapter with LOOP against the shapes
verifier on the training prompts, and measures, with fixed noise, before and after:

* strict accuracy and mean verifier score on a fixed set of training prompts (the trainer's
  evaluation, also every ``eval_freq`` epochs during the run), with standard errors, with the
  training sampler (DDIM eta 1, ``eval/``) and with the deterministic one users deploy (DDIM eta 0,
  ``eval_deterministic/``) from the same noise;
* strict accuracy on held-out colour-shape pairings (transfer), with standard errors;
* the same training prompts sampled by a plain diffusers ``StableDiffusionPipeline`` with its own
  scheduler settings (deterministic DDIM), base model and with the saved adapter loaded through
  ``load_lora_weights``: how users sample;
* without guidance (the default), also the base model at other guidance scales, so a gain is not
  mistaken for what guidance alone would give.

Written to --output_dir: the adapter and model card, learning_curve.png, before_after.png (the same
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
from trl import TrlParser

from loop_trl import LOOPConfig, LOOPTrainer
from loop_trl.testbeds.shapes import (ShapesReward, evaluate, evaluate_plain_pipeline, heldout_prompts, load_pipeline,
                                      load_policy, train_eval_prompts, train_prompts)

logger = logging.getLogger("train_shapes")


@dataclass
class ShapesArguments:
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    families: str = field(default="binding", metadata={"help": "Prompt families trained and evaluated, comma-separated: single, binding, counting, spatial."})
    num_train_eval_prompts: int = field(default=48, metadata={"help": "Training prompts in the fixed training-prompt evaluation, a fixed draw split evenly over the families (eval_num_images_per_prompt images each)."})
    train_on: str = field(default="eval_prompts", metadata={"help": "'eval_prompts': RL trains on the evaluated training prompts (each is drawn several times, as in DDPO's fixed prompt sets); 'all': on every training prompt of the families."})
    num_heldout_prompts: int = field(default=28, metadata={"help": "Held-out prompts in the held-out evaluation, split evenly over the families (fewer where a family has fewer)."})
    heldout_images_per_prompt: int = field(default=4, metadata={"help": "Images per held-out prompt."})
    base_guidance_scales: str = field(default="3", metadata={"help": "When training without guidance: other guidance scales at which the base model is also evaluated (comma-separated; empty skips)."})
    diffusers_check: bool = field(default=True, metadata={"help": "After training, also sample the training-evaluation prompts with a plain diffusers StableDiffusionPipeline (its default scheduler settings), without and with the saved adapter."})
    deployed_guidance_scales: str = field(default="1,3,5,7.5", metadata={"help": "Guidance scales of that plain-pipeline check (comma-separated; the training guidance is always one): each model's best is compared with the other's best ('best against best'), since users sample with guidance."})
    strict_bonus: float = field(default=0.0, metadata={"help": "Training reward (score + b * strict) / (1 + b): b > 0 weighs a fully correct image above the partial credit (0 trains on the plain fraction of requirements met). Evaluations always report strict accuracy and the plain score."})
    grid_prompts: int = field(default=6, metadata={"help": "Training-evaluation prompts shown in before_after.png."})


def defaults() -> dict:
    """LOOPConfig values of this example (any flag overrides them); docs/shapes.md has the ablation behind them."""
    return dict(
        num_epochs=40, seed=0, output_dir="shapes-loop", mixed_precision="no", save_freq=20,
        # sampling: 64 images per epoch (16 prompts x K=4) in one batch, 10 DDIM steps, no guidance (half the cost)
        sample_num_steps=10, sample_guidance_scale=1.0, num_samples_per_prompt=4, sample_batch_size=64,
        sample_num_batches_per_epoch=1,
        # the SDE window: only the trained steps sample stochastically (DDIM eta 1); the other six are
        # deterministic (eta 0), as users sample, so each reward scores the finish a user's sampler gives
        sample_sde_window=True,
        # training: PPO that acts: 4 minibatches x 2 passes = 8 optimizer steps per epoch, clip range
        # scaled to 4x16x16 latents, the learning rate decayed to 0 over the run; only the first four
        # steps, which decide the layout, are trained (all four, in one forward pass): what later steps
        # learn adds gradient noise and is mostly lost under the deterministic sampler users deploy
        # (docs/shapes.md, "Which training settings carry over": early steps, the window and 40 epochs
        # keep 69-80% of the gain there, against 37-47% for all of steps 0-5 without the window)
        train_batch_size=16, train_gradient_accumulation_steps=1, train_num_inner_epochs=2,
        train_learning_rate=2e-3, train_lr_scheduler="cosine", train_clip_range=1e-3, train_timestep_stop=-6,
        train_timestep_fraction=1.0, train_timesteps_per_forward=4,
        # evaluation of the fixed training prompts: before, halfway and at the end, same noise each time
        eval_freq=20, eval_seed=1, eval_num_images_per_prompt=4, eval_batch_size=96,
        # and each time with the sampler users deploy too (DDIM eta 0, same noise): eval_deterministic/
        eval_deterministic=True,
    )


def grid(policy, prompts: list[str], seed: int, config: LOOPConfig) -> Image.Image:
    """One row per prompt, 4 images each, from a fixed seed; captions on the right."""
    images = policy.sample([p for p in prompts for _ in range(4)], num_steps=config.sample_num_steps,
                           guidance_scale=config.sample_guidance_scale, eta=config.sample_eta,
                           generator=torch.Generator().manual_seed(seed)).images
    tiles = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
    size = images.shape[-1] * 3
    canvas = Image.new("RGB", (4 * size + 260, len(prompts) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, 4)
        canvas.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST), (col * size, row * size))
    for row, prompt in enumerate(prompts):
        draw.text((4 * size + 6, row * size + size // 2 - 6), prompt, fill="black")
    return canvas


def plot_curves(history: list[dict], images_per_epoch: int, path: str, window: int = 5) -> None:
    """Left: mean training reward per epoch (each epoch draws other prompts, so a moving average too).
    Right: the fixed training-prompt evaluation against sampled images, +- one standard error: strict
    accuracy under the deterministic sampler users deploy (when evaluated) and under the training sampler,
    and the mean verifier score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h for h in history if "train/reward_mean" in h]
    curve = np.array([h["train/reward_mean"] for h in epochs])
    images = (np.array([h["train/epoch"] for h in epochs]) + 1) * images_per_epoch
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(images, curve, marker=".", alpha=0.4, label="epoch mean")
    if len(curve) >= window:
        left.plot(images[window - 1:], np.convolve(curve, np.ones(window) / window, mode="valid"), linewidth=2,
                  label=f"mean of the last {window} epochs")
    left.set(xlabel="sampled images", ylabel="mean training reward", title="training reward (K=4)")
    left.legend(fontsize=8)
    for key, label in (("eval_deterministic/strict_mean", "strict accuracy, deterministic sampler (DDIM eta 0)"),
                       ("eval/strict_mean", "strict accuracy, training sampler"),
                       ("eval/score_mean", "mean verifier score, training sampler")):
        points = [h for h in history if key in h]
        if not points:  # eval_deterministic off
            continue
        prefix = key.split("/")[0]
        eval_images = np.array([h[f"{prefix}/epochs_completed"] for h in points]) * images_per_epoch
        mean = np.array([h[key] for h in points])
        sem = np.array([h[key.replace("_mean", "_sem")] for h in points])
        right.plot(eval_images, mean, marker="o", label=label)
        right.fill_between(eval_images, mean - sem, mean + sem, alpha=0.2)
    right.set(xlabel="sampled images", title="fixed training prompts, fixed noise (+- 1 s.e.)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.no_grad()
def diffusers_check(prompts: list[str], adapter_dir: str, config: LOOPConfig, images_per_prompt: int,
                    scales: list[float]) -> dict:
    """Strict accuracy and mean score of a plain ``StableDiffusionPipeline`` (its own scheduler and
    defaults: deterministic DDIM), without and with the adapter loaded by ``load_lora_weights``: at the
    training guidance (``base``, ``trained``) and at every one of ``scales`` (``grid``), with each model's
    best guidance against the other's (``best_against_best``)."""
    scales = sorted({*scales, config.sample_guidance_scale})
    grids, pipe = {}, load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for name in ("base", "trained"):
        if name == "trained":
            pipe.load_lora_weights(adapter_dir)
        grids[name] = {f"{g:g}": evaluate_plain_pipeline(pipe, prompts, images_per_prompt, config.eval_seed,
                                                         config.sample_num_steps, g) for g in scales}
    training = f"{config.sample_guidance_scale:g}"
    best = {name: max(grid, key=lambda g: grid[g]["strict"]) for name, grid in grids.items()}
    return {"base": grids["base"][training], "trained": grids["trained"][training], "grid": grids,
            "best_against_best": {"base_guidance": float(best["base"]), "trained_guidance": float(best["trained"]),
                                  "gain": grids["trained"][best["trained"]]["strict"] - grids["base"][best["base"]]["strict"]},
            "settings": {"scheduler": type(pipe.scheduler).__name__, "eta": 0.0, "num_inference_steps": config.sample_num_steps,
                         "guidance_scale": config.sample_guidance_scale, "images": len(prompts) * images_per_prompt}}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = TrlParser((LOOPConfig, ShapesArguments))
    parser.set_defaults(**defaults())
    config, args = parser.parse_args_and_config()
    os.makedirs(config.output_dir, exist_ok=True)
    started = time.time()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    training = train_prompts(families)  # checks the names
    if args.train_on not in ("eval_prompts", "all"):
        raise ValueError(f"--train_on must be 'eval_prompts' or 'all', got {args.train_on!r}.")
    eval_set = [p for f, prompts in train_eval_prompts(args.num_train_eval_prompts // len(families)).items() if f in families
                for p in prompts]
    held_out = {f: p for f, p in heldout_prompts(per_family=args.num_heldout_prompts // len(families), seed=0).items()
                if f in families}
    shown = eval_set[::max(1, len(eval_set) // args.grid_prompts)][:args.grid_prompts]

    policy = load_policy(lora_rank=args.lora_rank, lora_seed=config.seed)
    trainer = LOOPTrainer(config, ShapesReward(strict_bonus=args.strict_bonus), eval_set if args.train_on == "eval_prompts" else training, policy,
                          eval_dataset=eval_set)
    heldout = lambda guidance: evaluate(policy, held_out, args.heldout_images_per_prompt, seed=config.eval_seed,  # noqa: E731
                                        num_steps=config.sample_num_steps, guidance_scale=guidance, eta=config.sample_eta)
    metrics = {"heldout_before": heldout(config.sample_guidance_scale), "base_at_other_guidance": {}}
    if config.sample_guidance_scale == 1.0:
        for scale in [float(s) for s in args.base_guidance_scales.split(",") if s.strip()]:
            metrics["base_at_other_guidance"][scale] = trainer.evaluate(log=False, guidance_scale=scale)
    grid_before = grid(policy, shown, 2, config)

    images_per_epoch = config.sample_batch_size * config.sample_num_batches_per_epoch * trainer.accelerator.num_processes
    trainer.train()
    evals = [h for h in trainer.log_history if "eval/strict_mean" in h]
    deployed = [h for h in trainer.log_history if "eval_deterministic/strict_mean" in h]
    metrics.update(train_prompts_before=evals[0], train_prompts_after=evals[-1],
                   heldout_after=heldout(config.sample_guidance_scale))
    if deployed:
        metrics.update(deterministic_before=deployed[0], deterministic_after=deployed[-1])
    grid_after = grid(policy, shown, 2, config)
    both = Image.new("RGB", (grid_before.width, grid_before.height * 2 + 20), "white")
    both.paste(grid_before, (0, 0))
    both.paste(grid_after, (0, grid_before.height + 20))
    ImageDraw.Draw(both).text((4, grid_before.height + 4), "above: base model; below: after LOOP (same noise)", fill="black")
    both.save(os.path.join(config.output_dir, "before_after.png"))
    plot_curves(trainer.log_history, images_per_epoch, os.path.join(config.output_dir, "learning_curve.png"))
    if args.diffusers_check:
        scales = [float(s) for s in args.deployed_guidance_scales.split(",") if s.strip()]
        metrics["diffusers_pipeline"] = diffusers_check(eval_set, config.output_dir, config, config.eval_num_images_per_prompt,
                                                        scales)
    metrics["minutes"] = (time.time() - started) / 60
    metrics["history"] = trainer.log_history
    with open(os.path.join(config.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)

    b, a = metrics["train_prompts_before"], metrics["train_prompts_after"]
    lines = [f"fixed training prompts ({int(a['eval/num_images'])} images, eval_seed {config.eval_seed}):",
             f"  strict accuracy {b['eval/strict_mean']:.3f} +- {b['eval/strict_sem']:.3f} -> "
             f"{a['eval/strict_mean']:.3f} +- {a['eval/strict_sem']:.3f}",
             f"  mean score      {b['eval/score_mean']:.3f} +- {b['eval/score_sem']:.3f} -> "
             f"{a['eval/score_mean']:.3f} +- {a['eval/score_sem']:.3f}",
             *([f"  same prompts and noise, deterministic sampler (DDIM eta 0): strict "
                f"{metrics['deterministic_before']['eval_deterministic/strict_mean']:.3f} -> "
                f"{metrics['deterministic_after']['eval_deterministic/strict_mean']:.3f} +- "
                f"{metrics['deterministic_after']['eval_deterministic/strict_sem']:.3f}"] if deployed else []),
             f"held-out strict accuracy: {metrics['heldout_before']['overall']:.3f} +- {metrics['heldout_before']['overall_sem']:.3f}"
             f" -> {metrics['heldout_after']['overall']:.3f} +- {metrics['heldout_after']['overall_sem']:.3f}"]
    for scale, m in metrics["base_at_other_guidance"].items():
        lines.append(f"base model at guidance {scale}: strict {m['strict_mean']:.3f}, mean score {m['score_mean']:.3f}")
    if "diffusers_pipeline" in metrics:
        d = metrics["diffusers_pipeline"]
        lines.append(f"plain StableDiffusionPipeline ({d['settings']['scheduler']}, eta 0): strict {d['base']['strict']:.3f} -> "
                     f"{d['trained']['strict']:.3f}, mean score {d['base']['mean_score']:.3f} -> {d['trained']['mean_score']:.3f}")
        for g in d["grid"]["base"]:
            lines.append(f"  guidance {g}: strict {d['grid']['base'][g]['strict']:.3f} -> {d['grid']['trained'][g]['strict']:.3f} "
                         f"+- {d['grid']['trained'][g]['strict_sem']:.3f}")
        bb = d["best_against_best"]
        lines.append(f"  best against best: trained at guidance {bb['trained_guidance']:g} against base at "
                     f"{bb['base_guidance']:g}: {bb['gain']:+.3f} strict")
    lines.append(f"done in {metrics['minutes']:.1f} minutes; results in {config.output_dir}")
    logger.info("\n".join(lines))


if __name__ == "__main__":
    main()
