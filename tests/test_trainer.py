import math
import os

import datasets
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from loop_trl import LOOPConfig, LOOPStableDiffusionPipeline, LOOPTrainer
from loop_trl.rewards import JpegCompressibility

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow star"]


def small_config(tmp_path, **overrides) -> LOOPConfig:
    kwargs = dict(num_epochs=2, sample_num_steps=3, sample_batch_size=8, sample_num_batches_per_epoch=1,
                  train_batch_size=4, mixed_precision="no", output_dir=str(tmp_path / "run"),
                  train_learning_rate=1e-2, sample_guidance_scale=2.0, seed=0)
    kwargs.update(overrides)
    return LOOPConfig(**kwargs)


def make_trainer(tmp_path, sd_path, reward=None, prompts=PROMPTS, eval_prompts=None, **overrides) -> LOOPTrainer:
    policy = LOOPStableDiffusionPipeline.from_pretrained(sd_path)
    return LOOPTrainer(small_config(tmp_path, **overrides), reward or JpegCompressibility(), prompts, policy,
                       eval_prompts=eval_prompts)


def lora_weights(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.policy.unet.named_parameters() if p.requires_grad}


def test_epoch_keeps_groups_whole_and_is_on_policy(tmp_path, tiny_sd_path):
    seen = []

    def reward(images, prompts, metadata):
        seen.append(list(prompts))
        return torch.arange(len(prompts), dtype=torch.float32), {}

    trainer = make_trainer(tmp_path, tiny_sd_path, reward=reward)
    before = lora_weights(trainer)
    step = trainer.step(0, 0)
    assert step == 2  # 8 samples / train_batch_size 4, one optimizer step per minibatch
    (prompts,) = seen
    assert all(len(set(prompts[i:i + 4])) == 1 for i in range(0, 8, 4))  # K adjacent copies per prompt
    assert trainer.last_metrics["train/onpolicy_max_abs_logratio"] < 1e-5  # every trained step of the first minibatch
    assert trainer.last_metrics["train/reward_mean"] == pytest.approx(3.5)
    after = lora_weights(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the optimizer moved the adapter
    assert all(p.dtype == torch.float32 for p in after.values())


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda imgs, p, m: (torch.ones(len(p) - 1), {}), "one number per image"),
        (lambda imgs, p, m: (torch.tensor([float("nan")] + [0.0] * (len(p) - 1)), {}), "sample 0 of sampling batch 0 \\(epoch 0, prompt '"),
        (lambda imgs, p, m: (torch.tensor([0.0] * (len(p) - 1) + [float("inf")]), {}), "sample 7 of sampling batch 0"),
        (lambda imgs, p, m: (["good"] * len(p), {}), "sequence of numbers"),
        (lambda imgs, p, m: (None, {}), "sequence of numbers"),
    ],
)
def test_bad_rewards_stop_with_a_clear_message(tmp_path, tiny_sd_path, bad, message):
    trainer = make_trainer(tmp_path, tiny_sd_path, reward=bad)
    before = lora_weights(trainer)
    with pytest.raises((ValueError, TypeError), match=message):
        trainer.step(0, 0)
    assert all(torch.equal(before[n], p) for n, p in lora_weights(trainer).items())


def test_prompt_sources(tmp_path, tiny_sd_path):
    seen = []

    def reward(images, prompts, metadata):
        seen.append((list(prompts), list(metadata)))
        return torch.zeros(len(prompts)), {}

    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS, "id": [0, 1, 2, 3]})
    make_trainer(tmp_path, tiny_sd_path, reward=reward, prompts=dataset).step(0, 0)
    prompts, metadata = seen[-1]
    assert set(prompts) <= set(PROMPTS) and metadata[0] == {"id": PROMPTS.index(prompts[0])}
    make_trainer(tmp_path, tiny_sd_path, reward=reward, prompts=lambda: ("a cat", {"n": 1})).step(0, 0)
    assert seen[-1] == (["a cat"] * 8, [{"n": 1}] * 8)
    with pytest.raises(ValueError, match="empty"):
        make_trainer(tmp_path, tiny_sd_path, prompts=[])
    with pytest.raises(ValueError, match="'prompt' column"):
        make_trainer(tmp_path, tiny_sd_path, prompts=datasets.Dataset.from_dict({"text": PROMPTS}))


