"""LOOP's claims, measured on the shapes testbed with intervals: robustness to hyperparameters, the
number of images per prompt K, and prompts that rarely repeat.

    python benchmarks/loop_claims.py --study rare_prompts      # run what is missing, then report
    python benchmarks/loop_claims.py --study k --report_only   # report from the cached runs only

Each study is a set of cells; a cell is one ``benchmarks/compare_algorithms.py`` invocation with the
training settings of ``benchmarks/results/compare_cosine`` (the example's before issue #23: cosine decay
from lr 2e-3 over 28 epochs of 64 images, steps 0-5 trained, 4 of 6 drawn per trajectory and pass, no
SDE window), so that every study can be read beside those runs, and the cell's own flags, writing under
``benchmarks/results/claims/<study>/<cell>/``. compare_algorithms runs every (method, seed, lr)
in its own process and caches it as ``runs/<name>.json``, so a study spreads over several
sittings: an interrupted command resumes at the first missing run. ``--cells`` runs a part. The cells
that share compare_cosine's settings (the K study's K=4, the robustness grid's lr 2e-3 at clip 2.5x)
start from compare_cosine's runs, copied: training is deterministic, so they would be the same numbers.

Studies:

* ``rare_prompts``: all four prompt families (262 training prompts) instead of the 110 binding
  prompts (the cell ``all_families_tracker`` runs PPO again on them with ``--ppo_min_count 4``, so that its
  tracker engages from a prompt's fourth draw: the same prompts, the tracker on and off). LOOP draws 448 prompts in a run (each about 1.7 times); PPO, one image per prompt,
  draws 1,792 (each 6 or 7 times), more than the testbed's grammar has prompts to keep it at two,
  so PPO runs with ``--ppo_min_count 8``: its tracker never reaches a prompt's own statistics, as
  on a prompt set where each prompt comes back at most twice, and normalises by the batch. The
  same LOOP-minus-PPO difference where prompts repeat comes from the binding runs of
  ``benchmarks/results/compare_cosine`` (tracker engaged for 82% of PPO's rewards).
* ``k``: LOOP at K = 2, 4, 8 with 64 images per epoch (32, 16, 8 prompts), and LOOP at K = 4 with
  64 prompts per epoch (256 images) against PPO's 64 x 1, read against images and against the
  summed epoch times (take those from runs made one at a time).
* ``robustness``: LOOP, PPO and GRPO-style over lr {1e-3, 2e-3, 4e-3} x clip range {1, 2.5, 6.25}
  times ``scaled_clip_range(1e-4, (4, 16, 16))`` = 4e-4 (DDPO's clip range moved to the testbed's
  latent size; the example uses 2.5x, 1e-3), 3 seeds per cell: a heat map per method.

The report (``claims.md`` in the study's folder, also printed) gives, per comparison, each side's
mean over seeds (its standard deviation), the difference with Welch's 95% interval over seeds, the
same difference's interval from the evaluation images alone, whether it is separated, and the
seeds per method a two-sided t-test would need to separate a difference of that size with 80%
power (``benchmarks/separation.py``).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from separation import difference_interval, evaluation_interval, seeds_to_separate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "claims")
#: benchmarks/results/compare_cosine's training settings (docs/benchmarks.md's second comparison)
CURRENT = ["--epochs", "28", "--lr_scheduler", "cosine", "--timestep_stop", "-4", "--timestep_fraction", "0.67",
           "--timesteps_per_forward", "4", "--sample_batch_size", "64", "--eval_every", "7"]
ALL_FAMILIES = ["--families", "single", "binding", "counting", "spatial"]
#: DDPO's 1e-4 for SD 1.x latents moved to the testbed's 4x16x16 (loop_trl.objective.scaled_clip_range)
CLIP_UNIT = 4e-4
CLIP_MULTIPLES = (1.0, 2.5, 6.25)
LEARNING_RATES = ("1e-3", "2e-3", "4e-3")

COMPARE_COSINE = os.path.join(HERE, "results", "compare_cosine")
#: cells whose flags are compare_cosine's but for the methods and learning rates: training is deterministic,
#: so their runs at lr 2e-3 are compare_cosine's (the K study's K=4 runs of seeds 0 and 2, trained again,
#: matched compare_cosine's in every logged number) and are copied from there instead of trained again
SAME_AS_COMPARE_COSINE = {"k": ["equal_images"], "robustness": ["clip2.5x"]}

#: a timing cell's own epochs, evaluations and seed (a cell that names --seeds is not given the study's)
TIMING = ["--epochs", "3", "--eval_every", "3", "--seeds", "0"]

STUDIES: dict[str, dict[str, list[str]]] = {
    "rare_prompts": {
        "all_families": CURRENT + ALL_FAMILIES + ["--methods", "loop", "ppo", "--ppo_min_count", "8"],
        # the same prompts, PPO's tracker allowed to engage from a prompt's fourth draw (DDPO's setting here)
        "all_families_tracker": CURRENT + ALL_FAMILIES + ["--methods", "ppo", "--ppo_min_count", "4"],
    },
    "k": {
        "equal_images": CURRENT + ["--methods", "loop_k2", "loop", "loop_k8"],
        "equal_prompts": CURRENT + ["--methods", "loop", "--images_per_epoch", "256"],
        # the time axis: 3 epochs of each setting, seed 0, to be run with nothing else on the machine
        # (the long cells may run two at a time, which makes their own epoch times useless as timings)
        "timing": CURRENT + ["--methods", "loop_k2", "loop", "loop_k8", "ppo", *TIMING],
        "timing_256": CURRENT + ["--methods", "loop", "--images_per_epoch", "256", *TIMING],
    },
    "robustness": {
        f"clip{m:g}x": CURRENT + ["--methods", "loop", "ppo", "grpo", "--clip_range", f"{CLIP_UNIT * m:.6g}",
                                  "--learning_rates", *LEARNING_RATES]
        for m in CLIP_MULTIPLES
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--study", required=True, choices=list(STUDIES), help="which claim to measure")
    parser.add_argument("--cells", nargs="+", default=None, help="run only these cells of the study (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every method and cell, to train and to report")
    parser.add_argument("--results", default=RESULTS, help="folder of the studies' cells")
    parser.add_argument("--report_only", action="store_true", help="report from the cached runs; train nothing")
    return parser.parse_args(argv)


def flag_values(flags: list[str], name: str) -> list[str]:
    """The values after ``name`` in a command line, up to the next ``--`` flag."""
    start = flags.index(name) + 1
    end = next((i for i in range(start, len(flags)) if flags[i].startswith("--")), len(flags))
    return flags[start:end]


def reuse_compare_cosine(cell_folder: str, flags: list[str], seeds: list[int]) -> list[str]:
    """Copy into ``cell_folder`` the compare_cosine runs at lr 2e-3 of the cell's methods and ``seeds`` (and the
    base model's evaluation) that the cell lacks; returns the names copied."""
    from compare_algorithms import run_name  # its cache's file names (imported here: it imports torch)

    copied = []
    os.makedirs(os.path.join(cell_folder, "runs"), exist_ok=True)
    names = ["base.json"] + [run_name(m, s, 2e-3) + ".json" for m in flag_values(flags, "--methods") for s in seeds]
    for name in names:
        source, target = os.path.join(COMPARE_COSINE, "runs", name), os.path.join(cell_folder, "runs", name)
        if os.path.exists(source) and not os.path.exists(target):
            shutil.copyfile(source, target)
            copied.append(name)
    return copied


