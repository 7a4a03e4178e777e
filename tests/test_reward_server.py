"""The reward server and RemoteReward, on 127.0.0.1 inside the test (no network beyond the loopback)."""

import json
import os
import subprocess
import sys
import threading

import pytest
import requests
import torch

from loop_trl import LOOPConfig, LOOPStableDiffusionPipeline, LOOPTrainer
from loop_trl.rewards import JpegCompressibility, RemoteReward
from loop_trl.rewards.serve import encode_image, make_server

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow star"]


def images(n=4, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).float() / 255


class Served:
    """A reward server on an ephemeral loopback port, in a background thread."""

    def __init__(self, reward, **kwargs):
        self.server = make_server(reward, "127.0.0.1", 0, **kwargs)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served():
    servers = []

    def start(reward=None, **kwargs):
        servers.append(Served(reward or JpegCompressibility(), **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_round_trip_equals_the_local_reward(served):
    server = served()
    local, local_meta = JpegCompressibility()(images(), PROMPTS, [{}] * 4)
    remote, remote_meta = RemoteReward(server.url, batch_size=3)(images(), PROMPTS, [{}] * 4)  # two requests
    torch.testing.assert_close(remote, local.float(), rtol=0, atol=1e-6)
    assert remote_meta["jpeg_size_kb"] == pytest.approx(torch.as_tensor(local_meta["jpeg_size_kb"]).tolist())
    assert requests.get(f"{server.url}/health").json() == {"reward": "JpegCompressibility"}


def test_token_is_required_when_set(served):
    server = served(token="s3cret")
    scores, _ = RemoteReward(server.url, token="s3cret")(images(2), PROMPTS[:2], [{}] * 2)
    assert scores.shape == (2,)
    for token in (None, "wrong"):
        with pytest.raises(ValueError, match=f"{server.url}/score answered 401: missing or wrong bearer token"):
            RemoteReward(server.url, token=token)(images(2), PROMPTS[:2], [{}] * 2)


def test_oversized_and_malformed_requests_get_4xx(served):
    server = served(max_batch=2, max_request_mb=0.01)
    url = f"{server.url}/score"
    small = {"prompts": ["a"], "metadata": [None], "images": [encode_image(images(1)[0])]}
    assert requests.post(url, data=json.dumps(small)).status_code == 200
    too_many = {"prompts": ["a"] * 3, "metadata": [None] * 3, "images": small["images"] * 3}
    assert requests.post(url, data=json.dumps(too_many)).status_code == 413
    assert requests.post(url, data="x" * 20_000).status_code == 413  # over 0.01 MiB
    assert requests.post(url, data="{not json").status_code == 400
    answer = requests.post(url, data=json.dumps({"prompts": ["a"], "images": ["bm90IGFuIGltYWdl"]}))
    assert answer.status_code == 400 and "not base64 PNG" in answer.json()["error"]
    assert requests.post(url, data=json.dumps({"prompts": "a", "images": []})).status_code == 400
    assert requests.post(url, data=json.dumps({"prompts": ["a", "b"], "images": small["images"]})).status_code == 400
    with pytest.raises(ValueError, match="refusing to serve|Refusing to serve on '0.0.0.0' without a token"):
        make_server(JpegCompressibility(), "0.0.0.0", 0)


def test_a_server_that_dies_mid_epoch_is_a_reward_fault(served, tmp_path, tiny_sd_path):
    calls = []

    def dies_after_first_batch(images, prompts, metadata):
        calls.append(len(prompts))
        if len(calls) == 1:  # answer this request, then go away
            threading.Timer(0.05, server.stop).start()
        return torch.ones(len(prompts)), {}

    server = served(dies_after_first_batch)
    config = LOOPConfig(num_epochs=1, sample_num_steps=2, sample_batch_size=4, sample_num_batches_per_epoch=2,
                        train_batch_size=4, num_samples_per_prompt=2, mixed_precision="no", seed=0,
                        output_dir=str(tmp_path / "run"), reward_error="skip_group", reward_max_skip_fraction=0.5)
    reward = RemoteReward(server.url, max_retries=1, backoff=0.01, timeout=5)
    trainer = LOOPTrainer(config, reward, PROMPTS, LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path))
    trainer.train()  # the second batch fails: its two groups are dropped, the epoch goes on
    assert calls == [4] and trainer.last_metrics["skipped_groups"] == 2
    assert os.path.isdir(tmp_path / "run" / "checkpoints")


CLIENT = """
import sys, torch
from loop_trl.rewards import JpegCompressibility, RemoteReward
images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(int(sys.argv[2])))
prompts = ["p%d" % i for i in range(6)]
local, _ = JpegCompressibility()((images * 255).round() / 255, prompts, [None] * 6)
remote, _ = RemoteReward(sys.argv[1], batch_size=2)(images, prompts, [None] * 6)
assert torch.allclose(remote, local.float(), atol=1e-6), (remote, local)
print("ok")
"""


def test_two_client_processes_at_once(served):
    server = served()
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, server.url, str(seed)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for client in clients:
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0 and out.strip() == "ok", err[-2000:]


def test_cli_refuses_a_public_address_without_a_token():
    result = subprocess.run([sys.executable, "-m", "loop_trl.rewards.serve", "--reward", "jpeg_compressibility",
                             "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "without a token" in result.stderr