def test_grad_norm_is_logged_before_clipping(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path, train_learning_rate=0.05, train_max_grad_norm=1e-8)
    trainer.train(epochs=1)
    norms = [h["train/grad_norm"] for h in trainer.log_history if "train/grad_norm" in h]
    assert norms and all(math.isfinite(n) and n > 1e-6 for n in norms), norms  # the norm clipping saw, not 1e-8


def test_saved_adapter_loads_into_a_fresh_diffusers_pipeline(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path, train_learning_rate=0.05, log_with="tensorboard")
    trainer.train(epochs=1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "run" / "logs" / "loop-trl"
    events = EventAccumulator(str(logs)).Reload()
    logged = set(events.Tags()["scalars"])
    assert {f"train/{name}" for name in ("reward_mean", "reward_std", "reward_group_std", "frac_reward_zero_std",
                                         "onpolicy_max_abs_logratio", "loss", "approx_kl", "clipfrac", "ratio",
                                         "learning_rate", "grad_norm")} | {"time/epoch_s", "time/sampling_s"} <= logged, logged
    out = tmp_path / "adapter"
    trainer.save_pretrained(str(out))
    assert sorted(os.listdir(out)) == ["README.md", "pytorch_lora_weights.safetensors"]
    assert all(key.startswith("unet.") for key in load_file(out / "pytorch_lora_weights.safetensors"))
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "JpegCompressibility" in card and "load_lora_weights" in card
    # the loading snippet samples with the run's settings, and K-1 reads as a number
    assert "num_inference_steps=3, guidance_scale=2.0, eta=1.0" in card and "the other 3 images" in card
    assert 'pipe(prompt="a red circle"' in card  # a prompt of the run, not an unrelated placeholder

    def generate(pipe):
        return pipe("a red circle", num_inference_steps=3, guidance_scale=2.0, output_type="pt", height=32, width=32,
                    generator=torch.Generator().manual_seed(0)).images

    trained = generate(trainer.policy.pipeline)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    base = generate(fresh)
    fresh.load_lora_weights(str(out))
    torch.testing.assert_close(generate(fresh), trained, atol=1e-5, rtol=0)
    assert (base - trained).abs().max() > 1e-3

    # the adapter is not stacked on a pipeline that already has one, but can be resumed as a starting point
    with pytest.raises(ValueError, match="already carries a LoRA adapter"):
        LOOPStableDiffusionPipeline(fresh)
    with pytest.raises(ValueError, match="holds a LoRA adapter, not a base model"):
        LOOPStableDiffusionPipeline.from_pretrained(str(out))
    continued = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path, adapter=str(out))
    torch.testing.assert_close(generate(continued.pipeline), trained, atol=1e-5, rtol=0)


def test_full_finetuning_keeps_fp32_and_saves_the_unet(tmp_path, tiny_sd_path):
    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path, use_lora=False)
    trainer = LOOPTrainer(small_config(tmp_path), JpegCompressibility(), PROMPTS, policy)
    trainer.step(0, 0)
    assert all(p.dtype == torch.float32 for p in trainer.trainable_parameters)
    trainer.save_pretrained(str(tmp_path / "full"))
    assert os.path.isfile(tmp_path / "full" / "unet" / "config.json")


