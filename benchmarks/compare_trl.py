"""The anchor: identical DDPO work on TRL 0.23.1's DDPOTrainer and on loop-trl, in one run.

    bash benchmarks/trl_anchor/setup_env.sh                  # once: TRL 0.23.1 + transformers<5
    python benchmarks/compare_trl.py --output_dir benchmarks/results/trl

Both sides train a rank-4 LoRA (TRL's fixed rank) with PPO and per-prompt reward tracking (K=1),
from the same testbed folder, against the same verifier, on the same training prompts, with the
same images per epoch, steps, guidance, batch sizes, clip range and learning rate. loop-trl also
runs a second time with its memory options on (gradient checkpointing, trajectories kept off the
accelerator). The runs alternate per seed, each in its own process, so that both meet the same
machine; after each seed the bare UNet calls are timed in both environments
(trl_anchor/time_unet.py), to tell library versions apart from trainer overhead. Writes
runs/*.json, table.md (median epoch time, its sampling and training parts and peak memory, as
ratios to TRL) and curves.png (training reward against sampled images).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_workload_arguments  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("trl_ddpo", "loop_trl_ddpo", "loop_trl_ddpo_memory")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/results/trl", help="where runs/, table.md and curves.png go")
    parser.add_argument("--anchor_python", default=os.path.join(HERE, ".venv-trl", "bin", "python"),
                        help="the interpreter of the anchor's environment (made by trl_anchor/setup_env.sh)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="what to run: TRL's trainer (always, it is the reference), loop-trl, loop-trl with its memory options")
    add_workload_arguments(parser, epochs=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--clip_range", type=float, default=1e-4, help="PPO clip range")
    parser.add_argument("--unet_repeats", type=int, default=20, help="timed calls of each kind in time_unet.py")
    parser.add_argument("--inner_epochs", type=int, default=1, help="PPO passes per epoch (DDPOConfig's default 1)")
    parser.add_argument("--eval_prompts_per_family", type=int, default=8, help="held-out prompts per family")
    parser.add_argument("--eval_images_per_prompt", type=int, default=4, help="images per held-out prompt")
    return parser.parse_args(argv)


def shared_flags(args: argparse.Namespace) -> list[str]:
    """What both sides are told alike: the workload, the learning rate, the clip range, the PPO passes."""
    return ["--epochs", str(args.epochs), "--images_per_epoch", str(args.images_per_epoch),
            "--sample_batch_size", str(args.sample_batch_size), "--train_batch_size", str(args.train_batch_size),
            "--num_steps", str(args.num_steps), "--guidance", str(args.guidance), "--mixed_precision", args.mixed_precision,
            "--lr", repr(args.lr), "--clip_range", str(args.clip_range), "--inner_epochs", str(args.inner_epochs)]


#: compare_algorithms.py's flags that make loop-trl do DDPOTrainer's work, each with the DDPOConfig value it
#: matches (run_ddpo.py leaves these at TRL's defaults); test_compare_trl_flags checks each against the code
DDPO_EQUIVALENT = {
    "--families": ["single", "binding", "counting", "spatial"],  # run_ddpo.py trains on train_prompts(): all four
    "--lora_rank": ["4"],  # TRL's DefaultDDPOStableDiffusionPipeline: LoraConfig(r=4, lora_alpha=4)
    "--timestep_stop": ["none"],  # every step may be trained
    "--timestep_fraction": ["1.0"],  # train_timestep_fraction=1.0: all of them are
    "--timesteps_per_forward": ["1"],  # one step per forward pass, as TRL
    "--gradient_accumulation_steps": ["1"],  # train_gradient_accumulation_steps=1
    "--lr_scheduler": ["constant"],  # TRL has no schedule
    "--ppo_min_count": ["16"],  # per_prompt_stat_tracking_min_count=16 (buffer 16 in both)
    "--strict_bonus": ["0"],  # the plain verifier score, run_ddpo.py's ShapesReward()
}


def run_variant(args: argparse.Namespace, variant: str, seed: int) -> dict:
    path = os.path.join(args.output_dir, "runs", f"{variant}_seed{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    work = os.path.join(args.output_dir, "work", f"{variant}_seed{seed}")
    if variant == "trl_ddpo":
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        subprocess.run([args.anchor_python, os.path.join(HERE, "trl_anchor", "run_ddpo.py"), "--output_dir", work,
                        "--seed", str(seed), *shared_flags(args)], check=True, env=env)
        with open(os.path.join(work, "result.json")) as f:
            result = json.load(f)
        # held-out accuracy at the end, as compare_algorithms.py gives the loop-trl runs under "heldout"
        result["heldout"] = evaluate_adapter(args, os.path.join(work, "adapter"), result["epochs"][-1]["images"])
    else:
        memory = ["--gradient_checkpointing", "--offload_trajectories"] if variant.endswith("_memory") else []
        subprocess.run(loop_trl_command(args, work, seed) + memory, check=True)
        with open(os.path.join(work, "runs", f"ppo_seed{seed}_lr{args.lr:g}.json")) as f:
            result = json.load(f)
        result["method"] = variant
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f)
    return result


def loop_trl_command(args: argparse.Namespace, work: str, seed: int) -> list[str]:
    """compare_algorithms.py running PPO as DDPOTrainer does: the shared flags, DDPO_EQUIVALENT, and the same
    held-out evaluation as evaluate_adapter gives TRL's adapter (4 families x eval_prompts_per_family)."""
    shared = shared_flags(args)
    lr = shared.pop(shared.index("--lr") + 1)
    shared.remove("--lr")  # compare_algorithms takes a list of rates; the run is named by the one given here
    ddpo = [item for flag, values in DDPO_EQUIVALENT.items() for item in (flag, *values)]
    families = len(DDPO_EQUIVALENT["--families"])
    return [sys.executable, os.path.join(HERE, "compare_algorithms.py"), "--output_dir", work, *shared, *ddpo,
            "--eval_every", str(args.epochs), "--eval_prompts", str(families * args.eval_prompts_per_family),
            "--heldout_prompts", str(families * args.eval_prompts_per_family),
            "--eval_images_per_prompt", str(args.eval_images_per_prompt), "--learning_rates", lr,
            "--run_one", f"ppo:{seed}:{lr}"]


