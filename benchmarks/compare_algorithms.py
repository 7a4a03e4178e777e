"""LOOP next to PPO (DDPO), REINFORCE, REINFORCE with the leave-one-out baseline and GRPO-style
group normalisation, on the shapes testbed, with the same images per epoch for every method.

    python benchmarks/compare_algorithms.py --output_dir benchmarks/results/compare
    python benchmarks/compare_algorithms.py --output_dir benchmarks/results/lr_sweep \
        --methods loop ppo --seeds 0 --learning_rates 1e-3 3e-3 1e-2

The defaults are the work docs/benchmarks.md reports: 16 epochs of 64 images, LoRA rank 8, lr 3e-3,
two optimizer steps of 32 trajectories per epoch, half of each trajectory's steps trained.

Every (method, seed, learning rate) runs in its own process (so peak memory is its own) and writes
runs/<name>.json; a finished run is not repeated when the command is run again. At the end the
script writes runs.csv (one row per epoch and run), summary.csv, curves.png (training reward and
held-out accuracy against sampled images, mean over seeds) and table.md, whose last lines say
after how many images LOOP (mean over seeds) first reaches PPO's final held-out accuracy and
PPO's final training reward.
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
from common import add_workload_arguments, clock, peak_memory_mb  # noqa: E402

METHODS = {
    # advantage estimator, K, and what each method fixes of the PPO settings
    "loop": dict(advantage_estimator="loo", num_samples_per_prompt=4),
    "ppo": dict(advantage_estimator="per_prompt_tracker", num_samples_per_prompt=1),
    "reinforce": dict(advantage_estimator="batch_norm", num_samples_per_prompt=1, train_num_inner_epochs=1,
                      train_clip_range=float("inf")),
    "reinforce_loo": dict(advantage_estimator="loo", num_samples_per_prompt=4, train_num_inner_epochs=1,
                          train_clip_range=float("inf")),
    "grpo": dict(advantage_estimator="group_norm", num_samples_per_prompt=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/results/compare", help="where runs/, CSVs, the plot and the table go")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of each method")
    parser.add_argument("--learning_rates", nargs="+", type=float, default=[3e-3], help="learning rates of each method")
    add_workload_arguments(parser, epochs=16, images_per_epoch=64)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2,
                        help="training minibatches per optimizer step (64 images, batch 16, 2: two steps of 32 per epoch)")
    parser.add_argument("--timestep_fraction", type=float, default=0.5, help="fraction of each trajectory's steps trained")
    parser.add_argument("--lora_rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--clip_range", type=float, default=1e-4, help="PPO clip range (methods with clipping)")
    parser.add_argument("--inner_epochs", type=int, default=1, help="PPO passes per epoch (methods with clipping)")
    parser.add_argument("--eval_every", type=int, default=8, help="held-out evaluation every this many epochs (and at the end)")
    parser.add_argument("--eval_prompts_per_family", type=int, default=8, help="held-out prompts per family")
    parser.add_argument("--eval_images_per_prompt", type=int, default=4, help="images per held-out prompt")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="LOOPConfig.gradient_checkpointing")
    parser.add_argument("--offload_trajectories", action="store_true", help="LOOPConfig.offload_trajectories")
    parser.add_argument("--run_one", default=None, help=argparse.SUPPRESS)  # internal: method:seed:lr
    return parser.parse_args(argv)


def run_name(method: str, seed: int, lr: float) -> str:
    return f"{method}_seed{seed}_lr{lr:g}"


def run_one(args: argparse.Namespace, method: str, seed: int, lr: float) -> dict:
    """Train one method from the shipped base model; return its per-epoch records and evaluations."""
    from loop_trl import LOOPConfig, LOOPTrainer
    from loop_trl.testbeds.shapes import ShapesReward, evaluate, heldout_prompts, load_policy, train_prompts

    settings = dict(train_clip_range=args.clip_range, train_num_inner_epochs=args.inner_epochs)
    settings.update(METHODS[method])
    config = LOOPConfig(
        num_epochs=args.epochs, seed=seed, output_dir=os.path.join(args.output_dir, "work", run_name(method, seed, lr)),
        mixed_precision=args.mixed_precision, sample_num_steps=args.num_steps, sample_guidance_scale=args.guidance,
        sample_batch_size=args.sample_batch_size, sample_num_batches_per_epoch=args.images_per_epoch // args.sample_batch_size,
        train_batch_size=args.train_batch_size, train_gradient_accumulation_steps=args.gradient_accumulation_steps,
        train_timestep_fraction=args.timestep_fraction, train_learning_rate=lr, save_freq=10**9,
        gradient_checkpointing=args.gradient_checkpointing, offload_trajectories=args.offload_trajectories, **settings)
    held_out = heldout_prompts(per_family=args.eval_prompts_per_family, seed=0)
    trainer = LOOPTrainer(config, ShapesReward(), train_prompts(), load_policy(lora_rank=args.lora_rank))
    epochs, evals = [], []
    for epoch in range(args.epochs):
        started = clock(trainer.accelerator.device)
        trainer.global_step = trainer.step(epoch, trainer.global_step)
        m = trainer.last_metrics
        epochs.append({"epoch": epoch + 1, "images": (epoch + 1) * args.images_per_epoch, "reward_mean": m["reward_mean"],
                       "wall_epoch_s": clock(trainer.accelerator.device) - started, **{k: m[k] for k in m if k.startswith("time_")}})
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            accuracy = evaluate(trainer.policy, held_out, args.eval_images_per_prompt, seed=1,
                                num_steps=args.num_steps, guidance_scale=args.guidance)
            evals.append({"images": (epoch + 1) * args.images_per_epoch, **accuracy})
    return {"method": method, "seed": seed, "lr": lr, "epochs": epochs, "evals": evals, "peak_memory_mb": peak_memory_mb()}


def base_accuracy(args: argparse.Namespace) -> dict:
    from loop_trl.testbeds.shapes import evaluate, heldout_prompts, load_policy

    return evaluate(load_policy(lora_rank=args.lora_rank), heldout_prompts(per_family=args.eval_prompts_per_family, seed=0),
                    args.eval_images_per_prompt, seed=1, num_steps=args.num_steps, guidance_scale=args.guidance)


def first_reaching(points: list[dict], level: float, key: str = "overall") -> float:
    """Sampled images at the first point whose ``key`` reaches ``level`` (inf if none)."""
    return next((p["images"] for p in points if p[key] >= level - 1e-9), float("inf"))


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [float(np.mean(values[max(0, i + 1 - window):i + 1])) for i in range(len(values))]


def sample_efficiency(runs: list[dict], lr: float, window: int = 3) -> list[str]:
    """How many images LOOP (mean over seeds) needs to reach PPO's final level, held-out and training reward."""
    loop = [r for r in runs if r["method"] == "loop" and r["lr"] == lr]
    ppo = [r for r in runs if r["method"] == "ppo" and r["lr"] == lr]
    if not loop or not ppo:
        return []
    ppo_images = ppo[0]["epochs"][-1]["images"]
    lines = []
    ppo_final = float(np.mean([r["evals"][-1]["overall"] for r in ppo]))
    loop_evals = [{"images": e[0]["images"], "overall": float(np.mean([x["overall"] for x in e]))}
                  for e in zip(*[r["evals"] for r in loop])]
    reached = first_reaching(loop_evals, ppo_final)
    lines.append(f"lr {lr:g}, held-out accuracy: PPO's final {ppo_final:.3f} after {ppo_images} images; LOOP (mean over "
                 f"seeds) first reaches it after {reached} images ({reached / ppo_images:.2f} of PPO's).")
    def mean_reward(group: list[dict]) -> list[float]:
        return np.mean([[e["reward_mean"] for e in r["epochs"]] for r in group], axis=0).tolist()

    ppo_reward = trailing_mean(mean_reward(ppo), window)[-1]
    loop_curve = [{"images": e["images"], "reward": v}
                  for e, v in zip(loop[0]["epochs"], trailing_mean(mean_reward(loop), window))]
    reached = first_reaching(loop_curve, ppo_reward, key="reward")
    lines.append(f"lr {lr:g}, training reward ({window}-epoch trailing mean over seeds): PPO's final {ppo_reward:.3f} after "
                 f"{ppo_images} images; LOOP first reaches it after {reached} images ({reached / ppo_images:.2f} of PPO's).")
    return lines


