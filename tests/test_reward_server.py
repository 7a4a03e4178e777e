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
    assert answer.status_code == 415 and "is not PNG data; this server takes PNG images only" in answer.json()["error"]
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
    assert calls == [4] and trainer.last_metrics["train/skipped_groups"] == 2
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


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny file that is a valid PNG header declaring width x height 1-bit pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _encoded(pil_image, fmt: str) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    pil_image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_the_server_checks_headers_before_decoding_and_answers_every_bad_input_with_4xx(served):
    import base64

    from PIL import Image

    calls = []

    def reward(images, prompts, metadata):
        calls.append(tuple(images.shape))
        return images.mean(dim=(1, 2, 3)), {}

    server = served(reward)

    def post(images, prompts=None):
        body = {"prompts": prompts or ["a cat"] * len(images), "images": images}
        return requests.post(f"{server.url}/score", data=json.dumps(body), timeout=30)

    # a real 9000 x 9000 1-bit PNG of about 10 kB: 81 megapixels, about 1 GB once decoded to floats
    bomb = _encoded(Image.new("1", (9000, 9000)), "PNG")
    assert len(bomb) < 40_000
    answer = post([bomb])
    assert answer.status_code == 413 and "9000 x 9000 = 81.0 megapixels" in answer.json()["error"]
    assert "--max_image_megapixels" in answer.json()["error"]
    huge = base64.b64encode(_png_declaring(20000, 20000)).decode("ascii")  # past PIL's own bomb limit
    answer = post([huge])
    assert answer.status_code == 413 and "400.0 megapixels" in answer.json()["error"]
    small = encode_image(images(1)[0])
    for fmt in ("BMP", "TIFF", "JPEG"):
        answer = post([_encoded(Image.new("RGB", (32, 32)), fmt)])
        assert answer.status_code == 415 and f"is {fmt} data" in answer.json()["error"] and "PNG images only" in answer.json()["error"]
    other_size = _encoded(Image.new("RGB", (32, 48)), "PNG")
    answer = post([small, other_size])
    assert answer.status_code == 400 and "different sizes (32x32, 32x48)" in answer.json()["error"]
    truncated = base64.b64encode(base64.b64decode(small)[:60]).decode("ascii")
    assert post([truncated]).status_code == 400
    assert post(["not base64 !"]).status_code == 400
    assert calls == []  # nothing above reached the reward
    # the request total: 3 images of 0.6 megapixels under a 1-megapixel request cap
    capped = served(reward, max_request_megapixels=1.0)
    body = {"prompts": ["a"] * 3, "images": [_encoded(Image.new("RGB", (800, 800)), "PNG")] * 3}
    answer = requests.post(f"{capped.url}/score", data=json.dumps(body), timeout=30)
    assert answer.status_code == 413 and "1.9 megapixels" in answer.json()["error"]
    # and the server is still up and scoring
    answer = post([small, small])
    assert answer.status_code == 200 and len(answer.json()["rewards"]) == 2 and calls == [(2, 3, 32, 32)]
