import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_processes_keep_groups_whole_and_weights_in_sync(tmp_path, tiny_sd_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "two_process_run.py")
    out = tmp_path / "run"
    out.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
               script, tiny_sd_path, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((out / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world"] == 2
        # 2 epochs x 16 samples / train_batch_size 4 = 8 optimizer steps, each checked
        assert report["steps"] == 8 and len(report["weight_spread"]) == 8
        assert max(report["weight_spread"]) == 0.0
        # per epoch: 2 processes x 2 batches x 2 prompts = 8 groups, each of K=4 samples from one process
        assert report["groups"] == [[[4, 1]] * 8, [[4, 1]] * 8]
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")
