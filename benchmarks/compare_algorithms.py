"""LOOP next to PPO (DDPO), REINFORCE, REINFORCE with the leave-one-out baseline and GRPO-style
group normalisation, on the shapes testbed, with the same images per epoch for every method.

    python benchmarks/compare_algorithms.py --output_dir benchmarks/results/compare
    python benchmarks/compare_algorithms.py --output_dir benchmarks/results/lr_sweep \
        --methods loop ppo --seeds 0 --learning_rates 1e-3 2e-3 4e-3

The defaults are examples/train_shapes.py's settings before its cosine decay (binding prompts, no
guidance, 64 images per epoch, 4 minibatches x 2 PPO passes, clip range 1e-3, the final two steps
untrained, constant lr 2e-3) for 24 epochs; docs/benchmarks.md's first table was made with them.
Its second table uses the example's current training settings:

    python benchmarks/compare_algorithms.py --output_dir benchmarks/results/compare_cosine \
        --methods loop ppo reinforce_loo grpo --epochs 28 --lr_scheduler cosine --timestep_stop -4 \
        --timestep_fraction 0.67 --timesteps_per_forward 4 --sample_batch_size 64 --eval_every 7

PPO is DDPO's: one image per prompt, advantages from a per-prompt tracker whose min_count
(--ppo_min_count) the run can reach; the table reports how often it engaged.

Every (method, seed, learning rate) runs in its own process (so peak memory is its own) and writes
runs/<name>.json; a finished run is not repeated when the command is run again. Each run is
evaluated by the trainer on a fixed set of training prompts with fixed noise (strict accuracy and
its standard error) before training and every --eval_every epochs, and on held-out pairings at the
end. The script writes runs.csv (one row per epoch and run), summary.csv, curves.png
(training-prompt accuracy and training reward against sampled images, mean and spread over
seeds) and table.md, whose last lines say after how many images LOOP (mean over seeds) first
reaches PPO's final training-prompt accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_workload_arguments, peak_memory_mb  # noqa: E402

METHODS = {
    # advantage estimator, K, and what each method fixes of the PPO settings
    "loop": dict(advantage_estimator="loo", num_samples_per_prompt=4),
    "ppo": dict(advantage_estimator="per_prompt_tracker", num_samples_per_prompt=1),  # + --ppo_min_count
    "reinforce": dict(advantage_estimator="batch_norm", num_samples_per_prompt=1, train_num_inner_epochs=1,
                      train_clip_range=float("inf")),
    "reinforce_loo": dict(advantage_estimator="loo", num_samples_per_prompt=4, train_num_inner_epochs=1,
                          train_clip_range=float("inf")),
    "grpo": dict(advantage_estimator="group_norm", num_samples_per_prompt=4),
    # LOOP with other numbers of images per prompt (at equal images per epoch: 64 / K prompts)
    "loop_k2": dict(advantage_estimator="loo", num_samples_per_prompt=2),
    "loop_k8": dict(advantage_estimator="loo", num_samples_per_prompt=8),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/results/compare", help="where runs/, CSVs, the plot and the table go")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of each method")
    parser.add_argument("--learning_rates", nargs="+", type=float, default=[2e-3], help="learning rates of each method")
    add_workload_arguments(parser, epochs=24, images_per_epoch=64)
    parser.set_defaults(guidance=1.0)
    parser.add_argument("--families", nargs="+", default=["binding"], help="prompt families trained and evaluated")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="training minibatches per optimizer step (64 images, batch 16, 1: four steps per pass)")
    parser.add_argument("--timestep_stop", type=lambda v: None if v.lower() == "none" else int(v), default=-2,
                        help="LOOPConfig.train_timestep_stop ('none': up to the last step, DDPO's)")
    parser.add_argument("--timestep_fraction", type=float, default=0.5, help="fraction of each trajectory's eligible steps trained")
    parser.add_argument("--timesteps_per_forward", type=int, default=1,
                        help="LOOPConfig.train_timesteps_per_forward (a speed setting; the gradient is the same)")
    parser.add_argument("--lr_scheduler", default="constant", help="LOOPConfig.train_lr_scheduler, e.g. 'cosine'")
    parser.add_argument("--lora_rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--strict_bonus", type=float, default=0.0,
                        help="training reward (score + b * strict) / (1 + b) (ShapesReward's strict_bonus; 0: the plain score)")
    parser.add_argument("--clip_range", type=float, default=1e-3, help="PPO clip range (methods with clipping)")
    parser.add_argument("--inner_epochs", type=int, default=2, help="PPO passes per epoch (methods with clipping)")
    parser.add_argument("--ppo_min_count", type=int, default=4,
                        help="ppo: rewards a prompt needs before its own statistics are used (DDPO's default 16 is "
                             "not reached when each prompt is drawn fewer times)")
    parser.add_argument("--eval_every", type=int, default=8, help="training-prompt evaluation every this many epochs (and before and at the end)")
    parser.add_argument("--eval_prompts", type=int, default=48, help="fixed training prompts evaluated (split over the families)")
    parser.add_argument("--heldout_prompts", type=int, default=28, help="held-out prompts evaluated at the end")
    parser.add_argument("--eval_images_per_prompt", type=int, default=4, help="images per evaluated prompt")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="LOOPConfig.gradient_checkpointing")
    parser.add_argument("--offload_trajectories", action="store_true", help="LOOPConfig.offload_trajectories")
    parser.add_argument("--run_one", default=None, help=argparse.SUPPRESS)  # internal: method:seed:lr
    return parser.parse_args(argv)


def write_json_atomically(path: str, value) -> None:
    with open(path + f".{os.getpid()}.tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + f".{os.getpid()}.tmp", path)


def run_name(method: str, seed: int, lr: float) -> str:
    return f"{method}_seed{seed}_lr{lr:g}"


def prompt_sets(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """(training prompts, fixed training prompts evaluated, held-out prompts evaluated)."""
    from loop_trl.testbeds.shapes import heldout_prompts, train_eval_prompts, train_prompts

    per_family = max(1, args.eval_prompts // len(args.families)), max(1, args.heldout_prompts // len(args.families))
    chosen = lambda split: [p for f, prompts in split.items() if f in args.families for p in prompts]  # noqa: E731
    return (train_prompts(args.families), chosen(train_eval_prompts(per_family[0])),
            chosen(heldout_prompts(per_family=per_family[1], seed=0)))


def make_config(args: argparse.Namespace, method: str, seed: int, lr: float):
    """The LOOPConfig of one run."""
    from loop_trl import LOOPConfig

    settings = dict(train_clip_range=args.clip_range, train_num_inner_epochs=args.inner_epochs,
                    per_prompt_stat_tracking_min_count=args.ppo_min_count)
    settings.update(METHODS[method])
    config = LOOPConfig(
        num_epochs=args.epochs, seed=seed, output_dir=os.path.join(args.output_dir, "work", run_name(method, seed, lr)),
        mixed_precision=args.mixed_precision, sample_num_steps=args.num_steps, sample_guidance_scale=args.guidance,
        sample_batch_size=args.sample_batch_size, sample_num_batches_per_epoch=args.images_per_epoch // args.sample_batch_size,
        train_batch_size=args.train_batch_size, train_gradient_accumulation_steps=args.gradient_accumulation_steps,
        train_timestep_stop=args.timestep_stop, train_timestep_fraction=args.timestep_fraction,
        train_timesteps_per_forward=args.timesteps_per_forward, train_learning_rate=lr, train_lr_scheduler=args.lr_scheduler,
        save_freq=10**9, eval_freq=args.eval_every, eval_seed=1, eval_num_images_per_prompt=args.eval_images_per_prompt,
        gradient_checkpointing=args.gradient_checkpointing, offload_trajectories=args.offload_trajectories, **settings)
    return config


def run_one(args: argparse.Namespace, method: str, seed: int, lr: float) -> dict:
    """Train one method from the shipped base model; return its per-epoch records and evaluations."""
    from loop_trl import LOOPTrainer
    from loop_trl.testbeds.shapes import ShapesReward, evaluate, load_policy

    config = make_config(args, method, seed, lr)
    training, evaluated, held_out = prompt_sets(args)
    trainer = LOOPTrainer(config, ShapesReward(strict_bonus=args.strict_bonus), training,
                          load_policy(lora_rank=args.lora_rank, lora_seed=seed), eval_prompts=evaluated)
    epochs = []
    trainer.train()
    for m in trainer.log_history:
        if "train/reward_mean" in m:  # an epoch's entry (records keep their earlier key names)
            epochs.append({"epoch": m["train/epoch"] + 1, "images": (m["train/epoch"] + 1) * args.images_per_epoch,
                           "reward_mean": m["train/reward_mean"],
                           "tracker_engaged_fraction": m.get("train/tracker_engaged_fraction"),
                           **{f"time_{k[len('time/'):]}": m[k] for k in m if k.startswith("time/")}})
    evals = [{"images": m["eval/epochs_completed"] * args.images_per_epoch, "strict": m["eval/strict_mean"],
              "strict_sem": m["eval/strict_sem"], "score": m["eval/score_mean"]}
             for m in trainer.log_history if "eval/strict_mean" in m]
    heldout = evaluate(trainer.policy, held_out, args.eval_images_per_prompt, seed=1, num_steps=args.num_steps,
                       guidance_scale=args.guidance)
    return {"method": method, "seed": seed, "lr": lr, "epochs": epochs, "evals": evals, "heldout": heldout,
            "peak_memory_mb": peak_memory_mb()}


def base_accuracy(args: argparse.Namespace) -> dict:
    from loop_trl.testbeds.shapes import evaluate, load_policy

    _, _, held_out = prompt_sets(args)
    return evaluate(load_policy(lora_rank=args.lora_rank), held_out, args.eval_images_per_prompt, seed=1,
                    num_steps=args.num_steps, guidance_scale=args.guidance)


def first_reaching(points: list[dict], level: float, key: str = "strict") -> float:
    """Sampled images at the first point whose ``key`` reaches ``level`` (inf if none)."""
    return next((p["images"] for p in points if p[key] >= level - 1e-9), float("inf"))


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [float(np.mean(values[max(0, i + 1 - window):i + 1])) for i in range(len(values))]


def mean_curve(group: list[dict], key: str) -> list[dict]:
    """The evaluations of several seeds averaged point by point: images, mean and sd over seeds."""
    return [{"images": points[0]["images"], key: float(np.mean([p[key] for p in points])),
             "sd": float(np.std([p[key] for p in points]))} for points in zip(*[r["evals"] for r in group])]


def sample_efficiency(runs: list[dict], lr: float) -> list[str]:
    """How many images LOOP (mean over seeds) needs to reach PPO's final training-prompt accuracy."""
    loop = [r for r in runs if r["method"] == "loop" and r["lr"] == lr]
    ppo = [r for r in runs if r["method"] == "ppo" and r["lr"] == lr]
    if not loop or not ppo:
        return []
    ppo_images = ppo[0]["epochs"][-1]["images"]
    ppo_final = mean_curve(ppo, "strict")[-1]["strict"]
    reached = first_reaching(mean_curve(loop, "strict"), ppo_final, key="strict")
    return [f"lr {lr:g}, fixed training prompts: PPO's final strict accuracy {ppo_final:.3f} after {ppo_images} images; "
            f"LOOP (mean over seeds) first reaches it after {reached} images ({reached / ppo_images:.2f} of PPO's; "
            f"target <= 0.5, at the evaluation points every {loop[0]['evals'][1]['images'] - loop[0]['evals'][0]['images']} images)."]


