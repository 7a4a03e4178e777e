"""Kill a run with SIGKILL at several points, resume it, and get bit-identical weights and the same log."""

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "kill_and_resume.py")


def run(sd_path, out, kill_at, mode):
    return subprocess.run([sys.executable, SCRIPT, sd_path, str(out), kill_at, mode], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_sd_path):
    out = tmp_path_factory.mktemp("straight")
    result = run(tiny_sd_path, out, "none", "fresh")
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "pytorch_lora_weights.safetensors"), history(out)


def history(out):
    """The run's log_history without wall-clock times (the only numbers two identical runs may differ in)."""
    rows = json.loads((out / "history.json").read_text())
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, resumes_at", [("sampling", 2), ("optimizer", 2), ("checkpoint", 2),
                                               ("evaluation", 2)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_sd_path, uninterrupted, kill_at, resumes_at):
    killed = run(tiny_sd_path, tmp_path, kill_at, "fresh")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    if kill_at == "checkpoint":  # the half-written checkpoint is left as .partial, never as checkpoint_3
        assert checkpoints == ["checkpoint_1", "checkpoint_2", "checkpoint_3.partial"]
    resumed = run(tiny_sd_path, tmp_path, kill_at, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"start epoch {resumes_at}" in resumed.stdout
    final = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    weights, log = uninterrupted
    assert final.keys() == weights.keys()
    different = [k for k in final if not (final[k] == weights[k]).all()]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run"
    # log_history survives the kill: every epoch, optimizer step and evaluation once, with the same numbers
    resumed_log = history(tmp_path)
    assert len([r for r in resumed_log if "eval/reward_mean" in r]) == 5  # before training and after each epoch
    assert resumed_log == log
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "checkpoint_4"
