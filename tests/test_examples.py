"""The README's offline commands and the example scripts, run as a user runs them."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_readme_offline_commands(tmp_path):
    run("-m", "loop_trl.testing", "tiny-sd", cwd=tmp_path)
    run(os.path.join(ROOT, "examples", "train_aesthetic.py"), "--pretrained_model", "tiny-sd", "--reward",
        "jpeg_compressibility", "--mixed_precision", "no", "--num_epochs", "2", "--sample_num_steps", "4",
        "--sample_batch_size", "8", "--train_batch_size", "4", "--output_dir", "tiny-run", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "tiny-run" / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]
    out = run(os.path.join(ROOT, "examples", "generate.py"), "--base", "tiny-sd", "--adapter", "tiny-run",
              "--prompts", "a cat", "--num_inference_steps", "4", "--output_dir", "tiny-samples", cwd=tmp_path)
    assert "Wrote 4 images" in out.stdout
    assert {"grid.png", "000_00.png"} <= set(os.listdir(tmp_path / "tiny-samples"))


@pytest.mark.slow
def test_mixed_precision_full_finetune_keeps_trainable_weights_fp32(tmp_path):
    """TRL's DDPO cast the UNet to fp16 and broke full fine-tuning; here bf16 runs only the frozen parts."""
    run("-m", "loop_trl.testing", "tiny-sd", cwd=tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("pretrained_model: tiny-sd\nmixed_precision: bf16\nuse_lora: false\nreward: jpeg_incompressibility\nnum_epochs: 1\n"
                      "sample_num_steps: 3\nsample_batch_size: 8\ntrain_batch_size: 4\noutput_dir: bf16-run\n"
                      "train_learning_rate: 1.0e-3\n")
    run(os.path.join(ROOT, "examples", "train_aesthetic.py"), "--config", str(config), cwd=tmp_path)
    saved = load_file(tmp_path / "bf16-run" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    base = load_file(tmp_path / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(saved[k], base[k]) for k in base)  # the full UNet was trained


def test_importing_the_package_is_quiet():
    result = subprocess.run([sys.executable, "-c", "import loop_trl, loop_trl.rewards"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""


def test_config_reference_is_up_to_date():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "make_config_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_train_shapes_example_writes_its_outputs(tmp_path):
    run(os.path.join(ROOT, "examples", "train_shapes.py"), "--num_epochs", "2", "--save_freq", "2", "--eval_freq", "1",
        "--sample_batch_size", "16", "--train_batch_size", "8", "--families", "binding,spatial", "--num_train_eval_prompts", "2",
        "--eval_num_images_per_prompt", "2", "--num_heldout_prompts", "2", "--heldout_images_per_prompt", "1",
        "--base_guidance_scales", "3", "--strict_bonus", "1", "--deployed_guidance_scales", "3",
        "--grid_prompts", "2", "--output_dir", "shapes-run", cwd=tmp_path)
    out = tmp_path / "shapes-run"
    assert {"learning_curve.png", "before_after.png", "metrics.json", "pytorch_lora_weights.safetensors",
            "README.md"} <= set(os.listdir(out))
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    evals = [h for h in metrics["history"] if "eval/strict_mean" in h]
    assert [h["eval/epochs_completed"] for h in evals] == [0, 1, 2]  # before training, then every epoch
    deployed = [h for h in metrics["history"] if "eval_deterministic/strict_mean" in h]  # and the deployed sampler's
    assert [h["eval_deterministic/epochs_completed"] for h in deployed] == [0, 1, 2]
    assert metrics["deterministic_after"] == deployed[-1]
    for h in evals:  # trained on (score + strict) / 2; the plain score and strict accuracy are reported beside it
        assert h["eval/reward_mean"] == pytest.approx((h["eval/score_mean"] + h["eval/strict_mean"]) / 2)
    assert metrics["train_prompts_before"]["eval/num_images"] == 4  # 2 families x 1 prompt x 2 images
    assert set(metrics["heldout_before"]) == set(metrics["heldout_after"])
    assert set(metrics["base_at_other_guidance"]) == {"3.0"}
    pipe = metrics["diffusers_pipeline"]
    assert pipe["settings"]["scheduler"] == "DDIMScheduler" and {"base", "trained"} <= set(pipe)
    # the deployed grid: the training guidance (1) and the asked-for 3, each model's best against the other's
    assert set(pipe["grid"]["base"]) == set(pipe["grid"]["trained"]) == {"1", "3"}
    assert pipe["trained"] == pipe["grid"]["trained"]["1"]
    best = pipe["best_against_best"]
    assert best["gain"] == pytest.approx(pipe["grid"]["trained"][f"{best['trained_guidance']:g}"]["strict"]
                                         - max(m["strict"] for m in pipe["grid"]["base"].values()))
    card = (out / "README.md").read_text()
    assert "from loop_trl.testbeds.shapes import load_pipeline" in card  # loadable anywhere, not this machine's path
    assert "num_inference_steps=10, guidance_scale=1.0, eta=1.0" in card  # the run's sampler settings
    assert "other 3 images" in card and str(tmp_path) not in card
    assert "`ShapesReward(strict_bonus=1)`" in card  # the reward it was trained on, with its setting


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "examples", "configs"))))
def test_every_example_config_parses_and_validates(name, monkeypatch):
    """Each shipped YAML is read by the aesthetic example's own parser, so a renamed or invalid field fails here."""
    import importlib.util

    from trl import TrlParser

    from loop_trl import LOOPConfig

    spec = importlib.util.spec_from_file_location("train_aesthetic", os.path.join(ROOT, "examples", "train_aesthetic.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_aesthetic", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["train_aesthetic.py", "--config", os.path.join(ROOT, "examples", "configs", name)])
    config, args = TrlParser((LOOPConfig, module.ScriptArguments)).parse_args_and_config()
    assert config.num_train_timesteps >= 1 and args.pretrained_model


@pytest.mark.slow
@pytest.mark.parametrize("family", ["stable-diffusion-3", "qwen-image", "wan"])  # the others: tests/test_families.py
def test_aesthetic_example_trains_a_flow_model_and_generate_loads_it(tmp_path, family):
    """The family comes from the checkpoint: the same commands train and sample a flow model (Wan: videos, the
    image reward scored per frame, written as GIFs)."""
    run("-m", "loop_trl.testing", "tiny", "--family", family, cwd=tmp_path)
    frames = ["--num_frames", "5"] if family == "wan" else []
    run(os.path.join(ROOT, "examples", "train_aesthetic.py"), "--pretrained_model", "tiny", "--reward",
        "jpeg_compressibility", "--mixed_precision", "no", "--num_epochs", "1", "--sample_num_steps", "3",
        "--sample_eta", "0.7", "--resolution", "32", "--sample_batch_size", "8", "--train_batch_size", "4",
        "--output_dir", "tiny-run", *frames, cwd=tmp_path)
    card = (tmp_path / "tiny-run" / "README.md").read_text()
    assert {"stable-diffusion-3": "StableDiffusion3Pipeline", "qwen-image": "QwenImagePipeline", "wan": "WanPipeline"}[family] in card
    out = run(os.path.join(ROOT, "examples", "generate.py"), "--base", "tiny", "--adapter", "tiny-run", "--prompts",
              "a cat", "--num_inference_steps", "3", "--height", "32", "--width", "32", "--num_images", "2",
              "--output_dir", "samples", *frames, cwd=tmp_path)
    if family != "wan":
        assert "Wrote 2 images" in out.stdout
        return
    from PIL import Image

    assert "Wrote 2 videos" in out.stdout and "pipeline_tag: text-to-video" in card and "export_to_video" in card
    assert Image.open(tmp_path / "samples" / "000_01.gif").n_frames == 5
    assert Image.open(tmp_path / "samples" / "grid.png").size == (64, 32)  # first frames


OFFLINE_CASES = [([], "the aesthetic reward's weights 'openai/clip-vit-large-patch14'", "--aesthetic_clip_model"),
                 (["--reward", "jpeg_compressibility"], "the base model 'stable-diffusion-v1-5/stable-diffusion-v1-5'",
                  "--pretrained_model /path/to/model")]


def check_one_line(stderr: str, names: str, fix: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not fetch {names} from the Hugging Face Hub (offline or unreachable"), last
    assert fix in last and "HF_HUB_OFFLINE=1" in last and "examples/train_shapes.py" in last, last


@pytest.mark.parametrize("extra, names, fix", OFFLINE_CASES)
def test_the_readme_training_command_offline_says_so_in_one_line(tmp_path, extra, names, fix):
    """`accelerate launch examples/train_aesthetic.py` with the Hub cache empty and HF_HUB_OFFLINE=1: one line naming
    what could not be fetched and what to do, not a chain of tracebacks."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_aesthetic.py"), *extra], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    check_one_line(result.stderr, names, fix)


@pytest.mark.parametrize("extra, names, fix", OFFLINE_CASES)
def test_the_readme_training_command_with_the_hub_unreachable_says_so_in_one_line(tmp_path, monkeypatch, capsys,
                                                                                 extra, names, fix):
    """The same with the network down: every Hub request fails to connect, as httpx reports a refused connection
    (stood in for in the process: huggingface_hub would retry a real refusal for about half a minute first)."""
    import importlib

    import huggingface_hub.file_download as file_download

    try:  # the HTTP client of the installed huggingface_hub
        client = importlib.import_module("httpx2")
    except ImportError:
        client = importlib.import_module("httpx")

    def refused(*args, **kwargs):
        raise client.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(file_download, "get_hf_file_metadata", refused)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(file_download.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sys, "argv", ["train_aesthetic.py", *extra])
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import train_aesthetic
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as exit_info:
        train_aesthetic.main()
    check_one_line(str(exit_info.value), names, fix)
    assert "ConnectError" in str(exit_info.value)


def test_other_errors_pass_through_the_offline_message():
    from loop_trl.hub import exit_if_hub_unreachable

    with pytest.raises(ValueError, match="a bad value"):
        with exit_if_hub_unreachable("the base model", "x/y", "fix"):
            raise ValueError("a bad value")