def summarise(args: argparse.Namespace, runs: list[dict], base: dict) -> list[dict]:
    rows = []
    for method in args.methods:
        for lr in args.learning_rates:
            group = [r for r in runs if r["method"] == method and r["lr"] == lr]
            if not group:
                continue
            curve = mean_curve(group, "strict")
            engaged = [e["tracker_engaged_fraction"] for r in group for e in r["epochs"] if e.get("tracker_engaged_fraction") is not None]
            rows.append({
                "method": method, "lr": lr, "seeds": len(group),
                "train_prompts_before": curve[0]["strict"],
                "train_prompts_after": curve[-1]["strict"], "train_prompts_after_sd": curve[-1]["sd"],
                "train_prompts_after_sem": float(np.mean([r["evals"][-1]["strict_sem"] for r in group])),
                "score_before": float(np.mean([r["evals"][0]["score"] for r in group])),
                "score_after": float(np.mean([r["evals"][-1]["score"] for r in group])),
                "heldout_before": base["overall"],
                "heldout_after": float(np.mean([r["heldout"]["overall"] for r in group])),
                "heldout_after_sd": float(np.std([r["heldout"]["overall"] for r in group])),
                "tracker_engaged": float(np.mean(engaged)) if engaged else float("nan"),
                "median_epoch_s": float(np.median([e["time_epoch_s"] for r in group for e in r["epochs"][1:] or r["epochs"]])),
                "peak_memory_mb": float(np.median([r["peak_memory_mb"] for r in group])),
                "images": group[0]["epochs"][-1]["images"],
            })
    return rows


