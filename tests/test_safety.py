"""Safe loading and secrets: no remote code, no pickles with code, no token on disk or in logs."""

import logging
import os
import pathlib
import pickle

import pytest

from loop_trl import LOOPStableDiffusionPipeline

from test_trainer import make_trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_nothing_enables_remote_code():
    for folder in ("src", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "trust_remote_code=True" not in path.read_text(), path


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_adapters_load_only_from_safetensors(tmp_path, tiny_sd_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    with open(folder / "pytorch_lora_weights.bin", "wb") as f:  # a pickle where the adapter should be
        pickle.dump({"unet.x": _Payload()}, f)
    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path)
    with pytest.raises(OSError, match="no file named pytorch_lora_weights.safetensors"):
        policy.load_weights(str(folder))  # the pickle is never opened


def test_hub_token_never_reaches_disk_or_logs(tmp_path, tiny_sd_path, monkeypatch, caplog):
    secret = "hf_TESTSECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr("loop_trl.hub.create_repo", lambda repo_id, **kwargs: None)
    uploaded = {}

    def fake_upload_folder(repo_id, folder_path, token=None, **kwargs):
        uploaded["token"] = token
        uploaded["files"] = {p.name: p.read_bytes() for p in pathlib.Path(folder_path).iterdir()}
        return "https://huggingface.co/me/model/commit/1"

    monkeypatch.setattr("loop_trl.hub.upload_folder", fake_upload_folder)
    caplog.set_level(logging.DEBUG)
    trainer = make_trainer(tmp_path, tiny_sd_path, log_with="tensorboard", push_to_hub=True, hub_model_id="me/model")
    trainer.train()
    trainer.push_to_hub("me/model", token=secret)
    assert uploaded["token"] == secret  # handed to huggingface_hub, and only there
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    for name, content in uploaded["files"].items():
        assert secret.encode() not in content, name
    assert all(secret not in record.getMessage() for record in caplog.records)