def load_runs(folder: str, seeds=None) -> list[dict]:
    """Every finished run of one compare_algorithms folder (base.json left out), of ``seeds`` only if given."""
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "runs", "*.json"))):
        if os.path.basename(path) != "base.json":
            with open(path) as f:
                run = json.load(f)
            if seeds is None or run["seed"] in seeds:
                runs.append(run)
    return runs


def final(run: dict, metric: str) -> tuple[float, float]:
    """A run's last value of ``metric`` and its standard error over the evaluation images."""
    if metric == "train_strict":
        return run["evals"][-1]["strict"], run["evals"][-1]["strict_sem"]
    if metric.startswith("train_strict@"):  # at a number of sampled images along the way
        point = next(e for e in run["evals"] if e["images"] == int(metric.split("@")[1]))
        return point["strict"], point["strict_sem"]
    if metric == "heldout_strict":
        return run["heldout"]["overall"], run["heldout"]["overall_sem"]
    raise ValueError(f"unknown metric {metric!r}")


def pooled_sd(a, b) -> float:
    """The two sides' standard deviation over seeds (ddof 1), pooled with equal weight."""
    return float(np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2))


def seeds_text(needed: int) -> str:
    return f"{needed}" if needed < 10_000 else "> 10,000"


def compare(name: str, a: list[dict], b: list[dict], metric: str) -> dict:
    """One comparison row: side a minus side b on ``metric``, over the seeds each side has."""
    values_a, sems_a = zip(*(final(r, metric) for r in a))
    values_b, sems_b = zip(*(final(r, metric) for r in b))
    interval = difference_interval(values_a, values_b)
    eval_low, eval_high = evaluation_interval(interval["diff"], float(np.mean(sems_a)), float(np.mean(sems_b)),
                                              min(len(a), len(b)))
    return {"comparison": name, "metric": metric, "seeds": (len(a), len(b)),
            "a": (float(np.mean(values_a)), float(np.std(values_a, ddof=1))),
            "b": (float(np.mean(values_b)), float(np.std(values_b, ddof=1))),
            **interval, "eval_low": eval_low, "eval_high": eval_high,
            "seeds_needed": seeds_to_separate(interval["diff"], pooled_sd(values_a, values_b))}


