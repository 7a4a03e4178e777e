"""Where a LOOP epoch's time goes, next to its floor: the same UNet passes timed alone.

    python benchmarks/profile_epoch.py --output_dir benchmarks/results/profile
    python benchmarks/profile_epoch.py --gradient_checkpointing --offload_trajectories
    python benchmarks/profile_epoch.py --train_timesteps_per_forward 10

Runs --epochs epochs of LOOP on the shapes testbed (after one warm-up epoch that is not counted)
and reads the trainer's per-epoch timers: sampling (text encoding, UNet passes, DDIM steps, VAE
decode), reward, training (log-prob forward and backward passes, optimizer steps) and the rest of
the epoch. The floor runs the UNet calls that sampling and training make, on tensors of the same
shapes, with nothing around them: sampling_floor is T guided forward passes per sampling batch,
training_floor the guided forward and backward passes of every trained (minibatch, timestep), in
calls of train_batch_size x --train_timesteps_per_forward rows.
Prints medians and ratios from this one run and writes profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_workload_arguments, clock, peak_memory_mb  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/results/profile", help="where profile.json goes")
    add_workload_arguments(parser, epochs=3)  # timed epochs, after one warm-up epoch
    parser.add_argument("--lora_rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="LOOPConfig.gradient_checkpointing")
    parser.add_argument("--offload_trajectories", action="store_true", help="LOOPConfig.offload_trajectories")
    parser.add_argument("--train_timesteps_per_forward", type=int, default=1,
                        help="LOOPConfig.train_timesteps_per_forward: trained steps of a trajectory scored in one forward pass")
    parser.add_argument("--floor_repeats", type=int, default=3, help="times the floor is measured (median taken)")
    return parser.parse_args(argv)


def floor_seconds(policy, config, device: torch.device) -> dict[str, float]:
    """The UNet passes of one epoch, alone: (sampling, training) seconds."""
    unet = policy.unet
    dtype = policy.inference_dtype
    guided = config.sample_guidance_scale > 1.0
    size, channels = unet.config.sample_size, unet.config.in_channels
    embeds = torch.randn(1, policy.pipeline.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def call(batch: int) -> torch.Tensor:
        rows = batch * (2 if guided else 1)
        latents = torch.randn(rows, channels, size, size, device=device)
        timesteps = torch.full((rows,), 500, device=device)
        with autocast:
            return unet(latents, timesteps, encoder_hidden_states=embeds.expand(rows, -1, -1), return_dict=False)[0]

    started = clock(device)
    with torch.no_grad():
        for _ in range(config.sample_num_batches_per_epoch):
            for _ in range(config.sample_num_steps):
                call(config.sample_batch_size)
    sampled = clock(device)
    minibatches = config.sample_batch_size * config.sample_num_batches_per_epoch // config.train_batch_size
    for _ in range(minibatches * config.train_num_inner_epochs):
        for _ in range(config.num_train_timesteps // config.train_timesteps_per_forward):
            call(config.train_batch_size * config.train_timesteps_per_forward).float().square().mean().backward()
    trained = clock(device)
    unet.zero_grad(set_to_none=True)
    return {"sampling": sampled - started, "training": trained - sampled}


def main(argv=None) -> None:
    args = parse_args(argv)
    from loop_trl import LOOPConfig, LOOPTrainer
    from loop_trl.testbeds.shapes import ShapesReward, load_policy, train_prompts

    os.makedirs(args.output_dir, exist_ok=True)
    config = LOOPConfig(
        num_epochs=args.epochs + 1, seed=0, output_dir=os.path.join(args.output_dir, "work"), mixed_precision=args.mixed_precision,
        sample_num_steps=args.num_steps, sample_guidance_scale=args.guidance, sample_batch_size=args.sample_batch_size,
        sample_num_batches_per_epoch=args.images_per_epoch // args.sample_batch_size, train_batch_size=args.train_batch_size,
        train_learning_rate=1e-3, gradient_checkpointing=args.gradient_checkpointing,
        offload_trajectories=args.offload_trajectories, train_timesteps_per_forward=args.train_timesteps_per_forward)
    trainer = LOOPTrainer(config, ShapesReward(), train_prompts(), load_policy(lora_rank=args.lora_rank))
    device = trainer.accelerator.device
    epochs = []
    for epoch in range(args.epochs + 1):
        trainer.global_step = trainer.step(epoch, trainer.global_step)
        if epoch > 0:  # epoch 0 warms up kernels and allocators
            epochs.append({f"time_{k[len('time/'):]}": v for k, v in trainer.last_metrics.items() if k.startswith("time/")})
    floors = [floor_seconds(trainer.policy, config, device) for _ in range(args.floor_repeats)]

    median = {k: float(np.median([e[k] for e in epochs])) for k in epochs[0]}
    parts = {name: median[f"time_{name}_s"] for name in ("sampling", "reward", "training")}
    parts["other"] = median["time_epoch_s"] - sum(parts.values())
    floor = {k: float(np.median([f[k] for f in floors])) for k in floors[0]}
    floor_total = sum(floor.values())
    peak = peak_memory_mb()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {"device": device_name, "args": vars(args), "median_epoch_s": median["time_epoch_s"], "parts_s": parts,
              "floor_s": floor, "epoch_over_floor": median["time_epoch_s"] / floor_total, "peak_memory_mb": peak}
    with open(os.path.join(args.output_dir, "profile.json"), "w") as f:
        json.dump(result, f, indent=2)

    print(f"device: {device_name}; median of {len(epochs)} epochs of {args.images_per_epoch} images, "
          f"{args.num_steps} steps, guidance {args.guidance}")
    print("| part | median s | share of epoch | floor s | part / floor |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds in parts.items():
        f = floor.get(name)
        print(f"| {name} | {seconds:.2f} | {seconds / median['time_epoch_s']:.0%} | "
              f"{f'{f:.2f}' if f else '-'} | {f'{seconds / f:.2f}' if f else '-'} |")
    print(f"| epoch | {median['time_epoch_s']:.2f} | 100% | {floor_total:.2f} | {result['epoch_over_floor']:.2f} |")
    print(f"peak memory: {peak:.0f} MB ({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'process peak RSS'})")


if __name__ == "__main__":
    main()