def time_bare_unet(args: argparse.Namespace, side: str, seed: int) -> dict:
    """trl_anchor/time_unet.py under one side's environment: the same UNet calls, nothing around them."""
    path = os.path.join(args.output_dir, "runs", f"unet_{side}_seed{seed}.json")
    if not os.path.exists(path):
        python = args.anchor_python if side == "trl" else sys.executable
        out = subprocess.run([python, os.path.join(HERE, "trl_anchor", "time_unet.py"), "--sample_batch_size",
                              str(args.sample_batch_size), "--train_batch_size", str(args.train_batch_size),
                              "--repeats", str(args.unet_repeats)],
                             check=True, capture_output=True, text=True).stdout
        with open(path, "w") as f:
            f.write(out.strip().splitlines()[-1])
    with open(path) as f:
        return json.load(f)


def evaluate_adapter(args: argparse.Namespace, adapter: str, images: int) -> dict:
    """Held-out accuracy of an adapter TRL saved, loaded into loop-trl's policy (diffusers LoRA format)."""
    from loop_trl.testbeds.shapes import evaluate, heldout_prompts, load_policy

    policy = load_policy(lora_rank=4, adapter=adapter)
    accuracy = evaluate(policy, heldout_prompts(per_family=args.eval_prompts_per_family, seed=0),
                        args.eval_images_per_prompt, seed=1, num_steps=args.num_steps, guidance_scale=args.guidance)
    return {"images": images, **accuracy}