def tracker_engaged(runs: list[dict]) -> float:
    values = [e["tracker_engaged_fraction"] for r in runs for e in r["epochs"] if e.get("tracker_engaged_fraction") is not None]
    return float(np.mean(values)) if values else float("nan")


def comparison_table(rows: list[dict]) -> list[str]:
    lines = ["| comparison (a - b) | metric | seeds | a: mean (sd) | b: mean (sd) | a - b [95% over seeds] | "
             "[95% from evaluation images] | separated | seeds per method to separate (80% power) |",
             "|" + " --- |" * 9]
    for r in rows:
        lines.append(f"| {r['comparison']} | {r['metric']} | {r['seeds'][0]}, {r['seeds'][1]} | {r['a'][0]:.3f} ({r['a'][1]:.3f}) | "
                     f"{r['b'][0]:.3f} ({r['b'][1]:.3f}) | {r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | "
                     f"[{r['eval_low']:+.3f}, {r['eval_high']:+.3f}] | {'yes' if r['separated'] else 'no'} | "
                     f"{seeds_text(r['seeds_needed'])} |")
    return lines


def by_method(runs: list[dict], method: str, lr: float | None = None) -> list[dict]:
    return [r for r in runs if r["method"] == method and (lr is None or abs(r["lr"] - lr) < 1e-12)]