def summarise(args: argparse.Namespace, runs: list[dict], base: dict) -> list[dict]:
    rows = []
    for method in args.methods:
        for lr in args.learning_rates:
            group = [r for r in runs if r["method"] == method and r["lr"] == lr]
            if not group:
                continue
            final = [r["evals"][-1] for r in group]
            epoch_times = [e["time_epoch_s"] for r in group for e in r["epochs"][1:] or r["epochs"]]
            rows.append({
                "method": method, "lr": lr, "seeds": len(group),
                "reward_first_3_epochs": np.mean([np.mean([e["reward_mean"] for e in r["epochs"][:3]]) for r in group]),
                "reward_last_3_epochs": np.mean([np.mean([e["reward_mean"] for e in r["epochs"][-3:]]) for r in group]),
                "heldout_before": base["overall"],
                "heldout_after": np.mean([f["overall"] for f in final]),
                "heldout_after_sd": np.std([f["overall"] for f in final]),
                **{f"heldout_{family}": np.mean([f[family] for f in final]) for family in ("single", "binding", "counting", "spatial")},
                "median_epoch_s": float(np.median(epoch_times)),
                "peak_memory_mb": float(np.median([r["peak_memory_mb"] for r in group])),
                "images": group[0]["epochs"][-1]["images"],
            })
    return rows


