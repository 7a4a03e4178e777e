"""Reward faults, non-finite steps, and what survives them."""

import os

import pytest
import torch

from loop_trl import LOOPStableDiffusionPipeline, LOOPTrainer
from loop_trl.rewards import JpegCompressibility

from test_trainer import PROMPTS, lora_weights, make_trainer, small_config


def test_raising_reward_names_where_and_leaves_the_checkpoint_loadable(tmp_path, tiny_sd_path):
    state = {"fail": False}
    jpeg = JpegCompressibility()

    def flaky(images, prompts, metadata):
        if state["fail"]:
            raise ConnectionError("reward server down")
        return jpeg(images, prompts, metadata)

    trainer = make_trainer(tmp_path, tiny_sd_path, reward=flaky, num_epochs=3)
    trainer.train(epochs=1)
    saved = lora_weights(trainer)
    state["fail"] = True
    with pytest.raises(RuntimeError, match=r"reward_function raised ConnectionError: reward server down \[epoch 1, sampling batch 0, prompts \["):
        trainer.train()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["checkpoint_1"]
    state["fail"] = False
    resumed = make_trainer(tmp_path, tiny_sd_path, reward=flaky, num_epochs=3, resume_from="latest")
    assert resumed.first_epoch == 1
    assert all(torch.equal(saved[n], p) for n, p in lora_weights(resumed).items())
    resumed.train()
    assert resumed.first_epoch == 3


def test_skip_group_drops_only_the_faulty_group(tmp_path, tiny_sd_path):
    seen = {}

    def one_nan(images, prompts, metadata):
        rewards = torch.arange(len(prompts), dtype=torch.float32)
        rewards[5] = float("nan")  # sample 5 belongs to the second group (samples 4..7)
        return rewards, {}

    trainer = make_trainer(tmp_path, tiny_sd_path, reward=one_nan, reward_error="skip_group")
    original = trainer.update.inner_epoch

    def capture(model, trajectories, advantages, *args):
        seen["advantages"] = advantages.clone()
        return original(model, trajectories, advantages, *args)

    trainer.update.inner_epoch = capture
    import loop_trl.update as update_module

    surrogate, weights = update_module.clipped_surrogate, []

    def recording(log_prob, old_log_prob, advantages, clip_range, sample_weights=None):
        weights.append((advantages.detach().clone(), sample_weights.detach().clone()))
        return surrogate(log_prob, old_log_prob, advantages, clip_range, sample_weights)

    update_module.clipped_surrogate = recording
    try:
        trainer.step(0, 0)
    finally:
        update_module.clipped_surrogate = surrogate
    assert trainer.last_metrics["train/skipped_groups"] == 1
    assert trainer.last_metrics["train/reward_mean"] == pytest.approx(1.5)  # mean of the kept rewards 0..3
    adv = seen["advantages"]
    assert torch.equal(adv[4:], torch.zeros(4)) and torch.isfinite(adv).all() and adv[:4].abs().sum() > 0
    # the dropped group is not scored; the kept half weighs 2 (1 / kept fraction), scaled to the minibatch it shares
    # a forward pass with, so each pass's loss is sum(kept terms) / 4: the kept group's step alone, undiluted
    scored = 0
    for advantages, sample_weights in weights:
        if (sample_weights == 0).all():  # a minibatch of dropped samples only: one placeholder row weighing 0
            assert len(sample_weights) == 1
            continue
        assert (advantages != 0).all() and torch.allclose(sample_weights, torch.full_like(sample_weights, 2.0 * len(sample_weights) / 4))
        scored += len(sample_weights)
    assert scored == 4 * 3  # the 4 kept samples x 3 trained steps, and no dropped sample


def test_skip_group_stops_past_the_allowed_fraction(tmp_path, tiny_sd_path):
    def broken(images, prompts, metadata):
        raise OSError("disk full")

    trainer = make_trainer(tmp_path, tiny_sd_path, reward=broken, reward_error="skip_group")
    before = lora_weights(trainer)
    with pytest.raises(RuntimeError, match="reward failed for 2 of 2 prompt groups"):
        trainer.step(0, 0)
    assert all(torch.equal(before[n], p) for n, p in lora_weights(trainer).items())

    calls = []

    def half_broken(images, prompts, metadata):  # the first of two sampling batches fails
        calls.append(1)
        if len(calls) % 2 == 1:
            raise OSError("disk full")
        return torch.zeros(len(prompts)), {}

    ok = make_trainer(tmp_path, tiny_sd_path, reward=half_broken, reward_error="skip_group",
                      sample_num_batches_per_epoch=2, reward_max_skip_fraction=0.5)
    ok.step(0, 0)
    assert ok.last_metrics["train/skipped_groups"] == 2
    strict = make_trainer(tmp_path, tiny_sd_path, reward=half_broken, reward_error="skip_group",
                          sample_num_batches_per_epoch=2, reward_max_skip_fraction=0.25)
    with pytest.raises(RuntimeError, match="2 of 4 prompt groups"):
        strict.step(0, 0)