def report_rare_prompts(folder: str, seeds=None) -> list[str]:
    rare = load_runs(os.path.join(folder, "all_families"), seeds)
    loop_rare = by_method(rare, "loop")
    tracker = by_method(load_runs(os.path.join(folder, "all_families_tracker"), seeds), "ppo")
    repeated = load_runs(COMPARE_COSINE, seeds)
    lines, rows = [], []
    for label, loop, ppo in (("262 prompts, PPO's tracker never engaged", loop_rare, by_method(rare, "ppo")),
                             ("262 prompts, PPO's tracker from a prompt's 4th draw", loop_rare, tracker),
                             ("110 binding prompts (compare_cosine)", by_method(repeated, "loop"), by_method(repeated, "ppo"))):
        if len(loop) >= 2 and len(ppo) >= 2:
            rows += [compare(f"LOOP - PPO, {label}", loop, ppo, m) for m in ("train_strict", "heldout_strict")]
            lines.append(f"- {label}: PPO's tracker normalised {tracker_engaged(ppo):.0%} of its rewards by the prompt's own statistics.")
    if len(by_method(rare, "ppo")) >= 2 and len(tracker) >= 2:  # what the tracker itself is worth to PPO on these prompts
        rows += [compare("PPO without - with its tracker, 262 prompts", by_method(rare, "ppo"), tracker, "train_strict")]
    return comparison_table(rows) + [""] + lines


def epoch_seconds_alone(folder: str) -> dict[str, float]:
    """Median seconds per training epoch of each K setting, from the timing cells (seed 0, run alone);
    keys are the labels of :func:`report_k`. Empty where the timing cells have not run."""
    timing, timing_256 = load_runs(os.path.join(folder, "timing")), load_runs(os.path.join(folder, "timing_256"))
    labels = {"loop_k2": "K=2", "loop": "K=4", "loop_k8": "K=8", "ppo": "PPO"}
    seconds = {labels[r["method"]]: float(np.median([e["time_epoch_s"] for e in r["epochs"]])) for r in timing}
    seconds.update({"K=4, 256 images/epoch": float(np.median([e["time_epoch_s"] for e in r["epochs"]])) for r in timing_256})
    return seconds


def report_k(folder: str, seeds=None) -> list[str]:
    equal_images = load_runs(os.path.join(folder, "equal_images"), seeds)
    equal_prompts = load_runs(os.path.join(folder, "equal_prompts"), seeds)
    ppo = by_method(load_runs(COMPARE_COSINE, seeds), "ppo")
    rows = []
    k4 = by_method(equal_images, "loop")
    for other in ("loop_k2", "loop_k8"):
        if len(k4) >= 2 and len(by_method(equal_images, other)) >= 2:
            rows += [compare(f"{other} - loop (K=4), equal images", by_method(equal_images, other), k4, m)
                     for m in ("train_strict", "heldout_strict")]
    if len(equal_prompts) >= 2 and len(ppo) >= 2:
        rows += [compare("LOOP K=4 x 64 prompts - PPO 64 x 1, equal prompts", by_method(equal_prompts, "loop"), ppo, m)
                 for m in ("train_strict", "heldout_strict")]
        images = ppo[0]["evals"][-1]["images"]  # the same comparison where both have sampled PPO's images
        if all(any(e["images"] == images for e in r["evals"]) for r in equal_prompts):
            rows.append(compare(f"LOOP K=4 x 64 prompts - PPO 64 x 1, both at {images:,} images",
                                by_method(equal_prompts, "loop"), ppo, f"train_strict@{images}"))
    groups = {"K=2": by_method(equal_images, "loop_k2"), "K=4": k4, "K=8": by_method(equal_images, "loop_k8"),
              "K=4, 256 images/epoch": by_method(equal_prompts, "loop"), "PPO": ppo}
    alone = epoch_seconds_alone(folder)
    time_column = ("training time: epochs x median epoch alone (s)" if alone
                   else "summed epoch time (s; the runs' own, not a timing if they shared the machine)")
    lines = comparison_table(rows) + ["", f"| run | images | {time_column} | final strict (mean over seeds) |",
                                      "| --- | --- | --- | --- |"]
    for label, runs in groups.items():
        if runs:
            seconds = (len(runs[0]["epochs"]) * alone[label] if label in alone
                       else np.mean([sum(e["time_epoch_s"] for e in r["epochs"]) for r in runs]))
            lines.append(f"| {label} | {runs[0]['epochs'][-1]['images']} | {seconds:.0f} | "
                         f"{np.mean([final(r, 'train_strict')[0] for r in runs]):.3f} |")
    plot_k(folder, groups, alone)
    return lines


