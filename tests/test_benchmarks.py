"""Every benchmark script, run at a tiny scale (the full benchmarks are not part of the suite)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from test_examples import ROOT, run

BENCH = os.path.join(ROOT, "benchmarks")
ANCHOR_PYTHON = os.path.join(BENCH, ".venv-trl", "bin", "python")
TINY = ["--epochs", "1", "--images_per_epoch", "8", "--sample_batch_size", "8", "--train_batch_size", "8",
        "--num_steps", "2", "--eval_prompts_per_family", "1", "--eval_images_per_prompt", "1"]

sys.path.insert(0, BENCH)
from compare_algorithms import METHODS, first_reaching, trailing_mean  # noqa: E402


def test_every_method_is_a_valid_config_with_what_it_promises():
    from loop_trl import LOOPConfig

    configs = {name: LOOPConfig(sample_batch_size=16, train_batch_size=16, **settings) for name, settings in METHODS.items()}
    assert configs["loop"].advantage_estimator == "loo" and configs["loop"].num_samples_per_prompt == 4
    assert configs["ppo"].advantage_estimator == "per_prompt_tracker" and configs["ppo"].num_samples_per_prompt == 1
    for one_pass in ("reinforce", "reinforce_loo"):
        assert configs[one_pass].train_num_inner_epochs == 1 and configs[one_pass].train_clip_range == float("inf")
    assert configs["grpo"].advantage_estimator == "group_norm"


def test_first_reaching():
    evals = [{"images": 32, "strict": 0.5}, {"images": 64, "strict": 0.7}, {"images": 96, "strict": 0.6}]
    assert first_reaching(evals, 0.6) == 64
    assert first_reaching(evals, 0.8) == float("inf")
    assert first_reaching([{"images": 8, "reward": 0.2}, {"images": 16, "reward": 0.4}], 0.3, key="reward") == 16


def test_trailing_mean():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.slow
def test_compare_algorithms_tiny(tmp_path):
    run(os.path.join(BENCH, "compare_algorithms.py"), "--output_dir", "out", "--methods", "loop", "ppo", "--seeds", "0",
        "--lora_rank", "2", "--eval_every", "1", "--eval_prompts", "2", "--heldout_prompts", "2",
        "--timestep_stop", "-1", *TINY[:10], "--eval_images_per_prompt", "2",  # TINY's workload, without its held-out flags
        cwd=tmp_path)
    out = tmp_path / "out"
    assert {"runs.csv", "summary.csv", "table.md", "curves.png"} <= set(os.listdir(out))
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["loop", "ppo"]
    assert all(0.0 <= float(r["heldout_after"]) <= 1.0 and float(r["median_epoch_s"]) > 0 for r in rows)
    assert all(0.0 <= float(r["train_prompts_after"]) <= 1.0 for r in rows)
    assert rows[0]["tracker_engaged"] == "nan" and 0.0 <= float(rows[1]["tracker_engaged"]) <= 1.0  # ppo reports it
    table = (out / "table.md").read_text()
    assert "fixed training prompts: PPO's final strict accuracy" in table


@pytest.mark.slow
def test_profile_epoch_tiny(tmp_path):
    out = run(os.path.join(BENCH, "profile_epoch.py"), "--output_dir", "prof", "--epochs", "1", "--images_per_epoch", "8",
              "--sample_batch_size", "8", "--train_batch_size", "8", "--num_steps", "2", "--floor_repeats", "1",
              "--gradient_checkpointing", cwd=tmp_path)
    profile = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert set(profile["parts_s"]) == {"sampling", "reward", "training", "other"}
    assert profile["floor_s"]["sampling"] > 0 and profile["floor_s"]["training"] > 0
    assert profile["epoch_over_floor"] > 0
    assert "| epoch |" in out.stdout


def test_time_unet_runs_in_this_environment(tmp_path):
    """compare_trl.py runs it in both environments; here, in loop-trl's, it must time both kinds of call."""
    out = run(os.path.join(BENCH, "trl_anchor", "time_unet.py"), "--repeats", "1", "--sample_batch_size", "2",
              "--train_batch_size", "2", cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["sample_call_s"] > 0 and result["train_call_s"] > 0
    import diffusers

    assert result["diffusers"] == diffusers.__version__


# DDPOConfig fields that decide the work of a run, compared by name with the LOOPConfig of loop-trl's side
DDPO_FIELDS = ("num_epochs", "sample_num_steps", "sample_eta", "sample_guidance_scale", "sample_batch_size",
               "sample_num_batches_per_epoch", "train_batch_size", "train_learning_rate", "train_adam_beta1",
               "train_adam_beta2", "train_adam_weight_decay", "train_adam_epsilon", "train_gradient_accumulation_steps",
               "train_max_grad_norm", "train_num_inner_epochs", "train_cfg", "train_adv_clip_max", "train_clip_range",
               "train_timestep_fraction", "per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count",
               "mixed_precision", "train_use_8bit_adam")


def anchor_available() -> bool:
    if os.path.exists(ANCHOR_PYTHON):
        return True
    if os.environ.get("LOOP_TRL_REQUIRE_ANCHOR"):
        pytest.fail(f"No anchor environment at {ANCHOR_PYTHON}: bash benchmarks/trl_anchor/setup_env.sh")
    pytest.skip("the TRL 0.23.1 anchor environment is not installed (bash benchmarks/trl_anchor/setup_env.sh)")


def test_compare_trl_gives_both_sides_ddpos_work_flag_by_flag(tmp_path):
    """The loop-trl side's LOOPConfig, built from the command compare_trl.py runs, against the DDPOConfig that
    TRL 0.23.1 itself builds from run_ddpo.py's command (in the anchor environment): every field that decides the
    work is equal, and the loop-trl side runs PPO as DDPO (K = 1, per-prompt tracker, every step eligible)."""
    anchor_available()
    import compare_algorithms
    import compare_trl

    args = compare_trl.parse_args(["--output_dir", str(tmp_path), "--seeds", "0", "--epochs", "3", "--lr", "3e-4",
                                   "--guidance", "5", "--inner_epochs", "2", "--images_per_epoch", "32"])
    command = compare_trl.loop_trl_command(args, str(tmp_path / "work"), seed=0)
    assert command[1].endswith("compare_algorithms.py")
    ours_args = compare_algorithms.parse_args(command[2:])
    ours = compare_algorithms.make_config(ours_args, "ppo", 0, float(ours_args.run_one.split(":")[2])).to_dict()
    script = ("import json, sys, dataclasses; sys.path.insert(0, 'benchmarks/trl_anchor'); import run_ddpo; "
              "config = run_ddpo.make_config(run_ddpo.parse_args(sys.argv[1:])); "
              "print(json.dumps({k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))}))")
    anchor = subprocess.run([ANCHOR_PYTHON, "-c", script, "--output_dir", str(tmp_path / "trl"), "--seed", "0",
                             *compare_trl.shared_flags(args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert anchor.returncode == 0, anchor.stderr[-3000:]
    theirs = json.loads(anchor.stdout.strip().splitlines()[-1])
    different = {name: (ours[name], theirs[name]) for name in DDPO_FIELDS if ours[name] != theirs[name]}
    assert not different, f"loop-trl's side differs from DDPOConfig in {different}"
    assert (ours["num_samples_per_prompt"], ours["advantage_estimator"]) == (1, "per_prompt_tracker")
    assert theirs["per_prompt_stat_tracking"] is True
    assert ours["train_timestep_start"] == 0 and ours["train_timestep_stop"] is None
    assert ours_args.families == ["single", "binding", "counting", "spatial"] and ours_args.lora_rank == 4


@pytest.mark.slow
def test_compare_trl_tiny(tmp_path):
    anchor_available()
    out = run(os.path.join(BENCH, "compare_trl.py"), "--output_dir", "trl", "--seeds", "0", "--unet_repeats", "1",
              *TINY, cwd=tmp_path)
    assert "| trl_ddpo |" in out.stdout and "| loop_trl_ddpo_memory |" in out.stdout and "| loop_trl / trl |" in out.stdout
    anchor = json.loads((tmp_path / "trl" / "runs" / "trl_ddpo_seed0.json").read_text())
    assert anchor["versions"]["trl"] == "0.23.1"
    assert all(e["time_sampling_s"] > 0 and e["time_training_s"] > 0 for e in anchor["epochs"])  # TRL's epoch, in parts
    assert 0.0 <= anchor["heldout"]["overall"] <= 1.0  # TRL's adapter loaded into loop-trl and evaluated
    ours = json.loads((tmp_path / "trl" / "runs" / "loop_trl_ddpo_seed0.json").read_text())
    assert set(ours["heldout"]) == set(anchor["heldout"]) - {"images"}  # the same held-out prompts, evaluated alike


@pytest.mark.slow
def test_async_rewards_benchmark_runs_tiny(tmp_path):
    out = run(os.path.join(BENCH, "async_rewards.py"), "--output_dir", str(tmp_path), "--epochs", "1",
              "--images_per_epoch", "8", "--sample_batch_size", "8", "--train_batch_size", "8", "--num_steps", "3",
              "--latency", "0.2", "--rewards", "remote", cwd=tmp_path)
    assert "ratio" in out.stdout
    with open(tmp_path / "async_rewards.json") as f:
        results = json.load(f)["results"]
    assert set(results) == {"verifier + 0.2 s latency"}
    assert all(row["async"]["epoch_s"] > 0 and row["in_turn"]["epoch_s"] > 0 for row in results.values())


def test_gpu_benchmark_builds_the_published_model_sizes():
    """The full-size shapes of benchmarks/gpu/models.py, built on the meta device (no memory), have the
    parameter counts of the released checkpoints."""
    import torch

    sys.path.insert(0, os.path.join(BENCH, "gpu"))
    from models import build_model

    def counts(name):
        pipeline = build_model(name, torch.device("meta"), torch.bfloat16)
        return {k: sum(p.numel() for p in m.parameters()) for k, m in pipeline.components.items() if isinstance(m, torch.nn.Module)}

    sd15 = counts("sd15")  # runwayml/stable-diffusion-v1-5: UNet 859.52M, VAE 83.65M, CLIP ViT-L/14 text 123.06M
    assert sd15 == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    sd35 = counts("sd35_medium")
    # keras_hub's SD 3.5 Medium preset counts 3,371,793,763 parameters for CLIP-L, CLIP-G, MMDiT-X and VAE, the
    # MMDiT-X's 384 x 384 x 1536 position table included (a buffer in diffusers)
    assert sd35["text_encoder"] + sd35["text_encoder_2"] + sd35["transformer"] + 384 * 384 * 1536 + sd35["vae"] == 3_371_793_763
    assert sd35["text_encoder_3"] == 4_762_310_656  # T5 v1.1 XXL encoder
    flux = counts("flux_dev")
    assert abs(flux["transformer"] / 11.9e9 - 1) < 0.005 and flux["text_encoder_2"] == sd35["text_encoder_3"]
    z_image = counts("z_image")  # Z-Image's report: a 6B-parameter DiT; Qwen3-4B's card: 4.0B parameters (embeddings tied)
    assert abs(z_image["transformer"] / 6.0e9 - 1) < 0.03 and abs(z_image["text_encoder"] / 4.0e9 - 1) < 0.01
    assert z_image["vae"] == flux["vae"]
    qwen = counts("qwen_image")  # Qwen-Image's report: a 20B MMDiT; Qwen2.5-VL-7B-Instruct's card: 8.29B parameters
    assert abs(qwen["transformer"] / 20.0e9 - 1) < 0.03 and abs(qwen["text_encoder"] / 8.29e9 - 1) < 0.001
    klein = counts("flux2_klein_4b")  # BFL names the model 4B; its text encoder is Qwen3-4B, Z-Image's
    assert abs(klein["transformer"] / 4.0e9 - 1) < 0.05 and klein["text_encoder"] == z_image["text_encoder"]
    wan = counts("wan21_1_3b")  # the release names its DiT 1.3B; UMT5-XXL's encoder is T5-XXL's with a 256,384-token
    assert abs(wan["transformer"] / 1.3e9 - 1) < 0.1  # vocabulary and a relative-position table in each of its 24 layers
    assert wan["text_encoder"] == sd35["text_encoder_3"] + (256_384 - 32_128) * 4096 + 23 * 32 * 64


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path):
    """The GPU benchmark's CPU dry run: tiny models of three families (one of them video), every variant, one epoch,
    the floor replayed."""
    sys.path.insert(0, os.path.join(BENCH, "gpu"))
    from run import VARIANTS

    extra = ["--trl_python", ANCHOR_PYTHON] if os.path.exists(ANCHOR_PYTHON) else []
    out = run(os.path.join(BENCH, "gpu", "run.py"), "--dry_run", "--output_dir", "gpu", "--models", "sd15", "sd35_medium",
              "wan21_1_3b", *extra, cwd=tmp_path)
    report = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    expected = [(m, v) for m in ("sd15", "sd35_medium", "wan21_1_3b") for v in VARIANTS] + ([("sd15", "trl_ddpo")] if extra else [])
    assert [(r["model"], r["variant"]) for r in report["results"]] == expected
    for r in report["results"]:
        assert r["median_epoch_s"] > 0 and r["sampling_images_per_s"] > 0 and r["training_trajectories_per_s"] > 0
    for loop in (r for r in report["results"] if r["variant"] == "loop"):
        assert loop["floor_s"]["sampling"] > 0 and loop["floor_s"]["training"] > 0 and loop["epoch_over_floor"] > 0
    assert "| sd35_medium | loop_memory |" in out.stdout and (tmp_path / "gpu" / "table.md").exists()


def test_deployed_sampler_compares_adapters_with_the_base_at_every_setting(tmp_path):
    from loop_trl.testbeds.shapes import load_policy

    load_policy(lora_rank=2).save_weights(str(tmp_path / "adapter"))  # an untrained LoRA: the base model's images
    out = run(os.path.join(BENCH, "deployed_sampler.py"), "--adapters", str(tmp_path / "adapter"), "--guidance", "1,3",
              "--steps", "2", "--num_prompts", "2", "--images_per_prompt", "1", "--output", str(tmp_path / "d.json"),
              cwd=str(tmp_path))
    result = json.loads((tmp_path / "d.json").read_text())["results"]
    assert set(result) == {"base", str(tmp_path / "adapter")} and set(result["base"]) == {"2:1", "2:3"}
    assert result["base"] == result[str(tmp_path / "adapter")]  # B = 0: the same images, the same scores
    assert "| base |" in out.stdout and "against base" in out.stdout


def test_deployed_ablation_reads_its_cache_and_summarizes_gains_over_the_base(tmp_path, capsys):
    """With every (setting, seed) cached, the study only prints: gains over the base model per seed, the share kept
    under the deployed sampler at the training guidance, and best against best; unknown settings are refused."""
    sys.path.insert(0, BENCH)
    try:
        import deployed_ablation
    finally:
        sys.path.pop(0)
    results = tmp_path / "results"
    results.mkdir()
    cell = lambda strict: {"strict": strict, "strict_sem": 0.03, "mean_score": 0.5, "mean_score_sem": 0.02}  # noqa: E731
    (results / "base_10_steps.json").write_text(json.dumps({"1": cell(0.10), "3": cell(0.30)}))
    for seed, (g1, g3, gain) in enumerate([(0.20, 0.35, 0.20), (0.30, 0.25, 0.10)]):
        row = {"setting": "early_steps", "seed": seed, "training_guidance": "1", "training_gain": gain,
               "grid": {"1": cell(g1), "3": cell(g3)}}
        (results / f"early_steps_seed{seed}_10_steps.json").write_text(json.dumps(row))
    deployed_ablation.main(["--settings", "early_steps", "--seeds", "0,1", "--guidance", "1,3", "--results", str(results)])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| early_steps |"))
    # kept: 0.10 / 0.20 and 0.20 / 0.10; best against best: 0.35 - 0.30 and 0.30 - 0.30
    assert "(+0.100, +0.200)" in line and "(+0.500, +2.000)" in line and "(+0.050, +0.000)" in line
    with pytest.raises(SystemExit, match="unknown setting"):
        deployed_ablation.main(["--settings", "no_such_setting", "--results", str(results)])
    # the setting the example adopted is the example's defaults (the docs' table and the README quote both)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from train_shapes import ShapesArguments, defaults
    finally:
        sys.path.pop(0)
    from trl import TrlParser

    from loop_trl import LOOPConfig

    def example_config(flags):  # parsed as the example parses its command line
        parser = TrlParser((LOOPConfig, ShapesArguments))
        parser.set_defaults(**defaults())
        return parser.parse_args_into_dataclasses(args=flags)

    # the adopted setting's flags give exactly the example's defaults: the docs quote its rows as the defaults
    assert example_config(deployed_ablation.SETTINGS[deployed_ablation.ADOPTED]) == example_config([])
    # an older setting keeps what it ran with, whatever the example's defaults are now
    older, _ = example_config(deployed_ablation.SETTINGS["early_steps"])
    assert (older.num_epochs, older.sample_sde_window, older.train_timestep_stop) == (28, False, -6)