def write_outputs(args: argparse.Namespace, runs: list[dict], base: dict) -> None:
    out = args.output_dir
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "lr", "epoch", "images", "reward_mean", "time_epoch_s", "heldout_overall"])
        for r in runs:
            accuracy = {e["images"]: e["overall"] for e in r["evals"]}
            for e in r["epochs"]:
                writer.writerow([r["method"], r["seed"], r["lr"], e["epoch"], e["images"], f"{e['reward_mean']:.5f}",
                                 f"{e['time_epoch_s']:.3f}", accuracy.get(e["images"], "")])
    rows = summarise(args, runs, base)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    lines = ["| method | lr | seeds | reward, first 3 epochs | reward, last 3 epochs | held-out before | held-out after (sd) "
             "| binding | counting | spatial | median epoch (s) | peak memory (MB) |", "|" + " --- |" * 12]
    for r in rows:
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['seeds']} | {r['reward_first_3_epochs']:.3f} | "
                     f"{r['reward_last_3_epochs']:.3f} | {r['heldout_before']:.3f} | {r['heldout_after']:.3f} "
                     f"({r['heldout_after_sd']:.3f}) | {r['heldout_binding']:.2f} | {r['heldout_counting']:.2f} | "
                     f"{r['heldout_spatial']:.2f} | {r['median_epoch_s']:.1f} | {r['peak_memory_mb']:.0f} |")
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

    fig, (ax_reward, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for method in args.methods:
        for lr in args.learning_rates:
            group = [r for r in runs if r["method"] == method and r["lr"] == lr]
            if not group:
                continue
            label = method if len(args.learning_rates) == 1 else f"{method} lr={lr:g}"
            images = [e["images"] for e in group[0]["epochs"]]
            rewards = np.array([trailing_mean([e["reward_mean"] for e in r["epochs"]], 3) for r in group])
            line, = ax_reward.plot(images, rewards.mean(0), label=label)
            ax_reward.fill_between(images, rewards.min(0), rewards.max(0), color=line.get_color(), alpha=0.15)
            eval_images = [0] + [e["images"] for e in group[0]["evals"]]
            accuracy = np.array([[base["overall"]] + [e["overall"] for e in r["evals"]] for r in group])
            ax_eval.errorbar(eval_images, accuracy.mean(0), yerr=accuracy.std(0), marker="o", capsize=3,
                             color=line.get_color(), label=label)
    ax_reward.set(xlabel="sampled images", ylabel="mean training reward (3-epoch trailing mean)",
                  title="training reward (line: mean, band: min-max over seeds)")
    ax_eval.set(xlabel="sampled images", ylabel="held-out strict accuracy", title="held-out accuracy (mean, sd over seeds)")
    for ax in (ax_reward, ax_eval):
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
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        return
    base_path = os.path.join(args.output_dir, "runs", "base.json")
    if not os.path.exists(base_path):
        with open(base_path, "w") as f:
            json.dump(base_accuracy(args), f)
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