def plot_k(folder: str, groups: dict[str, list[dict]], alone: dict[str, float]) -> None:
    """Training-prompt accuracy against sampled images and against training time (epochs x the median
    epoch measured alone where ``alone`` has it, else the runs' own summed epoch times), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs in groups.items():
        if not runs:
            continue
        points = [r["evals"] for r in runs]
        images = [p["images"] for p in points[0]]
        mean = np.mean([[p["strict"] for p in run] for run in points], axis=0)
        per_epoch = (np.full(len(runs[0]["epochs"]), alone[label]) if label in alone
                     else np.mean([[e["time_epoch_s"] for e in r["epochs"]] for r in runs], axis=0))
        images_per_epoch = runs[0]["epochs"][0]["images"]
        seconds = [float(np.sum(per_epoch[:i // images_per_epoch])) for i in images]
        axes[0].plot(images, mean, marker="o", label=label)
        axes[1].plot(seconds, mean, marker="o", label=label)
    axes[0].set(xlabel="sampled images", ylabel="strict accuracy, fixed training prompts")
    axes[1].set(xlabel="training time (s)" + (", epochs x median epoch alone" if alone else ", summed epoch times"),
                ylabel="strict accuracy, fixed training prompts")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("LOOP's K: mean over seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "k_curves.png"), dpi=120)
    plt.close(fig)


def robustness_cells(folder: str, seeds=None) -> list[list[dict]]:
    """Each clip row's runs (every method and lr), read once for the whole report."""
    return [load_runs(os.path.join(folder, f"clip{multiple:g}x"), seeds) for multiple in CLIP_MULTIPLES]


def cell_values(runs: list[dict], method: str, lr: str, metric: str = "train_strict") -> list[float]:
    """``metric`` of each seed of ``method`` at ``lr`` in one clip row's runs."""
    return [final(r, metric)[0] for r in by_method(runs, method, float(lr))]


