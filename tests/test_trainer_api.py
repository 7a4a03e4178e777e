"""The trainer as users coming from TRL meet it: keyword construction, TrainerCallback callbacks,
namespaced metrics, push_to_hub's default repository, and the renamed policy API's old names."""

import pytest
import torch
from transformers import TrainerCallback, TrainerState

from loop_trl import LOOPConfig, LOOPStableDiffusionPipeline, LOOPTrainer
from loop_trl.advantages import frac_reward_zero_std
from loop_trl.callbacks import LOOPCallback, epoch_end_actions
from loop_trl.pipelines.base import DiffusionPolicy
from loop_trl.rewards import JpegCompressibility
from test_trainer import PROMPTS, lora_weights, make_trainer, small_config


def numbers(history):
    """The logged numbers of a history, without wall-clock times."""
    return [{k: v for k, v in entry.items() if not k.startswith("time/")} for entry in history]


def test_trl_keywords_ddpo_positions_and_ddpo_keywords_build_the_same_trainer(tmp_path, tiny_sd_path):
    runs = []
    for i, build in enumerate([
        lambda c, p: LOOPTrainer(args=c, reward_funcs=JpegCompressibility(), train_dataset=PROMPTS, model=p),
        lambda c, p: LOOPTrainer(c, JpegCompressibility(), PROMPTS, p),
        lambda c, p: LOOPTrainer(config=c, reward_function=JpegCompressibility(), prompt_function=PROMPTS, sd_pipeline=p),
    ]):
        trainer = build(small_config(tmp_path / str(i)), LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path))
        trainer.step(0, 0)
        runs.append((numbers(trainer.log_history), lora_weights(trainer)))
    for history, weights in runs[1:]:
        assert history == runs[0][0]
        assert all(torch.equal(weights[n], runs[0][1][n]) for n in weights)


def test_a_model_path_is_loaded_and_bad_arguments_are_named(tmp_path, tiny_sd_path):
    trainer = LOOPTrainer(args=small_config(tmp_path), reward_funcs=JpegCompressibility(), train_dataset=PROMPTS,
                          model=tiny_sd_path)
    assert isinstance(trainer.policy, LOOPStableDiffusionPipeline)
    with pytest.raises(TypeError, match="both reward_function= and reward_funcs="):
        LOOPTrainer(small_config(tmp_path), JpegCompressibility(), PROMPTS, trainer.policy, reward_function=len)
    with pytest.raises(TypeError, match="unexpected keyword argument 'prompts'"):
        LOOPTrainer(small_config(tmp_path), JpegCompressibility(), model=trainer.policy, prompts=PROMPTS)
    with pytest.raises(TypeError, match="needs train_dataset="):
        LOOPTrainer(small_config(tmp_path), JpegCompressibility(), model=trainer.policy)
    with pytest.raises(TypeError, match="args must be a LOOPConfig"):
        LOOPTrainer({"num_epochs": 1}, JpegCompressibility(), PROMPTS, trainer.policy)