def test_resume_continues_exactly(tmp_path, tiny_sd_path):
    straight = make_trainer(tmp_path / "a", tiny_sd_path, num_epochs=3)
    straight.train()
    interrupted = make_trainer(tmp_path / "b", tiny_sd_path, num_epochs=3)
    interrupted.train(epochs=2)
    checkpoints = sorted(os.listdir(tmp_path / "b" / "run" / "checkpoints"))
    assert checkpoints == ["checkpoint_1", "checkpoint_2"]
    resumed = make_trainer(tmp_path / "b", tiny_sd_path, num_epochs=3, resume_from="latest")
    assert (resumed.first_epoch, resumed.global_step) == (2, 4)
    resumed.train()
    a, b = lora_weights(straight), lora_weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_goes_on_in_the_same_wandb_run_with_its_history(tmp_path, tiny_sd_path, monkeypatch):
    """A resumed run logs into the W&B run it started (accelerate's init_kwargs get its id and resume='allow')
    and keeps its log_history and counters; wandb itself is stood in for."""
    seen = []

    class FakeTracker:
        name = "wandb"
        run = type("Run", (), {"id": "run-abc123"})()

        def log(self, values, step=None, **kwargs):
            pass

        def finish(self):
            pass

    def fake_init_trackers(self, project_name, config=None, init_kwargs=None):
        seen.append(init_kwargs)
        self.trackers = [FakeTracker()]

    monkeypatch.setattr("accelerate.Accelerator.init_trackers", fake_init_trackers)
    first = make_trainer(tmp_path, tiny_sd_path, log_with="wandb", num_epochs=2)
    first.train(epochs=1)
    first.nonfinite_steps = 3  # as if the first epoch had skipped some steps
    first.save_checkpoint()
    resumed = make_trainer(tmp_path, tiny_sd_path, log_with="wandb", num_epochs=2, resume_from="latest")
    assert "id" not in seen[0]["wandb"]
    assert seen[1]["wandb"]["id"] == "run-abc123" and seen[1]["wandb"]["resume"] == "allow"
    assert resumed.log_history == first.log_history and len(resumed.log_history) == 3  # 2 optimizer steps + the epoch
    assert resumed.nonfinite_steps == 3


def test_push_to_hub_uploads_the_saved_folder(tmp_path, tiny_sd_path, monkeypatch):
    calls = {}

    def fake_create_repo(repo_id, **kwargs):
        calls["repo"] = repo_id

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        calls["files"] = sorted(os.listdir(folder_path))
        calls["card"] = open(os.path.join(folder_path, "README.md")).read()
        return "https://huggingface.co/me/model/commit/1"

    monkeypatch.setattr("loop_trl.hub.create_repo", fake_create_repo)
    monkeypatch.setattr("loop_trl.hub.upload_folder", fake_upload_folder)
    trainer = make_trainer(tmp_path, tiny_sd_path)
    url = trainer.push_to_hub("me/model", token="hf_secret_token_value")
    assert url.endswith("/commit/1") and calls["repo"] == "me/model"
    assert calls["files"] == ["README.md", "pytorch_lora_weights.safetensors"]
    assert 'load_lora_weights("me/model")' in calls["card"] and "hf_secret" not in calls["card"]


def test_only_the_selected_steps_are_trained_with_their_weights(tmp_path, tiny_sd_path):
    """train_timestep_start/stop decide which step indices reach log_prob; per-step metrics cover exactly those."""
    trainer = make_trainer(tmp_path, tiny_sd_path, sample_num_steps=5, train_timestep_start=1, train_timestep_stop=-1,
                           train_timestep_weights=[0, 1, 1, 3, 0], log_per_step_metrics=True, train_num_inner_epochs=2)
    scored, log_prob = [], trainer.policy.log_prob

    def spy(trajectories, step, guidance_scale=None, **kwargs):
        scored.extend(torch.as_tensor(step).reshape(-1).tolist())
        return log_prob(trajectories, step, guidance_scale, **kwargs)

    trainer.policy.log_prob = spy
    assert trainer.step_weights.tolist() == pytest.approx([0, 0.6, 0.6, 1.8, 0])  # mean 1 over steps 1..3
    trainer.step(0, 0)
    assert set(scored) == {1, 2, 3}  # 8 samples x 3 eligible steps x 2 passes: each step is drawn
    assert len(scored) == 8 * 3 * 2
    metrics = trainer.last_metrics
    assert {k for k in metrics if k.startswith("train/steps/")} == {f"train/steps/{i}/{m}" for i in (1, 2, 3) for m in ("clipfrac", "abs_logratio")}
    assert metrics["train/onpolicy_max_abs_logratio"] < 1e-5
