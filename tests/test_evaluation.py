"""Evaluation: fixed prompts and noise, scored and summarised; in the trainer under eval/."""

import math

import pytest
import torch

from loop_trl.evaluation import EvalSamples, eval_batches, sample_and_score, summarize
from test_trainer import PROMPTS, make_trainer


def brightness(images, prompts, metadata):
    """Mean pixel, plus per-image metadata: a bool, a category, and something that is not per-image."""
    values = images.mean(dim=(1, 2, 3))
    return values, {"bright": values > 0.5, "category": [p.split()[1] for p in prompts], "note": "ignored"}


def test_summarize_gives_means_standard_errors_and_categories():
    samples = EvalSamples(prompts=["a", "a", "b", "b"], rewards=[1.0, 0.0, 1.0, 1.0],
                          values={"strict": [1.0, 0.0, 0.0, 1.0]}, categories=["x", "x", "y", "y"])
    metrics = summarize(samples)
    assert metrics["reward_mean"] == 0.75 and metrics["strict_mean"] == 0.5 and metrics["num_images"] == 4
    assert metrics["reward_sem"] == pytest.approx(0.5 / 2)  # sample std 0.5, sqrt(4)
    assert metrics["reward_mean/x"] == 0.5 and metrics["reward_mean/y"] == 1.0
    assert metrics["strict_mean/x"] == 0.5 and metrics["strict_mean/y"] == 0.5


def test_images_do_not_depend_on_which_batches_run_together(tiny_sd_path):
    from loop_trl import LOOPStableDiffusionPipeline

    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path)
    kwargs = dict(images_per_prompt=2, seed=3, num_steps=2, guidance_scale=1.0, batch_size=3)
    whole = sample_and_score(policy, brightness, PROMPTS, **kwargs)
    assert len(eval_batches(PROMPTS, 2, 3)) == 3 and len(whole.rewards) == 8
    split = EvalSamples()
    for b in (0, 2, 1):  # two "processes" running their shares in another order
        split.extend(sample_and_score(policy, brightness, PROMPTS, batch_indices=[b], **kwargs))
    by_prompt = lambda s: sorted(zip(s.prompts, s.rewards))  # noqa: E731
    assert by_prompt(split) == by_prompt(whole)
    assert set(whole.values) == {"bright"} and whole.categories[:2] == ["red", "red"]
    other_seed = sample_and_score(policy, brightness, PROMPTS, **{**kwargs, "seed": 4})
    assert other_seed.rewards != whole.rewards
    # each image has its own noise: another batch size gives the same images (up to float32 kernels
    # that sum in another order for another batch size)
    rebatched = sample_and_score(policy, brightness, PROMPTS, **{**kwargs, "batch_size": 8}).rewards
    assert rebatched == pytest.approx(whole.rewards, abs=1e-5) and other_seed.rewards != pytest.approx(whole.rewards, abs=1e-3)


def test_trainer_evaluates_on_schedule_and_logs_under_eval(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path, reward=brightness, eval_prompts=PROMPTS, eval_freq=2, num_epochs=2,
                           eval_num_steps=2, eval_num_images_per_prompt=2, eval_batch_size=4)
    first = trainer.evaluate(log=False)
    assert first == trainer.evaluate(log=False)  # same weights, same noise: same numbers
    assert {"reward_mean", "reward_sem", "bright_mean", "reward_mean/red"} <= set(first)
    trainer.train()
    evals = [h for h in trainer.log_history if "eval/reward_mean" in h]
    assert [h["eval/epochs_completed"] for h in evals] == [0, 2]  # before training and after the last epoch
    assert evals[0]["eval/reward_mean"] == first["reward_mean"]
    assert evals[1]["eval/reward_mean"] != first["reward_mean"]  # the weights moved (lr 1e-2)
    assert evals[1]["step"] == trainer.global_step > 0
    trainer.end_training()  # leaves the trainer usable in this process, weights unchanged
    assert trainer.evaluate(log=False)["reward_mean"] == evals[1]["eval/reward_mean"]


