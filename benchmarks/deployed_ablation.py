"""What makes the gain survive the deployed sampler: training settings x seeds, each adapter sampled as users sample.

    python benchmarks/deployed_ablation.py --settings previous_defaults,early_steps --seeds 0,1,2 --work runs

For every (setting, seed) this trains ``examples/train_shapes.py`` with the setting's flags (given in
full, so that a cached result keeps its meaning when the example's defaults change; the adapter goes
under ``--work``), then loads the adapter into a plain diffusers
``StableDiffusionPipeline`` (DDIM eta 0) and measures strict accuracy at every guidance scale, on the
example's 48 fixed training prompts x 4 images from fixed noise (``benchmarks/deployed_sampler.py``'s
measurement). The base model is measured once. Each result is cached as one JSON file under
``--results``, so an interrupted study resumes where it stopped and a finished one only prints.

Printed per setting, mean and standard deviation over seeds: the strict gain under the training
sampler (the example's own evaluation), under the plain pipeline at the training guidance, the share of the
first that the second keeps, and the best guidance against the base model's best guidance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "train_shapes.py")

#: what every setting before the current defaults ran with: 28 epochs (evaluated and saved halfway), no SDE window
BEFORE_WINDOW = ["--num_epochs", "28", "--save_freq", "14", "--eval_freq", "14", "--sample_sde_window", "false"]
#: the example's defaults before issue #23 (steps 0-5 eligible, 4 of 6 drawn), which most settings change one thing of
PREVIOUS = BEFORE_WINDOW + ["--train_timestep_stop", "-4", "--train_timestep_fraction", "0.67"]
#: steps 0-3, all four trained: the example's defaults from issue #23's first round
EARLY_STEPS = BEFORE_WINDOW + ["--train_timestep_stop", "-6", "--train_timestep_fraction", "1.0"]
EPOCHS48 = ["--num_epochs", "48", "--save_freq", "24", "--eval_freq", "24"]
#: the example's defaults since 2026-12-07: early steps, only they stochastic (the SDE window), 40 epochs
ADOPTED = "early_steps_sde_window_epochs40"

#: name -> the example's flags, each given in full (a later flag wins over an earlier one), so that a
#: setting's meaning, and its cached result's, does not move with the example's defaults
SETTINGS = {
    "previous_defaults": PREVIOUS,
    "guidance3": PREVIOUS + ["--sample_guidance_scale", "3"],
    "sde_window": PREVIOUS + ["--sample_sde_window", "true"],
    "beta0.1": PREVIOUS + ["--beta", "0.1"],
    "epochs48": PREVIOUS + EPOCHS48,
    "all_steps": BEFORE_WINDOW + ["--train_timestep_stop", "10", "--train_timestep_fraction", "0.4"],
    "early_steps": EARLY_STEPS,
    "early_steps_sde_window": EARLY_STEPS + ["--sample_sde_window", "true"],
    "early_steps_epochs48": EARLY_STEPS + EPOCHS48,
    "early_steps_eta0.5": EARLY_STEPS + ["--sample_eta", "0.5"],
    "early_steps_guidance3": EARLY_STEPS + ["--sample_guidance_scale", "3"],
    "early_steps_strict_bonus0.5": EARLY_STEPS + ["--strict_bonus", "0.5"],
    ADOPTED: EARLY_STEPS + ["--sample_sde_window", "true", "--num_epochs", "40", "--save_freq", "20", "--eval_freq", "20"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="early_steps", help=f"comma-separated names out of: {', '.join(SETTINGS)}")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--guidance", default="1,3,5,7.5", help="guidance scales of the plain pipeline")
    parser.add_argument("--steps", type=int, default=10, help="steps of the plain pipeline")
    parser.add_argument("--results", default=os.path.join(HERE, "results", "deployed_ablation"), help="cached results (JSON)")
    parser.add_argument("--work", default="deployed-ablation-runs", help="where the trained adapters go")
    parser.add_argument("--train_only", action="store_true", help="train the missing adapters, measure nothing")
    return parser.parse_args(argv)


def plain_pipeline_grid(adapter: str | None, scales: list[float], steps: int) -> dict:
    """Strict accuracy of the base model (adapter None) or an adapter, per guidance scale."""
    from loop_trl.testbeds.shapes import evaluate_plain_pipeline, load_pipeline, train_eval_prompts

    prompts = train_eval_prompts(48)["binding"]  # the example's evaluation prompts (its --families default)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(adapter)
    return {f"{g:g}": evaluate_plain_pipeline(pipe, prompts, 4, 1, steps, g) for g in scales}


def train(flags: list[str], seed: int, folder: str) -> None:
    """Run the example into ``folder`` unless a finished run is there."""
    if not os.path.exists(os.path.join(folder, "metrics.json")):
        subprocess.run([sys.executable, EXAMPLE, "--output_dir", folder, "--seed", str(seed), "--no_diffusers_check", *flags],
                       check=True)


def training_guidance(flags: list[str]) -> str:
    """The guidance scale a setting trains (and the example evaluates) with, as the grid's key."""
    return f"{float(flags[flags.index('--sample_guidance_scale') + 1]):g}" if "--sample_guidance_scale" in flags else "1"