def main(argv=None) -> None:
    args = parse_args(argv)
    if not os.path.exists(args.anchor_python):
        raise SystemExit(f"No anchor environment at {args.anchor_python}; run: bash benchmarks/trl_anchor/setup_env.sh")
    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    runs = {v: [] for v in VARIANTS if v == "trl_ddpo" or v in args.variants}
    unet: dict[str, list[dict]] = {"trl": [], "loop_trl": []}
    for seed in args.seeds:
        for variant in runs:
            print(f"seed {seed}: {variant}", flush=True)
            runs[variant].append(run_variant(args, variant, seed))
        for side in unet:
            unet[side].append(time_bare_unet(args, side, seed))

    def median_epoch(results: list[dict], key: str = "wall_epoch_s") -> float:
        """Median over runs and epochs; the first epoch warms up and is left out when there are more. An epoch's
        wall time is run_ddpo.py's clock around TRL's step() and loop-trl's own time_epoch_s around its step()."""
        def value(epoch: dict) -> float:
            return epoch.get(key, epoch.get("time_epoch_s", np.nan) if key == "wall_epoch_s" else np.nan)
        return float(np.median([value(e) for r in results for e in (r["epochs"][1:] or r["epochs"])]))

    anchor_time = median_epoch(runs["trl_ddpo"])
    anchor_memory = float(np.median([r["peak_memory_mb"] for r in runs["trl_ddpo"]]))
    versions = runs["trl_ddpo"][0].get("versions", {})
    lines = [f"Anchor: TRL {versions.get('trl', '?')} (transformers {versions.get('transformers', '?')}, diffusers "
             f"{versions.get('diffusers', '?')}, torch {versions.get('torch', '?')}). {len(args.seeds)} seeds x "
             f"{args.epochs} epochs x {args.images_per_epoch} images, {args.num_steps} steps, guidance {args.guidance}, "
             f"LoRA rank 4, lr {args.lr:g}, mixed precision {args.mixed_precision}.", "",
             "| trainer | median epoch (s) | epoch time / TRL | sampling (s) | training (s) | peak memory (MB) "
             "| memory / TRL | reward, epoch 1 | reward, last 3 epochs | held-out accuracy after |", "|" + " --- |" * 10]
    for variant, results in runs.items():
        t, m = median_epoch(results), float(np.median([r["peak_memory_mb"] for r in results]))
        parts = [median_epoch(results, f"time_{name}_s") for name in ("sampling", "training")]
        lines.append(
            f"| {variant} | {t:.2f} | {t / anchor_time:.2f} | {parts[0]:.2f} | {parts[1]:.2f} | {m:.0f} | {m / anchor_memory:.2f} | "
            f"{np.mean([r['epochs'][0]['reward_mean'] for r in results]):.3f} | "
            f"{np.mean([np.mean([e['reward_mean'] for e in r['epochs'][-3:]]) for r in results]):.3f} | "
            f"{np.mean([r['heldout']['overall'] for r in results]):.3f} |")
    bare = {side: {k: float(np.median([r[k] for r in results])) for k in ("sample_call_s", "train_call_s")}
            for side, results in unet.items()}
    lines += ["", "The same UNet calls alone in each environment (trl_anchor/time_unet.py, rank-4 LoRA, guided batch; "
              "median over seeds):", "",
              "| environment | diffusers | sampling call (s) | training call, forward + backward (s) |", "|" + " --- |" * 4]
    for side, results in unet.items():
        lines.append(f"| {side} | {results[0]['diffusers']} | {bare[side]['sample_call_s']:.3f} | "
                     f"{bare[side]['train_call_s']:.3f} |")
    lines.append(f"| loop_trl / trl | | {bare['loop_trl']['sample_call_s'] / bare['trl']['sample_call_s']:.2f} | "
                 f"{bare['loop_trl']['train_call_s'] / bare['trl']['train_call_s']:.2f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for variant, results in runs.items():
        images = [e["images"] for e in results[0]["epochs"]]
        ax.plot(images, np.mean([[e["reward_mean"] for e in r["epochs"]] for r in results], axis=0), marker=".", label=variant)
    ax.set(xlabel="sampled images", ylabel="mean training reward", title="DDPO work: TRL 0.23.1 vs loop-trl")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "curves.png"), dpi=120)


if __name__ == "__main__":
    main()
