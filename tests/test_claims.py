"""The statistics behind docs/benchmarks.md's claims (benchmarks/separation.py) and the claims report
(benchmarks/loop_claims.py) read from cached runs."""

import json
import os
import sys

import numpy as np
import pytest
from scipy import stats

from test_examples import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import loop_claims  # noqa: E402
from separation import difference_interval, evaluation_interval, seeds_to_separate  # noqa: E402


def test_the_interval_over_seeds_is_welchs_and_covers_the_true_difference_95_percent_of_the_time():
    a, b = [0.29, 0.37, 0.22], [0.27, 0.32, 0.25, 0.30]
    ours = difference_interval(a, b)
    theirs = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (ours["low"], ours["high"]) == pytest.approx((theirs.low, theirs.high), abs=1e-12)
    rng = np.random.default_rng(0)
    covered = 0
    trials = 3000
    for _ in range(trials):  # three seeds each, the methods varying unequally over seeds, true difference 0.05
        x, y = rng.normal(0.35, 0.06, 3), rng.normal(0.30, 0.02, 3)
        interval = difference_interval(x, y)
        covered += interval["low"] <= 0.05 <= interval["high"]
    assert 0.93 <= covered / trials <= 0.975  # Welch is slightly conservative at n = 3
    assert difference_interval([0.1, 0.1], [0.1, 0.1])["separated"] is False
    with pytest.raises(ValueError, match="at least 2 seeds"):
        difference_interval([0.3], [0.2, 0.25])


def test_the_seeds_needed_match_the_published_power_tables_and_simulation():
    # two-sided two-sample t-test, alpha 0.05, power 0.8 (Cohen 1988; G*Power gives the same): d = 0.5 -> 64, 0.8 -> 26, 1 -> 17
    assert [seeds_to_separate(d, 1.0) for d in (0.5, 0.8, 1.0)] == [64, 26, 17]
    assert seeds_to_separate(-0.8, 1.0) == 26 and seeds_to_separate(0.0, 0.05) == 10_000
    assert seeds_to_separate(0.087, 1e-17) == 2  # a huge effect (scipy's noncentral t gives nan there) needs the fewest
    assert seeds_to_separate(0.0, 0.0) == 10_000 and seeds_to_separate(0.01, 0.0) == 2
    n = seeds_to_separate(0.04, 0.03)
    rng = np.random.default_rng(1)

    def power(seeds):
        x, y = rng.normal(0.04, 0.03, (4000, seeds)), rng.normal(0.0, 0.03, (4000, seeds))
        return float(np.mean(stats.ttest_ind(x, y, axis=1).pvalue < 0.05))

    assert power(n) >= 0.78 and power(n - 1) < 0.8


def test_the_evaluation_interval_shrinks_with_seeds():
    low, high = evaluation_interval(0.02, 0.03, 0.04, seeds=1)
    assert (high - low) / 2 == pytest.approx(1.959964 * 0.05, rel=1e-5)
    low3, high3 = evaluation_interval(0.02, 0.03, 0.04, seeds=4)
    assert (high3 - low3) == pytest.approx((high - low) / 2, rel=1e-9)


def fake_run(method, seed, lr, final_strict, heldout, images_per_epoch=64, epochs=4, engaged=None):
    return {"method": method, "seed": seed, "lr": lr, "peak_memory_mb": 1.0,
            "epochs": [{"epoch": e + 1, "images": (e + 1) * images_per_epoch, "reward_mean": 0.5, "time_epoch_s": 10.0,
                        "tracker_engaged_fraction": engaged} for e in range(epochs)],
            "evals": [{"images": 0, "strict": 0.14, "strict_sem": 0.025, "score": 0.4},
                      {"images": epochs * images_per_epoch, "strict": final_strict, "strict_sem": 0.03, "score": 0.5}],
            "heldout": {"overall": heldout, "overall_sem": 0.04}}


def write_runs(folder, runs):
    os.makedirs(folder / "runs", exist_ok=True)
    for r in runs:
        (folder / "runs" / f"{r['method']}_seed{r['seed']}_lr{r['lr']:g}.json").write_text(json.dumps(r))