def summarize(rows: list[dict], base: dict) -> dict:
    """Mean and standard deviation over seeds of the gains one setting's rows show."""
    best_base = max(m["strict"] for m in base.values())
    gains = {"training sampler": [r["training_gain"] for r in rows],
             "plain, training guidance": [r["grid"][r["training_guidance"]]["strict"] - base[r["training_guidance"]]["strict"]
                                          for r in rows],
             "best vs best": [max(m["strict"] for m in r["grid"].values()) - best_base for r in rows]}
    gains["kept share"] = [p / t if t else float("nan") for p, t in zip(gains["plain, training guidance"], gains["training sampler"])]
    def spread(values):  # a seed that learned nothing has no kept share (0 / 0): left out of the mean, shown as nan
        finite = [x for x in values if math.isfinite(x)]
        return (statistics.mean(finite) if finite else float("nan"),
                statistics.stdev(finite) if len(finite) > 1 else 0.0, values)

    return {k: spread(v) for k, v in gains.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    scales = [float(g) for g in args.guidance.split(",")]
    os.makedirs(args.results, exist_ok=True)
    base_file = os.path.join(args.results, f"base_{args.steps}_steps.json")
    if not args.train_only and not os.path.exists(base_file):
        with open(base_file, "w") as f:
            json.dump(plain_pipeline_grid(None, scales, args.steps), f, indent=1)
    rows: dict[str, list[dict]] = {}
    for name in names:
        for seed in seeds:
            result_file = os.path.join(args.results, f"{name}_seed{seed}_{args.steps}_steps.json")
            if not os.path.exists(result_file):
                folder = os.path.join(args.work, f"{name}_seed{seed}")
                train(SETTINGS[name], seed, folder)
                if args.train_only:
                    continue
                with open(os.path.join(folder, "metrics.json")) as f:
                    example = json.load(f)
                before, after = example["train_prompts_before"], example["train_prompts_after"]
                row = {"setting": name, "seed": seed, "flags": SETTINGS[name],
                       "minutes": example["minutes"], "training_guidance": training_guidance(SETTINGS[name]),
                       "training_before": before["eval/strict_mean"], "training_after": after["eval/strict_mean"],
                       "training_gain": after["eval/strict_mean"] - before["eval/strict_mean"],
                       "heldout_before": example["heldout_before"]["overall"], "heldout_after": example["heldout_after"]["overall"],
                       "grid": plain_pipeline_grid(folder, scales, args.steps)}
                with open(result_file, "w") as f:
                    json.dump(row, f, indent=1)
            with open(result_file) as f:
                rows.setdefault(name, []).append(json.load(f))
    if args.train_only:
        return
    with open(base_file) as f:
        base = json.load(f)
    print(f"\nstrict accuracy gains over the base model, plain StableDiffusionPipeline (DDIM eta 0, {args.steps} steps) "
          f"on 48 training prompts x 4 images; base: " + ", ".join(f"g {g} {m['strict']:.3f}" for g, m in base.items()))
    print("mean +- standard deviation over seeds (per seed in brackets)\n")
    columns = ["training sampler", "plain, training guidance", "kept share", "best vs best"]
    print("| setting | seeds | " + " | ".join(columns) + " |")
    print("| --- | --- |" + " --- |" * len(columns))
    for name, setting_rows in rows.items():
        stats = summarize(setting_rows, base)
        cells = [f"{m:+.3f} +- {s:.3f} ({', '.join(f'{x:+.3f}' for x in v)})" for m, s, v in (stats[c] for c in columns)]
        print(f"| {name} | {len(setting_rows)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