def test_nonfinite_loss_skips_the_step_and_stops_after_too_many(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path, max_consecutive_nonfinite_steps=3)
    log_prob = trainer.policy.log_prob
    poisoned = {"calls": 0, "bad": {0, 1, 2}}  # the first optimizer step (3 timesteps x 1 minibatch) is poisoned

    def sometimes_nan(*args, **kwargs):
        out = log_prob(*args, **kwargs)
        poisoned["calls"] += 1
        return out * float("nan") if poisoned["calls"] - 1 in poisoned["bad"] else out

    trainer.policy.log_prob = sometimes_nan
    before = lora_weights(trainer)
    trainer.step(0, 0)  # step 1 skipped, step 2 taken
    assert trainer.nonfinite_steps == 1 and trainer.consecutive_nonfinite_steps == 0
    after = lora_weights(trainer)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(s["exp_avg"]).all() for s in trainer.optimizer.state.values())

    poisoned["bad"] = set(range(10_000))
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row had a non-finite"):
        for epoch in (1, 2):  # 2 optimizer steps per epoch
            trainer.step(epoch, 0)
    stuck = lora_weights(trainer)
    assert all(torch.equal(after[n], stuck[n]) for n in after)  # nothing non-finite reached the weights


def test_long_prompts_are_truncated_with_a_warning(tmp_path, tiny_sd_path, caplog):
    long_prompt = "a red circle " * 20  # 260 characters: longer than the tiny tokenizer's 77 tokens
    trainer = make_trainer(tmp_path, tiny_sd_path, prompts=[long_prompt])
    trainer.step(0, 0)
    assert any("truncated" in record.getMessage() for record in caplog.records)


def test_checkpoints_rotate_and_ignore_partial_folders(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path, num_epochs=4, num_checkpoint_limit=2)
    (tmp_path / "run" / "checkpoints" / "checkpoint_9.partial").mkdir(parents=True)
    trainer.train()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["checkpoint_3", "checkpoint_4", "checkpoint_9.partial"]
    resumed = make_trainer(tmp_path, tiny_sd_path, num_epochs=4, resume_from="latest")
    assert resumed.first_epoch == 4
    with pytest.raises(ValueError, match="not a LOOP checkpoint"):
        make_trainer(tmp_path, tiny_sd_path, resume_from=str(tmp_path / "run" / "checkpoints" / "checkpoint_9.partial"))


def test_lr_scheduler_follows_optimizer_steps(tmp_path, tiny_sd_path):
    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path)
    config = small_config(tmp_path, num_epochs=2, train_lr_scheduler="linear", train_learning_rate=1e-2)
    trainer = LOOPTrainer(config, JpegCompressibility(), PROMPTS, policy)
    rates = []
    for epoch in range(2):
        trainer.step(epoch, trainer.global_step)
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    # 2 epochs x 2 optimizer steps: linear decay to 0 after 4 steps
    assert rates == pytest.approx([5e-3, 0.0])


def test_cosine_can_end_above_zero(tmp_path, tiny_sd_path):
    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path)
    config = small_config(tmp_path, num_epochs=2, train_lr_scheduler="cosine", train_lr_min_ratio=0.25,
                          train_learning_rate=1e-2)
    trainer = LOOPTrainer(config, JpegCompressibility(), PROMPTS, policy)
    rates = []
    for epoch in range(2):
        trainer.step(epoch, trainer.global_step)
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    # 4 optimizer steps; halfway the cosine is midway between the peak and its floor, at the end on the floor
    assert rates == pytest.approx([(1e-2 + 2.5e-3) / 2, 2.5e-3])