def test_the_rare_prompt_report_compares_loop_with_ppo_and_says_whether_it_is_separated(tmp_path, capsys):
    cell = tmp_path / "rare_prompts" / "all_families"
    write_runs(cell, [fake_run("loop", s, 2e-3, 0.40 + 0.01 * s, 0.35) for s in range(3)]
               + [fake_run("ppo", s, 2e-3, 0.20 + 0.01 * s, 0.35, engaged=0.0) for s in range(3)])
    loop_claims.main(["--study", "rare_prompts", "--report_only", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| LOOP - PPO, 262 prompts") and "train_strict" in line)
    assert "| +0.200 [+0." in row and "| yes |" in row  # 0.41 - 0.21, every seed 0.2 apart
    assert "tracker never engaged: PPO's tracker normalised 0% of its rewards" in out
    assert "4th draw" not in out  # that cell has no runs yet: no row
    write_runs(tmp_path / "rare_prompts" / "all_families_tracker",
               [fake_run("ppo", s, 2e-3, 0.30 + 0.02 * s, 0.35, engaged=0.4) for s in range(3)])
    loop_claims.main(["--study", "rare_prompts", "--report_only", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| LOOP - PPO, 262 prompts, PPO's tracker from")
               and "train_strict" in line)
    assert "| 0.410 (0.010) | 0.320 (0.020) | +0.090 [" in row
    assert "| PPO without - with its tracker, 262 prompts | train_strict | 3, 3 | 0.210 (0.010) | 0.320 (0.020) | -0.110 [" in out
    assert "from a prompt's 4th draw: PPO's tracker normalised 40% of its rewards" in out
    assert (tmp_path / "rare_prompts" / "claims.md").read_text() == out.rstrip("\n") + "\n"
    with pytest.raises(SystemExit, match="unknown cell"):
        loop_claims.main(["--study", "rare_prompts", "--cells", "nope", "--results", str(tmp_path)])


def test_the_k_report_reads_images_and_time_and_draws_the_curves(tmp_path, capsys):
    study = tmp_path / "k"
    write_runs(study / "equal_images", [fake_run(m, s, 2e-3, v + 0.02 * s, 0.3) for s in range(3)
                                        for m, v in (("loop_k2", 0.25), ("loop", 0.30), ("loop_k8", 0.28))])
    write_runs(study / "equal_prompts", [fake_run("loop", s, 2e-3, 0.45, 0.4, images_per_epoch=256) for s in range(3)])
    loop_claims.main(["--study", "k", "--report_only", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "both at" not in out  # the fake runs never evaluated at PPO's 1,792 images
    assert "| loop_k2 - loop (K=4), equal images | train_strict | 3, 3 | 0.270 (0.020) | 0.320 (0.020) | -0.050" in out
    assert "| K=4, 256 images/epoch | 1024 | 40 | 0.450 |" in out and "summed epoch time" in out
    # an evaluation at PPO's images (compare_cosine's PPO: 1,792) gives the comparison at equal images too
    ppo_images = loop_claims.by_method(loop_claims.load_runs(loop_claims.COMPARE_COSINE), "ppo")[0]["evals"][-1]
    along = [fake_run("loop", s, 2e-3, 0.45, 0.4, images_per_epoch=256, epochs=8) for s in range(3)]
    for s, run in enumerate(along):
        run["evals"].insert(1, {"images": ppo_images["images"], "strict": 0.30 + 0.01 * s, "strict_sem": 0.03, "score": 0.5})
    write_runs(study / "equal_prompts", along)
    loop_claims.main(["--study", "k", "--report_only", "--results", str(tmp_path)])
    row = next(line for line in capsys.readouterr().out.splitlines() if f"both at {ppo_images['images']:,} images" in line)
    assert f"| train_strict@{ppo_images['images']} | 3, 3 | 0.310 (0.010) |" in row
    assert (study / "k_curves.png").stat().st_size > 10_000
    # with the timing cells run alone, time is epochs x their median epoch (the first, warming up, left out by it)
    timed = []
    for method, seconds in (("loop_k2", 6.0), ("loop", 7.0), ("loop_k8", 8.0), ("ppo", 5.0)):
        run = fake_run(method, 0, 2e-3, 0.2, 0.2, epochs=3)
        for epoch, t in zip(run["epochs"], (30.0, seconds, seconds + 0.5)):
            epoch["time_epoch_s"] = t
        timed.append(run)
    write_runs(study / "timing", timed)
    loop_claims.main(["--study", "k", "--report_only", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "epochs x median epoch alone" in out
    assert "| K=4 | 256 | 30 |" in out and "| K=8 | 256 | 34 |" in out  # 4 epochs x 7.5 s and x 8.5 s
    assert "| K=4, 256 images/epoch | 2048 | 80 |" in out  # no timing_256 run: its own epoch times (8 x 10 s)


def test_the_robustness_report_finds_the_worst_cell_and_draws_a_heat_map_per_method(tmp_path, capsys):
    study = tmp_path / "robustness"
    for i, multiple in enumerate(loop_claims.CLIP_MULTIPLES):
        runs = []
        for j, lr in enumerate(loop_claims.LEARNING_RATES):
            for s in range(3):
                runs.append(fake_run("loop", s, float(lr), 0.30 + 0.01 * s, 0.3))
                runs.append(fake_run("ppo", s, float(lr), 0.10 * (i + 1) + 0.01 * j + 0.01 * s, 0.3))
        write_runs(study / f"clip{multiple:g}x", runs)
    loop_claims.main(["--study", "robustness", "--report_only", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| loop | 9 of 9 | 0.310 (1x, 1e-3) |" in out and "| 0.310 | 0.000 |" in out  # flat: sd over cells 0
    assert "| ppo | 9 of 9 | 0.110 (1x, 1e-3) | 0.330 (6.25x, 4e-3) |" in out
    assert {"robustness_loop.png", "robustness_ppo.png"} <= set(os.listdir(study))
    assert "grpo" not in out  # no runs, no row
    # intervals over 3 seeds: every difference has sd 0.01 per side, so Welch's half-width is t(0.975, 4) * 0.01 * sqrt(2/3)
    half = stats.t.ppf(0.975, 4) * 0.01 * (2 / 3) ** 0.5
    assert f"| 1x | +0.200 [{0.2 - half:+.3f}, {0.2 + half:+.3f}] |" in out
    assert "LOOP ahead of PPO in 6 of 9 cells; separated in 6 of 9 (LOOP ahead in 6, PPO in 0)." in out  # the 6.25x row's -0.02..0 are within +-0.023
    # one seed's grid: LOOP 0.30 + 0.01 s everywhere, PPO 0.21 + 0.01 s on average and 0.10 + 0.01 s at worst
    assert f"| 6.25x | 0.310 +- {0.01 / 3 ** 0.5:.3f} (3) |" in out  # the per-cell table: sd 0.01 over 3 seeds
    assert f"| 1x | 0.110 +- {0.01 / 3 ** 0.5:.3f} (3) | 0.120 +- " in out
    means = {"loop": [0.30 + 0.01 * s for s in range(3)],
             "ppo": [np.mean([0.1 * (i + 1) + 0.01 * j + 0.01 * s for i in range(3) for j in range(3)]) for s in range(3)]}
    needed = seeds_to_separate(0.09, float(np.sqrt((np.var(means["loop"], ddof=1) + np.var(means["ppo"], ddof=1)) / 2)))
    assert (f"| mean over cells | train_strict | 0.310 (0.010) | 0.220 (0.010) | +0.090 [{0.09 - half:+.3f}, {0.09 + half:+.3f}] separated "
            f"({needed}) |") in out
    assert "| worst cell | train_strict | 0.310 (0.010) | 0.110 (0.010) | +0.200 [" in out
    ppo_sd = float(np.std([0.1 * (i + 1) + 0.01 * j for i in range(3) for j in range(3)], ddof=1))  # the same every seed
    assert f"| sd over cells | train_strict | 0.000 (0.000) | {ppo_sd:.3f} (0.000) | {-ppo_sd:+.3f} [{-ppo_sd:+.3f}, {-ppo_sd:+.3f}] separated (2) |" in out
    assert "| mean over cells | heldout_strict | 0.300 (0.000) | 0.300 (0.000) | +0.000 [+0.000, +0.000] (> 10,000) |" in out
    assert "Noise floor of the sd over cells (within-cell sd over seeds, pooled over cells): loop 0.010, ppo 0.010." in out
    loop_claims.main(["--study", "robustness", "--report_only", "--results", str(tmp_path), "--seeds", "0"])
    out = capsys.readouterr().out  # a part of the seeds: seed 0's runs alone
    assert "| 1x | +0.200 | +0.190 | +0.180 |" in out and "LOOP ahead of PPO in 6 of 9 cells." in out  # a tie is not ahead
    assert "| loop | 9 of 9 | 0.300 (1x, 1e-3) |" in out and "| ppo | 9 of 9 | 0.100 (1x, 1e-3) | 0.320 (6.25x, 4e-3) |" in out
    cell_flags = loop_claims.STUDIES["robustness"]["clip2.5x"]
    assert cell_flags[cell_flags.index("--clip_range") + 1] == "0.001"  # the example's own clip range is the middle row


def documented_compare_cosine_flags() -> list[str]:
    """The command docs/benchmarks.md gives for benchmarks/results/compare_cosine, as arguments."""
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        text = f.read()
    start = text.index("python benchmarks/compare_algorithms.py --output_dir benchmarks/results/compare_cosine")
    command = text[start:text.index("```", start)].replace("\\\n", " ")
    return command.split()[2:]


def test_the_cells_that_reuse_compare_cosine_have_its_settings_but_for_methods_and_learning_rates():
    import compare_algorithms

    def settings(flags):
        parsed = vars(compare_algorithms.parse_args(flags))
        return {k: v for k, v in parsed.items() if k not in ("methods", "learning_rates", "seeds", "output_dir")}, parsed

    documented, parsed = settings(documented_compare_cosine_flags())
    assert parsed["learning_rates"] == [2e-3]
    for study, cells in loop_claims.SAME_AS_COMPARE_COSINE.items():
        for cell in cells:
            own, parsed = settings(loop_claims.STUDIES[study][cell])
            assert own == documented, (study, cell)
            assert 2e-3 in parsed["learning_rates"]
    # and a cell that differs is told apart: the robustness grid's other clip ranges
    assert settings(loop_claims.STUDIES["robustness"]["clip1x"])[0] != documented


def test_reusing_compare_cosine_copies_only_the_missing_runs_of_the_cells_methods(tmp_path, monkeypatch):
    source = tmp_path / "compare_cosine"
    write_runs(source, [fake_run(m, s, 2e-3, 0.3, 0.3) for m in ("loop", "ppo", "reinforce_loo") for s in range(3)])
    (source / "runs" / "base.json").write_text("{}")
    monkeypatch.setattr(loop_claims, "COMPARE_COSINE", str(source))
    cell = tmp_path / "cell"
    write_runs(cell, [fake_run("loop", 0, 2e-3, 0.9, 0.9)])  # already there: kept as it is
    flags = ["--epochs", "3", "--methods", "loop", "ppo", "grpo", "--clip_range", "0.001"]
    copied = loop_claims.reuse_compare_cosine(str(cell), flags, seeds=[0, 1])
    assert copied == ["base.json", "loop_seed1_lr0.002.json", "ppo_seed0_lr0.002.json", "ppo_seed1_lr0.002.json"]
    assert json.loads((cell / "runs" / "loop_seed0_lr0.002.json").read_text())["evals"][-1]["strict"] == 0.9
    assert loop_claims.reuse_compare_cosine(str(cell), flags, seeds=[0, 1]) == []