def test_eval_settings_are_checked_early(tmp_path, tiny_sd_path):
    with pytest.raises(ValueError, match="eval_freq=1 needs evaluation prompts"):
        make_trainer(tmp_path, tiny_sd_path, eval_freq=1)
    trainer = make_trainer(tmp_path, tiny_sd_path)
    with pytest.raises(ValueError, match="needs evaluation prompts"):
        trainer.evaluate()
    assert math.isnan(summarize(EvalSamples(prompts=["a"], rewards=[1.0]))["reward_sem"])


def test_eval_prompts_from_a_dataset_pass_their_metadata(tmp_path, tiny_sd_path):
    import datasets

    seen = []

    def reward(images, prompts, metadata):
        seen.extend(metadata)
        return torch.zeros(len(prompts)), {}

    table = datasets.Dataset.from_dict({"prompt": PROMPTS, "level": [1, 2, 3, 4]})
    trainer = make_trainer(tmp_path, tiny_sd_path, reward=reward, eval_prompts=table, eval_num_steps=2,
                           eval_num_images_per_prompt=1)
    assert trainer.evaluate(log=False)["num_images"] == 4
    assert sorted(m["level"] for m in seen) == [1, 2, 3, 4]


def test_deterministic_evaluation_samples_as_users_deploy_and_logs_apart(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path, reward=brightness, eval_prompts=PROMPTS, eval_freq=1, num_epochs=1,
                           eval_num_steps=3, eval_num_images_per_prompt=2, eval_batch_size=4, eval_deterministic=True)
    stochastic, deployed = trainer.evaluate(log=False), trainer.evaluate(log=False, deterministic=True)
    assert stochastic["reward_mean"] != pytest.approx(deployed["reward_mean"], abs=1e-6)
    # the deployed sampler: every step deterministic, the same images as sample_and_score at eta 0
    expected = sample_and_score(trainer.policy, brightness, PROMPTS, images_per_prompt=2, seed=0, num_steps=3,
                                guidance_scale=2.0, eta=0.0, batch_size=4)
    assert deployed["reward_mean"] == pytest.approx(sum(expected.rewards) / len(expected.rewards), abs=1e-6)
    trainer.train()
    logged = [h for h in trainer.log_history if "eval_deterministic/reward_mean" in h]
    assert [h["eval_deterministic/epochs_completed"] for h in logged] == [0, 1]
    assert logged[0]["eval_deterministic/reward_mean"] == pytest.approx(deployed["reward_mean"], abs=1e-9)
    assert all("eval/reward_mean" not in h for h in logged)  # its own rows, its own prefix

    zero = make_trainer(tmp_path / "zero", tiny_sd_path, reward=brightness, eval_prompts=PROMPTS, eval_num_steps=3,
                        eval_num_images_per_prompt=2, eval_batch_size=4, eval_eta=0.0)
    assert zero.evaluate(log=False)["reward_mean"] == pytest.approx(deployed["reward_mean"], abs=1e-6)


def test_evaluation_keeps_the_training_sde_window(tmp_path, tiny_sd_path):
    """With sample_sde_window the policy is trained on a sampler with noise on the trained steps only: the
    evaluation samples with that one, not with noise on every step."""
    kwargs = dict(reward=brightness, eval_prompts=PROMPTS, eval_num_steps=3, eval_num_images_per_prompt=2,
                  eval_batch_size=4, sample_num_steps=3, train_timestep_start=1, train_timestep_stop=2)
    windowed = make_trainer(tmp_path / "w", tiny_sd_path, sample_sde_window=True, **kwargs).evaluate(log=False)
    full = make_trainer(tmp_path / "f", tiny_sd_path, **kwargs)
    expected = sample_and_score(full.policy, brightness, PROMPTS, images_per_prompt=2, seed=0, num_steps=3,
                                guidance_scale=2.0, eta=1.0, batch_size=4, stochastic_steps=[1])
    assert windowed["reward_mean"] == pytest.approx(sum(expected.rewards) / len(expected.rewards), abs=1e-6)
    assert full.evaluate(log=False)["reward_mean"] != pytest.approx(windowed["reward_mean"], abs=1e-6)
