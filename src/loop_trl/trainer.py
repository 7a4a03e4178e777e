"""``LOOPTrainer``: sample K per prompt -> score -> leave-one-out advantages -> clipped PPO passes -> log -> save.

Each job has its module: :mod:`~loop_trl.rollout` (sampling, asynchronous scoring), :mod:`~loop_trl.scoring`
(the reward, its fault policy, advantages across processes), :mod:`~loop_trl.update` (PPO passes, optimizer
steps), :mod:`~loop_trl.state` (checkpoints), :mod:`~loop_trl.callbacks` (callbacks, trackers),
:mod:`~loop_trl.engine` (the accelerator), :mod:`~loop_trl.inputs` (what the trainer is given)."""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import weakref
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState

from .advantages import PerPromptStatTracker
from .callbacks import (CallbackList, ImageSamplesCallback, close_trackers, epoch_end_actions, init_trackers,
                        tracker_run_ids)
from .config import LOOPConfig
from .inputs import check_sampler_settings, resolve_inputs
from .engine import DTYPES, accumulation_steps, clock, engine_saves_model, leave_process_group, make_accelerator
from .evaluation import evaluate_across_processes
from .hub import upload_to_hub, write_model_card
from .pipelines.base import DiffusionPolicy
from .prompts import PromptSource
from .rollout import RolloutCollector
from .scoring import RewardFunction, RewardScorer, advantages_across_processes, check_reward_input, reward_component_metrics
from .state import CheckpointFolder, TrainerCheckpoints, forwarded
from .timesteps import normalized_step_weights, refuse_untrainable_steps
from .update import PPOUpdate, make_lr_scheduler, make_optimizer, optimizer_steps_per_epoch

__all__ = ["LOOPTrainer"]

logger = get_logger(__name__)

