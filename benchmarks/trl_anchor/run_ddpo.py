"""TRL 0.23.1's DDPOTrainer on the shapes testbed: the anchor of benchmarks/compare_trl.py.

Run it with the anchor's interpreter (see setup_env.sh), from the repository root:

    PYTHONPATH=src benchmarks/.venv-trl/bin/python benchmarks/trl_anchor/run_ddpo.py --output_dir OUT

It trains TRL's own LoRA (rank 4, TRL's fixed value) on a base-model folder (default: the shapes
testbed's), loaded by TRL's DefaultDDPOStableDiffusionPipeline exactly as a user would load a Hub
model, against the testbed's verifier on its training prompts (``--reward shapes``) or, for the
GPU benchmark's timing runs, the mean pixel value on ordinary prompts (``--reward brightness``).
It writes OUT/result.json (per-epoch wall time and mean reward, peak memory) and OUT/adapter
(TRL's save_pretrained: LoRA weights + pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from collections import defaultdict

import numpy as np
import torch
from accelerate import PartialState
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import TIMING_PROMPTS, brightness_reward  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--pretrained_model", default=None, help="base-model folder (default: the shapes testbed's)")
    parser.add_argument("--reward", default="shapes", choices=["shapes", "brightness"])
    parser.add_argument("--timestep_fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--images_per_epoch", type=int, default=32)
    parser.add_argument("--sample_batch_size", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--num_steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip_range", type=float, default=1e-4)
    parser.add_argument("--inner_epochs", type=int, default=1)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> DDPOConfig:
    """TRL's config for the run: the workload from the flags, everything else TRL's defaults."""
    return DDPOConfig(
        num_epochs=args.epochs, seed=args.seed, mixed_precision=args.mixed_precision, sample_num_steps=args.num_steps,
        sample_guidance_scale=args.guidance, sample_batch_size=args.sample_batch_size,
        sample_num_batches_per_epoch=args.images_per_epoch // args.sample_batch_size,
        train_batch_size=args.train_batch_size, train_learning_rate=args.lr, train_clip_range=args.clip_range,
        train_num_inner_epochs=args.inner_epochs, train_timestep_fraction=args.timestep_fraction,
        per_prompt_stat_tracking=True, save_freq=10**9,
        project_kwargs={"project_dir": os.path.join(args.output_dir, "work")})


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.makedirs(args.output_dir, exist_ok=True)
    config = make_config(args)
    if args.reward == "shapes":  # the testbed's verifier and prompts (imports loop-trl's testbed from src/)
        from loop_trl.testbeds.shapes import ShapesReward, train_prompts
        from loop_trl.testbeds.shapes.model import MODEL_DIR

        prompts, verifier, model = train_prompts(), ShapesReward(), args.pretrained_model or MODEL_DIR
    else:
        prompts, verifier, model = TIMING_PROMPTS, brightness_reward, args.pretrained_model
    order = np.random.default_rng(args.seed).permutation(len(prompts)).tolist()
    drawn = iter(order * (args.epochs * args.images_per_epoch // len(prompts) + 1))

    def prompt_function():
        return prompts[next(drawn)], {}

    epoch_rewards: list[float] = []

    def reward_function(images, batch_prompts, metadata):
        rewards, info = verifier(images.float(), batch_prompts, metadata)
        epoch_rewards.extend(rewards.tolist())
        return rewards, info

    # TRL's pipeline logs through accelerate's logger before the trainer makes its Accelerator, which
    # recent accelerate refuses; creating the process state first is the usual workaround.
    PartialState()
    pipeline = DefaultDDPOStableDiffusionPipeline(model, use_lora=True)
    trainer = DDPOTrainer(config, reward_function, prompt_function, pipeline)
    device = trainer.accelerator.device

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    # The parts of TRL's epoch, timed like loop-trl's trainer times its own: sampling (text encoding,
    # UNet passes, DDIM steps, VAE decode), reward, and training (every inner epoch's passes and steps).
    timers: dict[str, float] = defaultdict(float)

    def timed(name: str, method):
        def wrapper(*a, **k):
            started = clock()
            out = method(*a, **k)
            timers[name] += clock() - started
            return out
        return wrapper

    trainer._generate_samples = timed("sampling", trainer._generate_samples)
    trainer.compute_rewards = timed("reward", trainer.compute_rewards)
    trainer._train_batched_samples = timed("training", trainer._train_batched_samples)

    epochs, global_step = [], 0
    for epoch in range(args.epochs):
        epoch_rewards.clear()
        timers.clear()
        started = clock()
        global_step = trainer.step(epoch, global_step)
        epochs.append({"epoch": epoch + 1, "images": (epoch + 1) * args.images_per_epoch,
                       "reward_mean": float(np.mean(epoch_rewards)), "wall_epoch_s": clock() - started,
                       **{f"time_{name}_s": seconds for name, seconds in timers.items()}})
        print(f"epoch {epoch}: reward {epochs[-1]['reward_mean']:.3f}, {epochs[-1]['wall_epoch_s']:.1f} s", flush=True)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    pipeline.save_pretrained(os.path.join(args.output_dir, "adapter"))
    import diffusers
    import transformers
    import trl

    result = {"method": "trl_ddpo", "device": device.type, "seed": args.seed, "lr": args.lr, "epochs": epochs, "peak_memory_mb": peak,
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                           "diffusers": diffusers.__version__, "torch": torch.__version__}}
    with open(os.path.join(args.output_dir, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
