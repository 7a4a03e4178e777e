"""The KL penalty to the reference policy (``beta``) and the EMA of the trained weights (``use_ema``),
each against an independent computation: torch's own Gaussian KL, the base model loaded afresh by
diffusers, and the EMA recurrence as diffusers' EMAModel documents it, written out here."""

import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from loop_trl import LOOPStableDiffusionPipeline, LOOPTrainer
from loop_trl.evaluation import sample_and_score
from loop_trl.objective import gaussian_kl
from loop_trl.rewards import JpegCompressibility
from test_trainer import PROMPTS, lora_weights, make_trainer, small_config


def test_gaussian_kl_is_torchs_kl_averaged_over_entries():
    g = torch.Generator().manual_seed(0)
    mean, reference = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    std = torch.rand(3, 1, 1, 1, generator=g) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                                 torch.distributions.Normal(reference, std.expand_as(mean)))
    torch.testing.assert_close(gaussian_kl(mean, reference, std), expected.mean(dim=(1, 2, 3)))
    assert gaussian_kl(mean, mean, std).abs().max() == 0


def reference_mean_of_base_unet(trainer, tiny_sd_path, trajectories, step):
    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")  # the base weights, loaded afresh
    return trainer.policy.step_distribution(trajectories, step, denoiser=base).mean


def test_the_reference_is_the_base_model_and_the_penalty_keeps_the_policy_near_it(tmp_path, tiny_sd_path):
    free = make_trainer(tmp_path / "free", tiny_sd_path, num_epochs=3, train_learning_rate=3e-2)
    held = make_trainer(tmp_path / "held", tiny_sd_path, num_epochs=3, train_learning_rate=3e-2, beta=300.0)
    free.train()
    held.train()
    kls = [h["train/kl"] for h in held.log_history if "train/kl" in h]
    assert kls[0] == 0.0 and max(kls) > 0  # LoRA starts at the base model (its B matrices are zero), then moves
    assert not any("train/kl" in h for h in free.log_history)  # beta 0 computes no reference

    trajectories = held.rollout.collect(epoch=7).trajectories
    step = torch.full((len(trajectories),), 1)
    base_mean = reference_mean_of_base_unet(held, tiny_sd_path, trajectories, step)
    with torch.no_grad(), held.policy.reference() as reference:
        torch.testing.assert_close(held.policy.step_distribution(trajectories, step, denoiser=reference).mean,
                                   base_mean, rtol=1e-5, atol=1e-6)
    # the adapter is enabled again after the context, and the penalty kept the held policy nearer the base
    distance = {}
    for name, trainer in (("free", free), ("held", held)):
        with torch.no_grad():
            policy = trainer.policy.step_distribution(trajectories, step)
        distance[name] = gaussian_kl(policy.mean, base_mean, policy.std).mean().item()
    assert 0 < distance["held"] < 0.5 * distance["free"], distance  # measured: 1.16 against 2.75


def test_full_fine_tuning_keeps_a_frozen_copy_as_the_reference(tmp_path, tiny_sd_path):
    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path, use_lora=False)
    LOOPTrainer(small_config(tmp_path, beta=1.0, num_epochs=1), JpegCompressibility(), PROMPTS, policy).train()
    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").state_dict()
    with policy.reference() as reference:
        assert reference is not policy.trainable_module and not any(p.requires_grad for p in reference.parameters())
        assert all(torch.equal(reference.state_dict()[n], base[n]) for n in base)
    assert any(not torch.equal(policy.trainable_module.state_dict()[n], base[n]) for n in base)  # the policy moved


def test_ema_follows_diffusers_recurrence_and_is_what_gets_saved_and_evaluated(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path, num_epochs=2, use_ema=True, ema_decay=0.5, ema_update_interval=2,
                           eval_prompts=PROMPTS[:2], eval_num_steps=3, eval_num_images_per_prompt=1)
    snapshots, step = [], trainer.update.optimizer_step

    def recording(*args, **kwargs):
        result = step(*args, **kwargs)
        snapshots.append([p.detach().clone() for p in trainer.trainable_parameters])
        return result

    trainer.update.optimizer_step = recording
    trainer.train()
    assert len(snapshots) == 4
    # updates after steps 2 and 4; update n uses decay min(ema_decay, n / (n + 9)), and the first copies the weights
    expected = snapshots[1]
    decay = min(0.5, 2 / 11)
    expected = [decay * e + (1 - decay) * p for e, p in zip(expected, snapshots[3])]
    for shadow, value in zip(trainer.update.ema.shadow_params, expected):
        torch.testing.assert_close(shadow, value, rtol=1e-6, atol=1e-7)
    trained = [p.detach().clone() for p in trainer.trainable_parameters]
    assert all(torch.equal(t, s) for t, s in zip(trained, snapshots[3]))  # training weights restored after saving

    saved = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path, adapter=str(tmp_path / "run"))
    for p, e in zip(saved.trainable_parameters(), expected):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
    brightness = trainer.reward_function
    alone = sample_and_score(saved, brightness, PROMPTS[:2], images_per_prompt=1, seed=0, num_steps=3,
                             guidance_scale=2.0, eta=1.0, batch_size=8)
    assert trainer.evaluate(log=False)["reward_mean"] == pytest.approx(sum(alone.rewards) / len(alone.rewards), abs=1e-6)


def test_resume_with_kl_and_ema_continues_exactly(tmp_path, tiny_sd_path):
    settings = dict(num_epochs=3, beta=10.0, use_ema=True, ema_decay=0.8)
    straight = make_trainer(tmp_path / "a", tiny_sd_path, **settings)
    straight.train()
    interrupted = make_trainer(tmp_path / "b", tiny_sd_path, **settings)
    interrupted.train(epochs=2)
    assert os.path.isfile(tmp_path / "b" / "run" / "checkpoints" / "checkpoint_2" / "custom_checkpoint_1.pkl")
    resumed = make_trainer(tmp_path / "b", tiny_sd_path, resume_from="latest", **settings)
    resumed.train()
    a, b = lora_weights(straight), lora_weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(x, y) for x, y in zip(straight.update.ema.shadow_params, resumed.update.ema.shadow_params))
    numbers = lambda t: [{k: v for k, v in e.items() if not k.startswith("time/")} for e in t.log_history]  # noqa: E731
    assert numbers(straight) == numbers(resumed)
    final_a, final_b = load_file(tmp_path / "a" / "run" / "pytorch_lora_weights.safetensors"), \
        load_file(tmp_path / "b" / "run" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(final_a[n], final_b[n]) for n in final_a)
