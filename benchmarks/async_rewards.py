"""Epoch time with and without ``async_reward_computation`` on the shapes testbed.

    python benchmarks/async_rewards.py --output_dir benchmarks/results/async_rewards

Two rewards: the shapes verifier (runs on the same CPU cores as the sampler) and the verifier
behind a fixed latency per call (``--latency``, seconds), which stands for a reward that runs
elsewhere (a reward server, another GPU) and so can overlap with sampling. For each, one warm-up
epoch, then --epochs epochs scoring in turn and --epochs scoring in a worker thread, alternating,
all in this one process. Prints the median epoch time and the reward time the epoch waited for,
and the ratio async / in turn; writes async_rewards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_workload_arguments  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/results/async_rewards", help="where async_rewards.json goes")
    add_workload_arguments(parser, epochs=3, images_per_epoch=64)
    parser.set_defaults(guidance=1.0)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds added to each reward call of the remote-like reward")
    parser.add_argument("--rewards", nargs="+", default=["verifier", "remote"], choices=["verifier", "remote"],
                        help="which rewards to time: the shapes verifier, and/or it behind --latency")
    return parser.parse_args(argv)


class Delayed:
    """A reward that answers ``latency`` seconds late, as a remote reward server would (the CPU stays free)."""

    def __init__(self, reward, latency: float):
        self.reward, self.latency = reward, latency

    def __call__(self, images, prompts, metadata):
        time.sleep(self.latency)
        return self.reward(images, prompts, metadata)


def main(argv=None) -> None:
    args = parse_args(argv)
    from loop_trl import LOOPConfig, LOOPTrainer
    from loop_trl.testbeds.shapes import ShapesReward, load_policy, train_prompts

    def trainer(reward, async_rewards: bool) -> LOOPTrainer:
        config = LOOPConfig(
            num_epochs=1000, seed=0, output_dir=os.path.join(args.output_dir, "work"), mixed_precision=args.mixed_precision,
            sample_num_steps=args.num_steps, sample_guidance_scale=args.guidance, sample_batch_size=args.sample_batch_size,
            sample_num_batches_per_epoch=args.images_per_epoch // args.sample_batch_size, train_batch_size=args.train_batch_size,
            train_num_inner_epochs=2, train_learning_rate=2e-3, train_clip_range=1e-3, train_timestep_stop=-2,
            train_timestep_fraction=0.5, save_freq=10**9, async_reward_computation=async_rewards)
        return LOOPTrainer(config, reward, train_prompts(["binding"]), load_policy(lora_rank=8))

    results = {}
    rewards = {"verifier": ("shapes verifier", ShapesReward()),
               "remote": (f"verifier + {args.latency:g} s latency", Delayed(ShapesReward(), args.latency))}
    for name, reward in (rewards[key] for key in args.rewards):
        runs = {False: trainer(reward, False), True: trainer(reward, True)}
        for run in runs.values():
            run.step(0, 0)  # warm-up, not counted
        times = {False: [], True: []}
        for epoch in range(1, args.epochs + 1):
            for mode in (False, True) if epoch % 2 else (True, False):
                runs[mode].step(epoch, 0)
                times[mode].append((runs[mode].last_metrics["time/epoch_s"], runs[mode].last_metrics["time/reward_s"]))
        row = {}
        for mode, label in ((False, "in_turn"), (True, "async")):
            epoch_s, reward_s = (float(np.median([t[i] for t in times[mode]])) for i in (0, 1))
            row[label] = {"epoch_s": epoch_s, "reward_wait_s": reward_s}
        row["ratio"] = row["async"]["epoch_s"] / row["in_turn"]["epoch_s"]
        results[name] = row
        print(f"{name}: epoch {row['in_turn']['epoch_s']:.2f} s in turn (reward {row['in_turn']['reward_wait_s']:.2f} s), "
              f"{row['async']['epoch_s']:.2f} s async (waited {row['async']['reward_wait_s']:.2f} s for rewards): "
              f"ratio {row['ratio']:.2f}")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "async_rewards.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