def write_outputs(args: argparse.Namespace, runs: list[dict], base: dict) -> None:
    out = args.output_dir
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "lr", "epoch", "images", "reward_mean", "time_epoch_s", "train_prompts_strict"])
        for r in runs:
            accuracy = {e["images"]: e["strict"] for e in r["evals"]}
            for e in r["epochs"]:
                writer.writerow([r["method"], r["seed"], r["lr"], e["epoch"], e["images"], f"{e['reward_mean']:.5f}",
                                 f"{e['time_epoch_s']:.3f}", accuracy.get(e["images"], "")])
    rows = summarise(args, runs, base)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    lines = ["| method | lr | seeds | training prompts: strict before | after (sd over seeds; s.e. of one run) | score before "
             "-> after | held-out before | held-out after (sd) | tracker engaged | median epoch (s) | peak memory (MB) |",
             "|" + " --- |" * 11]
    for r in rows:
        engaged = "" if np.isnan(r["tracker_engaged"]) else f"{r['tracker_engaged']:.2f}"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['seeds']} | {r['train_prompts_before']:.3f} | "
                     f"{r['train_prompts_after']:.3f} ({r['train_prompts_after_sd']:.3f}; {r['train_prompts_after_sem']:.3f}) | "
                     f"{r['score_before']:.3f} -> {r['score_after']:.3f} | {r['heldout_before']:.3f} | "
                     f"{r['heldout_after']:.3f} ({r['heldout_after_sd']:.3f}) | {engaged} | {r['median_epoch_s']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} |")
    lines.append("")
    for lr in args.learning_rates:
        lines += sample_efficiency(runs, lr)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eval, ax_reward) = plt.subplots(1, 2, figsize=(11, 4))
    for method in args.methods:
        for lr in args.learning_rates:
            group = [r for r in runs if r["method"] == method and r["lr"] == lr]
            if not group:
                continue
            label = method if len(args.learning_rates) == 1 else f"{method} lr={lr:g}"
            curve = mean_curve(group, "strict")
            images = np.array([p["images"] for p in curve])
            mean, sd = np.array([p["strict"] for p in curve]), np.array([p["sd"] for p in curve])
            line, = ax_eval.plot(images, mean, marker="o", label=label)
            ax_eval.fill_between(images, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
            epochs = [e["images"] for e in group[0]["epochs"]]
            rewards = np.array([trailing_mean([e["reward_mean"] for e in r["epochs"]], 3) for r in group])
            ax_reward.plot(epochs, rewards.mean(0), color=line.get_color(), label=label)
            ax_reward.fill_between(epochs, rewards.min(0), rewards.max(0), color=line.get_color(), alpha=0.15)
    ax_eval.set(xlabel="sampled images", ylabel="strict accuracy",
                title="fixed training prompts, fixed noise (mean +- sd over seeds)")
    ax_reward.set(xlabel="sampled images", ylabel="mean training reward (3-epoch trailing mean)",
                  title="training reward (band: min-max over seeds)")
    for ax in (ax_eval, ax_reward):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.images_per_epoch % args.sample_batch_size:
        raise SystemExit(f"--images_per_epoch ({args.images_per_epoch}) must be a multiple of --sample_batch_size "
                         f"({args.sample_batch_size}).")
    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    if args.run_one:
        method, seed, lr = args.run_one.split(":")
        result = run_one(args, method, int(seed), float(lr))
        path = os.path.join(args.output_dir, "runs", run_name(method, int(seed), float(lr)) + ".json")
        write_json_atomically(path, result)
        return
    base_path = os.path.join(args.output_dir, "runs", "base.json")
    if not os.path.exists(base_path):  # written whole or not at all, so several invocations can share a folder
        write_json_atomically(base_path, base_accuracy(args))
    with open(base_path) as f:
        base = json.load(f)
    own = [a for a in (argv if argv is not None else sys.argv[1:])]
    jobs = [(m, s, lr) for lr in args.learning_rates for s in args.seeds for m in args.methods]
    runs = []
    for i, (method, seed, lr) in enumerate(jobs):
        path = os.path.join(args.output_dir, "runs", run_name(method, seed, lr) + ".json")
        if not os.path.exists(path):
            started = time.time()
            print(f"[{i + 1}/{len(jobs)}] {run_name(method, seed, lr)}", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), *own, "--run_one", f"{method}:{seed}:{lr!r}"], check=True)
            print(f"    {time.time() - started:.0f} s", flush=True)
        with open(path) as f:
            runs.append(json.load(f))
    write_outputs(args, runs, base)


if __name__ == "__main__":
    main()