def robustness_grid(cells: list[list[dict]], method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean final strict, its standard error over seeds, seeds) per (clip multiple, lr) cell of ``method``."""
    shape = (len(CLIP_MULTIPLES), len(LEARNING_RATES))
    mean, sem, count = np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, dtype=int)
    for i, runs in enumerate(cells):
        for j, lr in enumerate(LEARNING_RATES):
            values = cell_values(runs, method, lr)
            count[i, j] = len(values)
            if values:
                mean[i, j] = np.mean(values)
                sem[i, j] = np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
    return mean, sem, count


def grid_table(title: str, entry) -> list[str]:
    """A clip range x learning rate table in markdown; ``entry(i, j)`` is the text of one cell."""
    return (["", title, "", "| clip range | " + " | ".join(f"lr {lr}" for lr in LEARNING_RATES) + " |",
             "|" + " --- |" * (len(LEARNING_RATES) + 1)]
            + [f"| {multiple:g}x | " + " | ".join(entry(i, j) for j in range(len(LEARNING_RATES))) + " |"
               for i, multiple in enumerate(CLIP_MULTIPLES)])


def report_robustness(folder: str, seeds=None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| method | cells with runs | worst cell (clip x, lr) | best cell | mean over cells | sd over cells |",
             "| --- | --- | --- | --- | --- | --- |"]
    cells = robustness_cells(folder, seeds)
    grids = {method: robustness_grid(cells, method) for method in ("loop", "ppo", "grpo")}
    finite = np.concatenate([g[0][np.isfinite(g[0])] for g in grids.values()])
    scale = dict(vmin=float(finite.min()), vmax=float(finite.max())) if finite.size else {}  # one colour scale
    for method, (mean, sem, count) in grids.items():
        if not np.isfinite(mean).any():
            continue
        worst, best = np.unravel_index(np.nanargmin(mean), mean.shape), np.unravel_index(np.nanargmax(mean), mean.shape)
        cell = lambda ij: f"{mean[ij]:.3f} ({CLIP_MULTIPLES[ij[0]]:g}x, {LEARNING_RATES[ij[1]]})"  # noqa: E731
        lines.append(f"| {method} | {int(np.isfinite(mean).sum())} of {mean.size} | {cell(worst)} | {cell(best)} | "
                     f"{np.nanmean(mean):.3f} | {np.nanstd(mean, ddof=1) if np.isfinite(mean).sum() > 1 else float('nan'):.3f} |")
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        image = ax.imshow(mean, cmap="viridis", origin="lower", **scale)
        for i in range(mean.shape[0]):
            for j in range(mean.shape[1]):
                if count[i, j]:
                    spread = f"\n±{sem[i, j]:.3f}" if count[i, j] > 1 else ""
                    ax.text(j, i, f"{mean[i, j]:.3f}{spread}\nn={count[i, j]}", ha="center", va="center",
                            fontsize=7, color="white")
        ax.set_xticks(range(len(LEARNING_RATES)), LEARNING_RATES)
        ax.set_yticks(range(len(CLIP_MULTIPLES)), [f"{m:g}x ({CLIP_UNIT * m:.1e})" for m in CLIP_MULTIPLES])
        ax.set(xlabel="learning rate", ylabel="clip range (x DDPO's, scaled)", title=f"{method}: final strict accuracy")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"robustness_{method}.png"), dpi=120)
        plt.close(fig)
    for method, (mean, sem, count) in grids.items():  # the heat maps' numbers as a table
        if np.isfinite(mean).any():
            lines += grid_table(f"{method}: final strict accuracy per cell, mean +- standard error over seeds (seeds):",
                                lambda i, j: "" if not count[i, j] else f"{mean[i, j]:.3f}"
                                + (f" +- {sem[i, j]:.3f}" if count[i, j] > 1 else "") + f" ({count[i, j]})")
    loop, ppo = grids["loop"][0], grids["ppo"][0]
    both = np.isfinite(loop) & np.isfinite(ppo)
    if both.any():
        intervals = {}  # (i, j) -> Welch's interval, where both methods have 2 or more seeds
        for i, runs in enumerate(cells):
            for j, lr in enumerate(LEARNING_RATES):
                values = [cell_values(runs, m, lr) for m in ("loop", "ppo")]
                if min(map(len, values)) >= 2:
                    intervals[i, j] = difference_interval(*values)
        lines += grid_table("LOOP - PPO per cell (means over seeds; [Welch's 95% over seeds] where both have 2 or more):",
                            lambda i, j: (f"{loop[i, j] - ppo[i, j]:+.3f}" if both[i, j] else "")
                            + (f" [{intervals[i, j]['low']:+.3f}, {intervals[i, j]['high']:+.3f}]" if (i, j) in intervals else ""))
        separated = [np.sign(d["diff"]) for d in intervals.values() if d["separated"]]
        lines += ["", f"LOOP ahead of PPO in {int((loop > ppo)[both].sum())} of {int(both.sum())} cells"
                  + (f"; separated in {len(separated)} of {len(intervals)} (LOOP ahead in "
                     f"{separated.count(1)}, PPO in {separated.count(-1)})." if intervals else ".")]
    return lines + grid_statistics(cells)


def seed_grids(cells: list[list[dict]], method: str, metric: str = "train_strict") -> dict[int, np.ndarray]:
    """Each seed's own grid of ``metric`` of ``method``, for the seeds with a run in every cell."""
    grids: dict[int, np.ndarray] = {}
    for i, runs in enumerate(cells):
        for r in by_method(runs, method):
            grid = grids.setdefault(r["seed"], np.full((len(CLIP_MULTIPLES), len(LEARNING_RATES)), np.nan))
            grid[i, [abs(float(lr) - r["lr"]) < 1e-12 for lr in LEARNING_RATES]] = final(r, metric)[0]
    return {seed: grid for seed, grid in sorted(grids.items()) if np.isfinite(grid).all()}