class Recorder(LOOPCallback):
    def __init__(self, stop_after_epochs=None):
        self.events, self.logged, self.steps_at_end, self.stop_after = [], [], [], stop_after_epochs

    def __getattribute__(self, name):
        if name.startswith("on_") and name not in ("on_log", "on_step_end", "on_epoch_end"):
            self.events.append(name)
        return object.__getattribute__(self, name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_at_end.append(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.events.append("on_epoch_end")
        assert isinstance(args, LOOPConfig) and isinstance(state, TrainerState) and "optimizer" in kwargs
        if self.stop_after is not None and state.epoch >= self.stop_after:
            control.should_training_stop = True
        return control


def test_callbacks_see_transformers_events_and_can_stop_the_run(tmp_path, tiny_sd_path):
    recorder, hooked = Recorder(stop_after_epochs=1), []
    trainer = LOOPTrainer(args=small_config(tmp_path, num_epochs=3), reward_funcs=JpegCompressibility(),
                          train_dataset=PROMPTS, model=LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path),
                          image_samples_hook=lambda data, step, tracker: hooked.append((len(data), step, tracker)),
                          callbacks=[recorder, TrainerCallback])  # a plain transformers callback class is fine too
    trainer.train()
    assert recorder.events[:3] == ["on_init_end", "on_train_begin", "on_epoch_begin"]
    assert recorder.events[3:] == ["on_samples", "on_epoch_end", "on_save", "on_train_end"]
    assert trainer.first_epoch == 1 and trainer.state.epoch == 1 and trainer.state.max_steps == 6
    assert recorder.steps_at_end == [1, 2]  # after each optimizer step
    assert recorder.logged == [{k: v for k, v in e.items() if k != "step"} for e in trainer.log_history]
    assert hooked == [(1, 0, None)]  # the DDPO hook: one sampling batch, called before the epoch's steps
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_1").is_dir()  # a stopped run keeps its last epoch


def test_epoch_end_actions_follow_the_schedule_and_the_callbacks():
    config = LOOPConfig(save_freq=2, eval_freq=3)

    class Control:
        should_training_stop = should_save = should_evaluate = False

    control = Control()
    assert epoch_end_actions(1, 10, config, control, can_evaluate=True) == (False, False, False)
    assert epoch_end_actions(6, 10, config, control, can_evaluate=True) == (True, True, False)
    assert epoch_end_actions(10, 10, config, control, can_evaluate=False) == (False, True, False)
    control.should_evaluate = control.should_save = True
    assert epoch_end_actions(1, 10, config, control, can_evaluate=True) == (True, True, False)
    assert not (control.should_evaluate or control.should_save)  # asked once, done once
    control.should_training_stop = True
    assert epoch_end_actions(1, 10, config, control, can_evaluate=True) == (False, True, True)


def test_metrics_are_namespaced_and_count_groups_without_signal(tmp_path, tiny_sd_path):
    def half_constant(images, prompts, metadata):  # the first prompt group's 4 images all score 1
        return torch.tensor([1.0] * 4 + [float(i) for i in range(4)]), {}

    trainer = make_trainer(tmp_path, tiny_sd_path, reward=half_constant)
    trainer.step(0, 0)
    epoch, step = trainer.log_history[-1], trainer.log_history[0]
    assert epoch["train/frac_reward_zero_std"] == 0.5
    assert {"train/reward_mean", "train/reward_std", "train/advantage_abs_mean", "train/onpolicy_max_abs_logratio",
            "time/epoch_s", "time/sampling_s", "time/reward_s", "time/training_s"} <= set(epoch)
    assert {"train/loss", "train/approx_kl", "train/clipfrac", "train/learning_rate", "train/grad_norm"} <= set(step)
    assert all("/" in key for entry in trainer.log_history for key in entry if key != "step")


def test_frac_reward_zero_std_counts_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 5.0, 5.0 + 1e-6])
    groups = torch.tensor([7, 7, 3, 3, 9, 9, 1, 1])  # any ids, in any order
    assert frac_reward_zero_std(rewards, groups) == 0.5  # groups 7 and 9; a difference of 1e-6 is a signal
    assert frac_reward_zero_std(torch.zeros(6), torch.arange(6) // 3) == 1.0


def test_report_to_is_log_withs_trl_name():
    assert LOOPConfig(report_to="tensorboard").log_with == "tensorboard"
    assert LOOPConfig(report_to="none").log_with is None
    assert LOOPConfig(report_to="tensorboard", log_with="wandb").log_with == "wandb"
    with pytest.raises(ValueError, match="log_with"):
        LOOPConfig(report_to="tensorbored")


def test_push_to_hub_defaults_to_the_configured_repository(tmp_path, tiny_sd_path, monkeypatch):
    import loop_trl.trainer as trainer_module

    uploads = []
    monkeypatch.setattr(trainer_module, "upload_to_hub", lambda folder, repo_id, **kw: uploads.append((repo_id, kw)) or "url")
    trainer = make_trainer(tmp_path, tiny_sd_path, hub_model_id="me/loop-test", hub_private=True)
    assert trainer.push_to_hub() == "url"
    assert uploads[-1][0] == "me/loop-test" and uploads[-1][1]["private"] is True
    trainer.push_to_hub("me/other", private=False)
    assert uploads[-1][0] == "me/other" and uploads[-1][1]["private"] is False
    trainer.config.hub_model_id = None
    with pytest.raises(ValueError, match="hub_model_id"):
        trainer.push_to_hub()


def test_the_policys_former_names_still_work_with_a_warning(tmp_path, tiny_sd_path):
    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path)
    with pytest.warns(FutureWarning, match="save_weights"):
        policy.save_adapter(str(tmp_path / "a"))
    other = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path, lora_seed=1)
    with pytest.warns(FutureWarning, match="load_weights"):
        other.load_adapter(str(tmp_path / "a"))
    assert all(torch.equal(p, q) for p, q in zip(policy.trainable_parameters(), other.trainable_parameters()))

    with pytest.warns(FutureWarning, match="former name of save_weights"):
        class OldStyle(LOOPStableDiffusionPipeline):  # a policy written against the old names
            def save_adapter(self, save_directory, state_dict=None):
                self.saved_to = save_directory

    assert OldStyle.save_weights is OldStyle.__dict__["save_adapter"]
    assert issubclass(OldStyle, DiffusionPolicy)


def test_unet_is_kept_for_the_unet_families_and_warns_for_the_transformer_ones(tiny_sd_path):
    from loop_trl import LOOPStableDiffusion3Pipeline
    from loop_trl.testing import build_tiny_stable_diffusion_3

    import warnings

    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert policy.unet is policy.trainable_module  # TRL DDPO's name, still right for a UNet
    sd3 = LOOPStableDiffusion3Pipeline(build_tiny_stable_diffusion_3())
    with pytest.warns(FutureWarning, match="use trainable_module"):
        assert sd3.unet is sd3.trainable_module


def test_a_policy_whose_log_prob_takes_no_denoiser_still_trains_through_the_prepared_module(tmp_path, tiny_sd_path):
    """The former contract: the trainer sets policy.denoiser; warned about, and the gradients still flow."""
    class OldContract(LOOPStableDiffusionPipeline):
        def log_prob(self, trajectories, step, guidance_scale=None):
            return super().log_prob(trajectories, step, guidance_scale, denoiser=self.denoiser)

    policy = OldContract.from_pretrained(tiny_sd_path)
    with pytest.warns(FutureWarning, match="takes no `denoiser` argument"):
        trainer = LOOPTrainer(small_config(tmp_path), JpegCompressibility(), PROMPTS, policy)
    reference = make_trainer(tmp_path / "new", tiny_sd_path)
    trainer.step(0, 0)
    reference.step(0, 0)
    assert policy.denoiser is trainer.model
    assert numbers(trainer.log_history) == numbers(reference.log_history)