class TokenizerReward:
    """A reward that tokenizes its prompts with a Hugging Face fast tokenizer (not thread-safe: two threads in it at
    once can raise "Already borrowed") and records how many threads were ever inside it together."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "a", "red", "circle", "blue", "square", "two", "green",
                                             "triangles", "yellow", "star"])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
        self.inside = self.most_inside = 0
        self.guard = __import__("threading").Lock()

    def __call__(self, images, prompts, metadata):
        import time

        with self.guard:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            time.sleep(0.3)  # long enough that a second worker would arrive while this one is inside
            tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=4 + len(prompts) % 3)
            return torch.tensor([float(sum(ids)) for ids in tokens["input_ids"]]), {}
        finally:
            with self.guard:
                self.inside -= 1


def test_async_scoring_calls_a_reward_one_thread_at_a_time(tmp_path, tiny_sd_path):
    reward = TokenizerReward()
    trainer = make_trainer(tmp_path, tiny_sd_path, reward=reward, async_reward_computation=True, max_workers=2,
                           sample_batch_size=4, sample_num_batches_per_epoch=3, train_batch_size=4)
    trainer.step(0, 0)
    assert reward.most_inside == 1  # two workers, but the reward is not thread-safe: never two threads inside
    assert trainer.last_metrics["train/skipped_groups"] == 0
    assert trainer.config.max_workers == 2 and small_config(tmp_path).max_workers == 1  # one worker by default


def test_train_cfg_off_with_guidance_warns_at_config_time(tmp_path):
    with pytest.warns(UserWarning, match="train_cfg=False .* off-policy from its first step"):
        small_config(tmp_path, train_cfg=False, sample_guidance_scale=2.0)


def test_evaluation_vets_the_reward_and_reports_each_component(tmp_path, tiny_sd_path):
    def brightness(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)), {}

    def unscorable_star(images, prompts, metadata):  # cannot score one prompt: NaN there
        return torch.tensor([float("nan") if "star" in p else 1.0 for p in prompts]), {}

    trainer = make_trainer(tmp_path, tiny_sd_path, reward={"bright": brightness, "star": unscorable_star},
                           eval_prompts=PROMPTS, eval_num_steps=2, eval_num_images_per_prompt=1, eval_batch_size=4)
    metrics = trainer.evaluate(log=False)
    assert metrics["rewards/star/mean"] == 1.0 and metrics["num_images"] == 4  # NaN left out of the component's mean
    assert metrics["rewards/bright/mean"] == pytest.approx(metrics["reward_mean"] - 0.75, abs=1e-6)

    def nan_for_star(images, prompts, metadata):
        return torch.tensor([float("nan") if "star" in p else 0.5 for p in prompts]), {}

    strict = make_trainer(tmp_path / "a", tiny_sd_path, reward=nan_for_star, eval_prompts=PROMPTS, eval_num_steps=2,
                          eval_num_images_per_prompt=1, eval_batch_size=4)
    with pytest.raises(ValueError, match="returned nan for evaluation prompt 'a yellow star'"):
        strict.evaluate(log=False)
    lenient = make_trainer(tmp_path / "b", tiny_sd_path, reward=nan_for_star, eval_prompts=PROMPTS, eval_num_steps=2,
                           eval_num_images_per_prompt=1, eval_batch_size=4, reward_error="skip_group")
    metrics = lenient.evaluate(log=False)
    assert metrics["reward_mean"] == 0.5 and metrics["num_images"] == 3 and metrics["num_dropped"] == 1
    wrong = make_trainer(tmp_path / "c", tiny_sd_path, reward=lambda i, p, m: (torch.ones(len(p) - 1), {}),
                         eval_prompts=PROMPTS, eval_num_steps=2, eval_num_images_per_prompt=1, eval_batch_size=4)
    with pytest.raises(ValueError, match="one number per image"):
        wrong.evaluate(log=False)


def test_the_fp16_scalers_warm_up_skips_are_not_non_finite_steps(tmp_path, tiny_sd_path):
    """A GradScaler starts at 2^16 and halves its scale at each overflow; a healthy fp16 run skips a few steps
    that way. Here the scaled gradients overflow while the scale is above 2^10, as fp16 gradients would: six
    skips in a row, more than max_consecutive_nonfinite_steps, and the run goes on and trains."""
    trainer = make_trainer(tmp_path, tiny_sd_path, sample_batch_size=8, train_batch_size=1,
                           max_consecutive_nonfinite_steps=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # accelerate makes no fp16 scaler on a CPU: as it would
    from accelerate.optimizer import AcceleratedOptimizer

    trainer.accelerator.scaler = scaler
    trainer.optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, scaler=scaler)
    overflow = lambda grad: grad * float("inf") if scaler.get_scale() > 2.0**10 else grad  # noqa: E731
    hooks = [p.register_hook(overflow) for p in trainer.trainable_parameters[:1]]
    before = lora_weights(trainer)
    trainer.step(0, 0)
    for hook in hooks:
        hook.remove()
    assert trainer.scaler_skipped_steps == 6 and trainer.nonfinite_steps == 0  # 2^16 .. 2^11 skipped, then steps
    assert scaler.get_scale() == 2.0**10
    assert any(not torch.equal(before[n], p) for n, p in lora_weights(trainer).items())
    assert trainer.log_history[-2]["train/scaler_skipped_steps"] == 6