#: what one seed's whole grid says about a method's robustness: where a user lands on average over the
#: settings, in the worst setting, and how far the settings spread
GRID_STATISTICS = {"mean over cells": np.mean, "worst cell": np.min, "sd over cells": lambda g: float(np.std(g, ddof=1))}


def grid_statistics(cells: list[list[dict]]) -> list[str]:
    """Robustness with intervals: each seed that ran every cell is one replicate of the whole grid, so a
    statistic of the grid has one value per seed and LOOP - PPO gets Welch's interval over those seeds.
    A single seed's worst cell and sd over cells carry that seed's noise too; the noise floor line gives
    the sd over cells that seed noise alone would make (the within-cell sd over seeds, pooled)."""
    per_metric = {metric: {m: seed_grids(cells, m, metric) for m in ("loop", "ppo", "grpo")}
                  for metric in ("train_strict", "heldout_strict")}
    per_method = per_metric["train_strict"]
    present = [m for m, g in per_method.items() if len(g) >= 2]
    if "loop" not in present or len(present) < 2:
        return []
    lines = ["", "Statistics of one seed's whole grid (each seed that ran all 9 cells is one replicate):", "",
             "| statistic | metric | " + " | ".join(f"{m}: mean (sd) over {len(per_method[m])} seeds" for m in present)
             + " | " + " | ".join(f"loop - {m} [95% over seeds] (seeds per method to separate)" for m in present if m != "loop")
             + " |", "|" + " --- |" * (2 + 2 * len(present) - 1)]
    for (name, statistic), metric in itertools.product(GRID_STATISTICS.items(), per_metric):
        values = {m: [float(statistic(g)) for g in per_metric[metric][m].values()] for m in present}
        row = [f"{np.mean(values[m]):.3f} ({np.std(values[m], ddof=1):.3f})" for m in present]
        for m in present:
            if m != "loop":
                d = difference_interval(values["loop"], values[m])
                needed = seeds_to_separate(d["diff"], pooled_sd(values["loop"], values[m]))
                row.append(f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{' separated' if d['separated'] else ''} "
                           f"({seeds_text(needed)})")
        lines.append(f"| {name} | {metric} | " + " | ".join(row) + " |")
    floor = [f"{m} {np.sqrt(np.mean(np.var(np.stack(list(per_method[m].values())), axis=0, ddof=1))):.3f}" for m in present]
    lines += ["", "Noise floor of the sd over cells (within-cell sd over seeds, pooled over cells): " + ", ".join(floor) + "."]
    return lines


REPORTS = {"rare_prompts": report_rare_prompts, "k": report_k, "robustness": report_robustness}


def main(argv=None) -> None:
    args = parse_args(argv)
    folder = os.path.join(args.results, args.study)
    cells = STUDIES[args.study]
    unknown = set(args.cells or ()) - set(cells)
    if unknown:
        raise SystemExit(f"unknown cell(s) {sorted(unknown)} of study {args.study!r}; choose from {list(cells)}")
    if not args.report_only:
        for cell in args.cells or cells:
            seeds = [] if "--seeds" in cells[cell] else ["--seeds", *map(str, args.seeds)]
            if cell in SAME_AS_COMPARE_COSINE.get(args.study, []):
                for name in reuse_compare_cosine(os.path.join(folder, cell), cells[cell], args.seeds):
                    print(f"copied {name} from {os.path.relpath(COMPARE_COSINE, HERE)} (the same settings)", flush=True)
            command = [sys.executable, os.path.join(HERE, "compare_algorithms.py"), "--output_dir",
                       os.path.join(folder, cell), *cells[cell], *seeds]
            print("$", " ".join(command[1:]), flush=True)
            subprocess.run(command, check=True)
    os.makedirs(folder, exist_ok=True)
    text = "\n".join(REPORTS[args.study](folder, args.seeds)) + "\n"
    with open(os.path.join(folder, "claims.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