class LOOPTrainer:
    """Fine-tunes a diffusion policy with LOOP (or PPO/DDPO, REINFORCE, GRPO-style variants).

    Construct it with TRL's keywords, or positionally as TRL's ``DDPOTrainer(config, reward_function,
    prompt_function, sd_pipeline, image_samples_hook)`` (whose keyword names also work).

    Args:
        args: a :class:`LOOPConfig` (default: ``LOOPConfig()``).
        reward_funcs: ``reward(images, prompts, prompt_metadata) -> (rewards, reward_metadata)`` with
            ``images`` a (B, 3, H, W) tensor in [0, 1] and one reward per image; or a list or
            ``{name: reward}`` dict of such rewards, combined as the ``reward_weights``-weighted sum
            (:class:`loop_trl.rewards.MultiReward`), each logged as ``rewards/{name}/mean`` and ``/std``.
        train_dataset: the training prompts: a list of prompts, a ``datasets.Dataset`` with a ``prompt``
            column, or ``prompt_function() -> (prompt, metadata)``.
        model: the policy (any :class:`DiffusionPolicy`), or a base model's Hub id or folder (:func:`load_policy`).
        image_samples_hook: DDPO's ``hook(prompt_image_data, global_step, tracker)``, called on the main
            process each epoch (an :class:`~loop_trl.callbacks.ImageSamplesCallback`).
        eval_dataset: fixed evaluation prompts (a list, or a ``datasets.Dataset`` whose other columns are the
            metadata), scored by :meth:`evaluate` every ``eval_freq`` epochs with the ``eval_*`` settings.
        callbacks: ``transformers.TrainerCallback`` instances or classes (see :mod:`loop_trl.callbacks`).

    ``state`` is a ``transformers.TrainerState``; ``log_history`` holds every dict of metrics logged, each with
    its ``step`` (names: docs/algorithm.md, "Metrics"). Several processes leave their group at exit.
    """

    def __init__(self, args: LOOPConfig | None = None,
                 reward_funcs: RewardFunction | Sequence[RewardFunction] | dict[str, RewardFunction] | None = None,
                 train_dataset: Callable[[], tuple[str, Any]] | Sequence[str] | Any = None,
                 model: DiffusionPolicy | str | None = None,
                 image_samples_hook: Callable[[list, int, Any], None] | None = None,
                 eval_dataset: Sequence[str] | Any | None = None, *,
                 callbacks: Sequence[TrainerCallback | type[TrainerCallback]] | None = None, **ddpo_names):
        given = resolve_inputs(dict(args=args, reward_funcs=reward_funcs, train_dataset=train_dataset, model=model,
                                    eval_dataset=eval_dataset), ddpo_names)
        config = self.config = given["args"]
        self.reward_function, self.policy, self.eval_prompts = given["reward_funcs"], given["model"], given["eval_dataset"]
        # which denoising steps are trained, and each step's loss weight (mean 1 over those steps)
        self.train_steps = config.train_timesteps
        self.step_weights = normalized_step_weights(config.train_timestep_weights, config.sample_num_steps, self.train_steps)
        check_sampler_settings(self.policy, config)
        check_reward_input(self.reward_function, self.policy.produces_video)
        refuse_untrainable_steps(self.policy.zero_variance_steps(config.sample_num_steps), self.train_steps, config.sample_num_steps)

        self.accelerator = accelerator = make_accelerator(config)
        set_seed(config.seed, device_specific=True)
        self.prompts = PromptSource(given["train_dataset"], config.seed, accelerator.process_index, accelerator.num_processes)
        self.stat_tracker = PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size,
                                                 config.per_prompt_stat_tracking_min_count)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        self.policy.to(accelerator.device, DTYPES[accelerator.mixed_precision])
        if config.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        if not self.policy.trainable_parameters():
            raise ValueError("The pipeline has no trainable parameters.")
        if config.beta:  # the reference policy of the KL penalty, kept before any weight moves
            self.policy.prepare_reference()
        optimizer = make_optimizer(self.policy.trainable_parameters(), config)
        self._engine_saves_model = engine_saves_model(accelerator)
        # the trainer owns the prepared module (e.g. DDP-wrapped) and hands it to policy.log_prob
        self.model, prepared_optimizer = accelerator.prepare(self.policy.trainable_module, optimizer)
        lr_scheduler = make_lr_scheduler(optimizer, config)
        accelerator.register_for_checkpointing(lr_scheduler)
        self.update = PPOUpdate(config, accelerator, self.policy, prepared_optimizer, lr_scheduler, self.train_steps,
                                self.step_weights, log=self._on_optimizer_step)
        self.rollout = RolloutCollector(self.policy, self.prompts, RewardScorer(self.reward_function, config), config,
                                        accelerator, self.train_steps if config.sample_sde_window else None)
        folder = CheckpointFolder(os.path.join(config.output_dir, "checkpoints"), config.num_checkpoint_limit)
        resume_path, resume_state = folder.find(config.resume_from) if config.resume_from else (None, {})
        init_trackers(accelerator, config, resume_state)
        self.state = TrainerState(max_steps=config.num_epochs * optimizer_steps_per_epoch(config),
                                  num_train_epochs=config.num_epochs, train_batch_size=config.train_batch_size,
                                  is_local_process_zero=accelerator.is_local_main_process,
                                  is_world_process_zero=accelerator.is_main_process)
        self.checkpoints = TrainerCheckpoints(accelerator, folder, self.policy, self.state, self.stat_tracker, self.update,
                                              self._engine_saves_model, run_ids=lambda: tracker_run_ids(accelerator))
        self.control, self.last_metrics, self._ended = TrainerControl(), {}, False
        self.callbacks = CallbackList([*(callbacks or ()), *([ImageSamplesCallback(image_samples_hook)]
                                                             if image_samples_hook is not None else [])])
        # whether the last checkpoint's evaluation is still owed (killed between the two)
        self._eval_pending = self.checkpoints.resume(resume_path, resume_state) if resume_path else False
        if accelerator.num_processes > 1:  # leave the process group at exit unless end_training() did
            atexit.register(_end_training_at_exit, weakref.ref(self))
        self._event("on_init_end")

    def step(self, epoch: int, global_step: int) -> int:
        """One LOOP epoch (sample K per prompt, score, advantages, clipped passes, log); returns the step count."""
        config = self.config
        # accelerate keeps the accumulation count in a process-wide singleton, so a second trainer
        # made in this process (a notebook, a benchmark) would otherwise change this one's
        self.accelerator.gradient_accumulation_steps = accumulation_steps(config)
        timers, started = defaultdict(float), clock(self.accelerator)
        # 1. sample K trajectories for each prompt, with their per-step log-probabilities, and score them
        rollout = self.rollout.collect(epoch, timers)
        # 2. leave-one-out advantages A_i = r_i - mean of the other K-1 rewards (over every process's groups)
        credit = advantages_across_processes(self.accelerator, config, rollout.rewards, rollout.trajectories.group_ids,
                                             rollout.trajectories.prompts, rollout.valid, self.stat_tracker)
        metrics = {**credit.metrics,
                   **reward_component_metrics(self.reward_function, rollout.prompt_image_data, self.accelerator)}
        advantages = credit.advantages.clamp(-config.train_adv_clip_max, config.train_adv_clip_max)
        self._event("on_samples", prompt_image_data=rollout.prompt_image_data, tracker=(self.accelerator.trackers or [None])[0])
        # 3. several passes of PPO's clipped surrogate over (sample, denoising step) minibatches
        for inner_epoch in range(config.train_num_inner_epochs):
            global_step, pass_metrics = self.update.inner_epoch(self.model, rollout.trajectories, advantages,
                                                                credit.sample_weights, epoch, inner_epoch, global_step,
                                                                timers)
            metrics.update({k: v for k, v in pass_metrics.items() if inner_epoch == 0 or "onpolicy" not in k})
        # 4. log
        metrics.update({"train/epoch": epoch, "time/epoch_s": clock(self.accelerator) - started})
        metrics.update({f"time/{name}_s": seconds for name, seconds in timers.items()})
        self._log(metrics, global_step)
        self.last_metrics = metrics
        return global_step

    def train(self, epochs: int | None = None) -> None:
        """Run ``epochs`` (default ``config.num_epochs``) epochs from where the trainer stands, then save."""
        last_epoch = self.first_epoch + epochs if epochs is not None else self.config.num_epochs
        bar = tqdm(range(self.first_epoch, last_epoch), desc="LOOP epochs", initial=self.first_epoch,
                   total=last_epoch, disable=not self.accelerator.is_local_main_process)
        self.control.should_training_stop = False
        self._event("on_train_begin")
        if self.config.eval_freq and self.config.eval_before_training and self.first_epoch == 0:
            self._evaluate_all()
        if self._eval_pending:  # killed after the checkpoint, before its evaluation was logged
            self._evaluate_all()
            self._mark_evaluated()
        for epoch in bar:
            self._event("on_epoch_begin")
            self.global_step = self.step(epoch, self.global_step)
            bar.set_postfix(reward=f"{self.last_metrics['train/reward_mean']:.4g}")
            self.first_epoch = epoch + 1
            evaluate, save, stop = epoch_end_actions(epoch + 1, last_epoch, self.config, self._event("on_epoch_end"),
                                                     can_evaluate=bool(self.eval_prompts))
            # checkpoint first, marked as owing its evaluation, then evaluate and mark it done: a run killed in
            # between evaluates once on resume, and one killed after logs that evaluation only once
            if save:
                self.save_checkpoint(eval_pending=evaluate)
            if evaluate:
                self._evaluate_all()
                if save:
                    self._mark_evaluated()
            if stop:
                break
        self.save_pretrained(self.config.output_dir)  # on every process: sharded weights are gathered
        if self.config.push_to_hub:
            self.push_to_hub(private=self.config.hub_private)
        self.accelerator.wait_for_everyone()
        self._event("on_train_end")
        if self.first_epoch >= self.config.num_epochs or self.control.should_training_stop:
            close_trackers(self.accelerator)  # the run is complete

    def _evaluate_all(self) -> None:  # the training sampler's evaluation, and the deployed one's if asked
        self.evaluate()
        if self.config.eval_deterministic:
            self.evaluate(deterministic=True)

    @torch.no_grad()
    def evaluate(self, log: bool = True, guidance_scale: float | None = None, deterministic: bool = False) -> dict[str, float]:
        """Score the current weights on the evaluation prompts with fixed noise (``eval_seed``) and return
        (on every process) :func:`loop_trl.evaluation.summarize`'s metrics: the mean reward, each per-image
        number of the reward's metadata and per-category means, with standard errors. With ``log`` they are
        logged under ``eval/`` at the current step. ``guidance_scale`` overrides the evaluation guidance.

        The sampler is the training one (``eval_eta``, else ``sample_eta``, with the SDE window);
        ``deterministic=True`` samples as users deploy the model (DDIM eta 0, the flow ODE: the plain
        diffusers pipeline's images from the same noise), logged under ``eval_deterministic/``."""
        if not self.eval_prompts:
            raise ValueError("evaluate() needs evaluation prompts: pass LOOPTrainer(..., eval_dataset=[...]).")
        with self.update.averaged_weights():  # the EMA weights with use_ema
            metrics = evaluate_across_processes(
                self.policy, self.reward_function, self.eval_prompts, self.config, self.accelerator,
                stochastic_steps=self.train_steps if self.config.sample_sde_window else None,
                sharded=self._engine_saves_model, guidance_scale=guidance_scale, deterministic=deterministic)
        if log:
            prefix = "eval_deterministic" if deterministic else "eval"
            logged = {f"{prefix}/{name}": value for name, value in metrics.items()}
            self._log({**logged, f"{prefix}/epochs_completed": self.first_epoch}, self.global_step)
            self._event("on_evaluate", metrics=logged)
        return metrics

    def _log(self, metrics: dict, step: int) -> None:
        self.accelerator.log(metrics, step=step)
        self.log_history.append({**metrics, "step": step})
        self._event("on_log", logs=metrics)

    def _on_optimizer_step(self, metrics: dict, step: int) -> None:
        self.global_step = step
        self._log(metrics, step)
        self._event("on_step_end")

    def _event(self, name: str, **kwargs) -> TrainerControl:
        self.control = self.callbacks(name, self.config, self.state, self.control, model=self.model, policy=self.policy,
                                      optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, **kwargs)
        return self.control

    #: kept in ``state`` (steps taken, epochs completed, every logged dict) and in ``update`` (the rest)
    global_step, first_epoch, log_history = forwarded("state.global_step"), forwarded("state.epoch"), forwarded("state.log_history")
    optimizer, lr_scheduler, trainable_parameters = (forwarded(f"update.{name}") for name in (
        "optimizer", "lr_scheduler", "trainable_parameters"))
    nonfinite_steps, consecutive_nonfinite_steps, scaler_skipped_steps = (forwarded(f"update.{name}") for name in (
        "nonfinite_steps", "consecutive_nonfinite_steps", "scaler_skipped_steps"))

    def save_checkpoint(self, eval_pending: bool = False) -> str:
        """Write a resumable checkpoint of the epochs completed so far, atomically (:mod:`loop_trl.state`): accelerate's
        state and the trainer's (step, history, statistics, counters); ``eval_pending`` marks an evaluation owed."""
        path = self.checkpoints.save(eval_pending)
        self._event("on_save")
        return path

    def _mark_evaluated(self) -> None:
        self.checkpoints.mark_evaluated()
        self._eval_pending = False

    def save_pretrained(self, save_directory: str, repo_id: str | None = None) -> None:
        """Write the trained weights (LoRA in diffusers format; the EMA with ``use_ema``) and a model card;
        ``repo_id`` is the repository the card's loading snippet names (default: the folder). Call it on
        every process: under FSDP or ZeRO-3 the shards are gathered from all (the main process writes)."""
        with self.update.averaged_weights():  # the EMA weights with use_ema
            state_dict = self.accelerator.get_state_dict(self.model) if self._engine_saves_model else None  # collective
            if self.accelerator.is_main_process:
                self.policy.save_weights(save_directory, state_dict=state_dict)
        if not self.accelerator.is_main_process:
            return
        example = self.eval_prompts[0][0] if self.eval_prompts else (self.prompts.rows[0][0] if self.prompts.rows else None)
        write_model_card(save_directory, self.policy, self.config, self.reward_function, example_prompt=example,
                         repo_id=repo_id or save_directory, epochs_trained=self.first_epoch)

    def push_to_hub(self, repo_id: str | None = None, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload LOOP-trained weights") -> str | None:
        """Save weights and model card to a temporary folder and upload it to ``repo_id`` (default: ``hub_model_id``).
        Call it on every process (see :meth:`save_pretrained`): the main one uploads and returns the URL."""
        repo_id = repo_id or self.config.hub_model_id
        if not repo_id:
            raise ValueError("push_to_hub() needs a repository: pass repo_id='your-name/model' or set hub_model_id.")
        private = self.config.hub_private if private is None else private
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id)
            if self.accelerator.is_main_process:
                return upload_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message)
        return None

    def end_training(self) -> None:
        """Close the trackers and leave the process group, all processes together (done at exit otherwise).
        The trainer cannot sample or train across processes afterwards; it can still sample, evaluate and
        save in this process. See :func:`loop_trl.engine.leave_process_group` for why it is done as it is."""
        if not self._ended:
            self._ended = True
            leave_process_group(self.accelerator, lambda: setattr(self, "model", self.accelerator.unwrap_model(self.model)))


def _end_training_at_exit(reference: weakref.ref) -> None:
    """At interpreter exit, while threads can still take the GIL: leave the process group (see end_training).
    Not after an uncaught exception (``sys.last_value``): the other processes may never reach the barrier."""
    trainer = reference()
    if trainer is not None and not trainer._ended and getattr(sys, "last_value", None) is None:
        trainer.end_training()
