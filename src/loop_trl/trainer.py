"""``LOOPTrainer``: sample -> reward -> advantages -> clipped PPO passes -> log -> save."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, GradientAccumulationPlugin, ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .advantages import PerPromptStatTracker, compute_advantages, group_reward_std
from .config import LOOPConfig
from .evaluation import EvalSamples, eval_batches, sample_and_score, summarize
from .hub import make_model_card, upload_to_hub
from .objective import clipped_surrogate
from .pipelines.base import DiffusionPolicy, Trajectories
from .prompts import PromptSource, prompt_rows
from .rewards.base import MultiReward, as_reward_tensor, component_metrics, is_thread_safe
from .timesteps import normalized_step_weights, select_timesteps

__all__ = ["LOOPTrainer"]

logger = get_logger(__name__)

RewardFunction = Callable[[torch.Tensor, Sequence[str], Sequence[Any]], tuple[Any, Any]]
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, epoch, process, ...)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def _write_json_atomically(path: str, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file beside ``path`` and rename it into place."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f)
    os.replace(temporary, path)


class LOOPTrainer:
    """Fine-tunes a diffusion policy with LOOP (or PPO/DDPO, REINFORCE, GRPO-style variants).

    Args:
        config: a :class:`LOOPConfig`.
        reward_function: ``reward_function(images, prompts, prompt_metadata) -> (rewards, reward_metadata)``
            with ``images`` a (B, 3, H, W) tensor in [0, 1] and one reward per image; or a list or
            ``{name: reward}`` dict of such rewards, combined as the ``reward_weights``-weighted sum
            (:class:`loop_trl.rewards.MultiReward`), each logged as ``rewards/{name}/mean`` and ``/std``.
        prompt_function: ``prompt_function() -> (prompt, metadata)``, or a list of prompts, or a
            ``datasets.Dataset`` with a ``prompt`` column.
        sd_pipeline: the policy, e.g. a :class:`LOOPStableDiffusionPipeline`.
        image_samples_hook: optional ``hook(prompt_image_data, global_step, tracker)`` called on the
            main process each epoch; ``prompt_image_data`` holds one
            ``[images, prompts, prompt_metadata, rewards, reward_metadata]`` per sampling batch.
        eval_prompts: optional fixed evaluation prompts (a list, or a ``datasets.Dataset`` with a
            ``prompt`` column whose other columns are passed as metadata), scored by
            :meth:`evaluate` with the ``eval_*`` settings of the config, every ``eval_freq`` epochs.

    ``log_history`` holds every dictionary of metrics this trainer logged (epochs, optimizer steps
    and evaluations), each with its ``step``.
    """

    def __init__(
        self,
        config: LOOPConfig,
        reward_function: RewardFunction | Sequence[RewardFunction] | dict[str, RewardFunction],
        prompt_function: Callable[[], tuple[str, Any]] | Sequence[str] | Any,
        sd_pipeline: DiffusionPolicy,
        image_samples_hook: Callable[[list, int, Any], None] | None = None,
        eval_prompts: Sequence[str] | Any | None = None,
    ):
        if not isinstance(config, LOOPConfig):
            raise TypeError(f"config must be a LOOPConfig, got {type(config).__name__}.")
        if isinstance(reward_function, (list, tuple, dict)):  # several rewards: their weighted sum
            reward_function = MultiReward(reward_function, config.reward_weights)
        elif config.reward_weights is not None:
            raise ValueError("reward_weights is set but reward_function is a single reward; pass a list or dict of "
                             "rewards, or drop reward_weights.")
        if not callable(reward_function):
            raise TypeError("reward_function must be callable: reward_function(images, prompts, prompt_metadata).")
        if not isinstance(sd_pipeline, DiffusionPolicy):
            raise TypeError(f"sd_pipeline must be a DiffusionPolicy such as LOOPStableDiffusionPipeline, "
                            f"got {type(sd_pipeline).__name__}.")
        self.config = config
        self.reward_function = reward_function
        self.policy = sd_pipeline
        self.image_samples_hook = image_samples_hook
        self._reward_pool = (ThreadPoolExecutor(config.max_workers, thread_name_prefix="loop-trl-reward")
                             if config.async_reward_computation else None)
        # worker threads call the reward one at a time unless it says it is thread-safe: a Hugging Face fast
        # tokenizer, for one, raises "Already borrowed" when two threads use it at once
        self._reward_lock = contextlib.nullcontext() if is_thread_safe(reward_function) else threading.Lock()
        self.eval_prompts = prompt_rows(eval_prompts) if eval_prompts is not None else []
        if eval_prompts is not None and not self.eval_prompts:
            raise ValueError("eval_prompts is empty; pass at least one prompt or leave it out.")
        if config.eval_freq > 0 and not self.eval_prompts:
            raise ValueError(f"eval_freq={config.eval_freq} needs eval_prompts: pass LOOPTrainer(..., eval_prompts=[...]) "
                             "or set eval_freq=0.")
        self.log_history: list[dict] = []
        # which denoising steps are trained, and each step's loss weight (mean 1 over those steps)
        self.train_steps = config.train_timesteps
        self.step_weights = normalized_step_weights(config.train_timestep_weights, config.sample_num_steps, self.train_steps)
        untrainable = sorted(set(self.policy.zero_variance_steps(config.sample_num_steps)) & set(self.train_steps))
        if untrainable:
            last = config.sample_num_steps - 1
            raise ValueError(
                f"Denoising step(s) {untrainable} of the {config.sample_num_steps}-step schedule have zero variance "
                f"under this pipeline's scheduler config (its last timestep is 0, e.g. timestep_spacing='leading' with "
                f"steps_offset=0): they are deterministic and have no log-probability to train. Leave them out with "
                f"train_timestep_stop={untrainable[0] - config.sample_num_steps if untrainable[0] < last else -1}, or "
                f"set the scheduler's steps_offset=1 (as the released SD checkpoints do).")

        project_config = ProjectConfiguration(project_dir=config.output_dir,
                                              logging_dir=os.path.join(config.output_dir, "logs"),
                                              **config.project_kwargs)
        accelerator_kwargs = dict(config.accelerator_kwargs)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not torch.cuda.is_available():
            # several processes without GPUs: accelerate forms a CPU (gloo) group only when told to use the CPU
            accelerator_kwargs.setdefault("cpu", True)
        # one optimizer step per train_gradient_accumulation_steps minibatches, all trained timesteps included
        self._accumulation_steps = (config.train_gradient_accumulation_steps * config.num_train_timesteps
                                    // config.train_timesteps_per_forward)
        self.accelerator = Accelerator(
            log_with=config.log_with,
            mixed_precision=config.mixed_precision,  # the launcher's unless the config set one (LOOPConfig)
            project_config=project_config,
            # a plugin, not gradient_accumulation_steps=, which accelerate's launch environment would override:
            # the count is in backward calls, and LOOPConfig already took the launcher's minibatch count
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=self._accumulation_steps),
            **accelerator_kwargs,
        )
        accelerator = self.accelerator
        if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
            raise ValueError("FSDP version 1 wraps the module, so sampling could not call it directly; loop-trl supports "
                             "FSDP2: set fsdp_version: 2 in the accelerate config (examples/accelerate_configs/fsdp2.yaml).")
        if accelerator.num_processes != world_size:
            raise RuntimeError(f"{world_size} processes were launched but accelerate sees {accelerator.num_processes}; "
                               "they would train independently and overwrite each other's checkpoints. "
                               "Check the launcher's settings (accelerate config) and accelerator_kwargs. "
                               "(FSDP and DeepSpeed through accelerate need GPUs; on CPU use the DDP config.)")
        set_seed(config.seed, device_specific=True)
        self.prompts = PromptSource(prompt_function, config.seed, accelerator.process_index, accelerator.num_processes)
        self.stat_tracker = PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size,
                                                 config.per_prompt_stat_tracking_min_count)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        self.policy.to(accelerator.device, _DTYPES[accelerator.mixed_precision])
        if config.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        self.trainable_parameters = self.policy.trainable_parameters()
        if not self.trainable_parameters:
            raise ValueError("The pipeline has no trainable parameters.")
        optimizer = self._make_optimizer()
        # FSDP and DeepSpeed keep the module's weights (and optimizer state) sharded and save them
        # themselves; the trainer then gathers the trained weights only to write the final adapter
        self._engine_saves_model = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # there is no dataloader to read it from
                ds_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
            if ds_config.get("gradient_clipping", "auto") == "auto":  # DeepSpeed clips inside its own step
                ds_config["gradient_clipping"] = config.train_max_grad_norm
        self.policy.denoiser, self.optimizer = accelerator.prepare(self.policy.trainable_module, optimizer)
        self.trainable_parameters = self.policy.trainable_parameters()  # FSDP2 replaces them with sharded ones
        minibatches = config.sample_batch_size * config.sample_num_batches_per_epoch // config.train_batch_size
        steps_per_epoch = config.train_num_inner_epochs * minibatches // config.train_gradient_accumulation_steps
        # stepped by the trainer once per optimizer step that was taken; saved in checkpoints
        # (transformers' schedules: the same curves as diffusers' for every name offered, plus the cosine
        # that ends above zero)
        name, extra = config.train_lr_scheduler, None
        if config.train_lr_min_ratio > 0:
            name, extra = "cosine_with_min_lr", {"min_lr_rate": config.train_lr_min_ratio}
        self.lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=config.train_lr_warmup_steps,
                                          num_training_steps=config.num_epochs * steps_per_epoch,
                                          scheduler_specific_kwargs=extra)
        accelerator.register_for_checkpointing(self.lr_scheduler)
        self.consecutive_nonfinite_steps = self.nonfinite_steps = self.scaler_skipped_steps = 0
        accelerator.register_save_state_pre_hook(self._save_model_hook)
        accelerator.register_load_state_pre_hook(self._load_model_hook)

        resume_path, resume_state = self._find_checkpoint(config.resume_from) if config.resume_from else (None, {})
        if accelerator.is_main_process and config.log_with:
            scalars = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
            init_kwargs = {name: dict(kwargs) for name, kwargs in config.tracker_kwargs.items()}
            if config.log_with in ("wandb", "all"):
                wandb_kwargs = init_kwargs.setdefault("wandb", {})
                wandb_kwargs.setdefault("name", config.run_name or config.exp_name)
                run_id = resume_state.get("tracker_run_ids", {}).get("wandb")
                if run_id:  # a resumed run goes on in the same W&B run
                    wandb_kwargs.setdefault("id", run_id)
                    wandb_kwargs.setdefault("resume", "allow")
            accelerator.init_trackers(config.tracker_project_name, config=scalars, init_kwargs=init_kwargs)

        self.first_epoch, self.global_step = 0, 0
        self.last_metrics: dict[str, float] = {}
        self._eval_pending = False  # the last checkpoint's evaluation was not logged yet
        if resume_path:
            self._resume(resume_path, resume_state)

    # ------------------------------------------------------------------ the algorithm
    def train(self, epochs: int | None = None) -> None:
        """Run ``epochs`` (default ``config.num_epochs``) epochs from where the trainer stands, then save."""
        last_epoch = self.first_epoch + epochs if epochs is not None else self.config.num_epochs
        bar = tqdm(range(self.first_epoch, last_epoch), desc="LOOP epochs", initial=self.first_epoch,
                   total=last_epoch, disable=not self.accelerator.is_local_main_process)
        eval_freq = self.config.eval_freq
        if eval_freq and self.config.eval_before_training and self.first_epoch == 0:
            self._evaluate_all()
        if self._eval_pending:  # killed after the checkpoint, before its evaluation was logged
            self._evaluate_all()
            self._mark_evaluated()
        for epoch in bar:
            self.global_step = self.step(epoch, self.global_step)
            bar.set_postfix(reward=f"{self.last_metrics['reward_mean']:.4g}")
            self.first_epoch = epoch + 1
            evaluate = bool(eval_freq) and ((epoch + 1) % eval_freq == 0 or epoch + 1 == last_epoch)
            save = (epoch + 1) % self.config.save_freq == 0 or epoch + 1 == last_epoch
            # checkpoint first, marked as owing its evaluation, then evaluate and mark it done: a run killed in
            # between evaluates once on resume, and one killed after logs that evaluation only once
            if save:
                self.save_checkpoint(eval_pending=evaluate)
            if evaluate:
                self._evaluate_all()
                if save:
                    self._mark_evaluated()
        self.save_pretrained(self.config.output_dir)  # on every process: sharded weights are gathered
        if self.config.push_to_hub:
            self.push_to_hub(self.config.hub_model_id, private=self.config.hub_private)
        self.accelerator.wait_for_everyone()
        if self.first_epoch >= self.config.num_epochs:  # the run is complete: close the trackers
            # (not accelerator.end_training(): it also destroys the process group, and the trainer
            # must still work afterwards, e.g. for evaluate() on several processes)
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []

    def end_training(self) -> None:
        """Close the trackers and leave the process group, all processes together. Call it once at the end
        of a script run with several processes. The trainer cannot sample or train across processes
        afterwards; it can still sample, evaluate and save in this process.

        Leaving the group is not enough on its own: the DDP wrapper keeps the group object, and with it
        gloo's worker threads, alive until the interpreter shuts down. A worker that drops its last
        finished collective then needs the GIL to free that collective's Python tensors, and a thread
        that asks for the GIL during shutdown aborts the process ("terminate called without an active
        exception"; pytorch/pytorch#190489). So the wrapper is dropped here and the group's threads are
        joined now. The group must go last, from the Python handle held below: that handle lets go of
        the GIL while the threads finish, where the wrapper's C++ reducer would hold it (a deadlock)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        group = torch.distributed.group.WORLD if distributed else None
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.policy.denoiser = self.accelerator.unwrap_model(self.policy.denoiser)
        self.accelerator.free_memory()  # accelerate's own references to the wrapper and the optimizer
        gc.collect()
        del group  # the last reference: the group's threads are joined here, with the GIL released

    def step(self, epoch: int, global_step: int) -> int:
        """One LOOP epoch: sample K trajectories per prompt, score, compute advantages, optimise.

        Returns the global optimizer-step count after the epoch.
        """
        config = self.config
        # accelerate keeps the accumulation count in a process-wide singleton, so a second trainer
        # made in this process (a notebook, a benchmark) would otherwise change this one's
        self.accelerator.gradient_accumulation_steps = self._accumulation_steps
        self._timers = defaultdict(float)
        started = self._clock()
        trajectories, prompt_image_data, valid = self._sample(epoch)
        if not bool(torch.isfinite(trajectories.log_probs).all()):
            bad = (~torch.isfinite(trajectories.log_probs)).nonzero()[0].tolist()
            raise RuntimeError(f"Sampling recorded a non-finite log-probability (sample {bad[0]}, step {bad[1]} of epoch "
                               f"{epoch}); training on it would be off-policy garbage. Check the scheduler config and "
                               "mixed_precision (try 'no' or 'bf16'); the last checkpoint is intact.")
        rewards = torch.cat([torch.as_tensor(batch[3]) for batch in prompt_image_data]).float()
        advantages, sample_weights, epoch_metrics = self._advantages(trajectories, rewards, valid)
        epoch_metrics.update(self._reward_components(prompt_image_data))
        advantages = advantages.clamp(-config.train_adv_clip_max, config.train_adv_clip_max)
        if self.image_samples_hook is not None and self.accelerator.is_main_process:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_hook(prompt_image_data, global_step, tracker)

        for inner_epoch in range(config.train_num_inner_epochs):
            global_step, train_metrics = self._train_inner_epoch(trajectories, advantages, epoch, inner_epoch, global_step,
                                                                 sample_weights)
            epoch_metrics.update({k: v for k, v in train_metrics.items() if inner_epoch == 0 or not k.startswith("onpolicy")})
        epoch_metrics["epoch"] = epoch
        epoch_metrics["time_epoch_s"] = self._clock() - started
        epoch_metrics.update({f"time_{name}_s": seconds for name, seconds in self._timers.items()})
        self._log(epoch_metrics, global_step)
        self.last_metrics = epoch_metrics
        return global_step

    def _log(self, metrics: dict, step: int) -> None:
        self.accelerator.log(metrics, step=step)
        self.log_history.append({**metrics, "step": step})

    def _evaluate_all(self) -> None:
        """The evaluations of an evaluation point: the training sampler's, and the deployed one's if asked."""
        self.evaluate()
        if self.config.eval_deterministic:
            self.evaluate(deterministic=True)

    @torch.no_grad()
    def evaluate(self, log: bool = True, guidance_scale: float | None = None, deterministic: bool = False) -> dict[str, float]:
        """Score the current weights on ``eval_prompts`` with fixed noise (``eval_seed``).

        Returns (on every process) the metrics of :func:`loop_trl.evaluation.summarize`: the mean
        reward and its standard error, the same for each per-image number in the reward's metadata,
        and per-category means when the metadata has a ``category`` list. With ``log`` they are
        logged under ``eval/`` at the current global step. Processes share the batches; the images
        do not depend on how many processes there are. ``guidance_scale`` overrides the config's
        evaluation guidance for this call (to compare guidance settings).

        The sampler is the training one (``eval_eta``, else ``sample_eta``; with ``sample_sde_window``
        noise only on the trained steps). ``deterministic=True`` samples as users deploy the model
        instead: every step deterministic (DDIM eta 0, the flow ODE; the same images as the plain
        diffusers pipeline from the same initial noise), logged under ``eval_deterministic/``.
        """
        if not self.eval_prompts:
            raise ValueError("evaluate() needs eval_prompts: pass LOOPTrainer(..., eval_prompts=[...]).")
        config, accelerator = self.config, self.accelerator
        prompts = [p for p, _ in self.eval_prompts]
        batch_size = config.eval_batch_size or config.sample_batch_size
        num_batches = len(eval_batches(prompts, config.eval_num_images_per_prompt, batch_size))
        mine = list(range(accelerator.process_index, num_batches, accelerator.num_processes))
        settings = dict(images_per_prompt=config.eval_num_images_per_prompt, seed=config.eval_seed,
                        num_steps=config.eval_num_steps or config.sample_num_steps,
                        guidance_scale=guidance_scale or config.eval_guidance_scale or config.sample_guidance_scale,
                        eta=0.0 if deterministic else config.sample_eta if config.eval_eta is None else config.eval_eta,
                        stochastic_steps=self.train_steps if config.sample_sde_window else None,
                        batch_size=batch_size, negative_prompt=config.negative_prompts,
                        progress=accelerator.is_local_main_process, skip_nonfinite=config.reward_error == "skip_group")
        metadata = [m for _, m in self.eval_prompts]
        samples = sample_and_score(self.policy, self.reward_function, prompts, metadata, batch_indices=mine, **settings)
        short = -(-num_batches // accelerator.num_processes) - len(mine)
        if self._engine_saves_model and short:
            # sharded weights are gathered collectively in every forward pass: a process with one
            # batch fewer runs a throw-away batch so that all make the same calls
            sample_and_score(self.policy, self.reward_function, prompts, metadata, batch_indices=[0] * short, **settings)
        if accelerator.num_processes > 1:
            everyone = EvalSamples()
            for part in gather_object([samples]):
                everyone.extend(part)
            samples = everyone
        metrics = summarize(samples)
        if log:
            prefix = "eval_deterministic" if deterministic else "eval"
            self._log({**{f"{prefix}/{name}": value for name, value in metrics.items()},
                       f"{prefix}/epochs_completed": self.first_epoch}, self.global_step)
        return metrics

    # ------------------------------------------------------------------ the pieces of an epoch
    def _sample(self, epoch: int) -> tuple[Trajectories, list, torch.Tensor]:
        """Sample ``sample_num_batches_per_epoch`` batches of whole prompt groups and score them.

        With ``async_reward_computation`` each batch is scored in a worker thread while the next
        one samples; the results, and what a reward fault does, are the same as scoring in turn.
        """
        config, accelerator = self.config, self.accelerator
        k = config.num_samples_per_prompt
        prompts_per_batch = config.sample_batch_size // k
        generator = _generator(config.seed, epoch, accelerator.process_index)
        sampled, scores = [], []  # (trajectories, prompts, metadata) and their scores (or futures) per batch
        for batch in tqdm(range(config.sample_num_batches_per_epoch), desc=f"epoch {epoch}: sampling", leave=False,
                          disable=not accelerator.is_local_main_process):
            prompts, metadata = self.prompts.draw(prompts_per_batch, epoch, batch, config.sample_num_batches_per_epoch)
            prompts = [p for p in prompts for _ in range(k)]  # K adjacent copies of each prompt
            metadata = [m for m in metadata for _ in range(k)]
            started = self._clock()
            traj = self.policy.sample(prompts, num_steps=config.sample_num_steps,
                                      guidance_scale=config.sample_guidance_scale, eta=config.sample_eta,
                                      generator=generator, negative_prompt=config.negative_prompts,
                                      stochastic_steps=self.train_steps if config.sample_sde_window else None)
            # globally unique group ids: one per (epoch, batch, process, prompt)
            slot = (epoch * config.sample_num_batches_per_epoch + batch) * accelerator.num_processes + accelerator.process_index
            traj.group_ids = slot * prompts_per_batch + torch.arange(len(prompts), device=traj.group_ids.device) // k
            if config.offload_trajectories:
                traj = traj.to("cpu")
            done = self._clock()
            self._timers["sampling"] += done - started
            sampled.append((traj, prompts, metadata))
            if self._reward_pool is not None:
                scores.append(self._reward_pool.submit(self._score, traj.images, prompts, metadata, epoch, batch))
            else:
                scores.append(self._score(traj.images, prompts, metadata, epoch, batch))
                self._timers["reward"] += self._clock() - done
        waiting = self._clock()
        scores = [score.result() if isinstance(score, Future) else score for score in scores]
        if self._reward_pool is not None:  # the scoring time that sampling did not hide
            self._timers["reward"] += self._clock() - waiting
        prompt_image_data = [[traj.images, prompts, metadata, rewards, reward_metadata]
                             for (traj, prompts, metadata), (rewards, reward_metadata, _) in zip(sampled, scores)]
        valid = torch.cat([batch_valid for _, _, batch_valid in scores])
        return Trajectories.cat([traj for traj, _, _ in sampled]), prompt_image_data, valid

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list, epoch: int,
               batch: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Call the reward function and vet its output.

        Returns rewards (B,) with every dropped sample set to 0, the reward metadata, and a (B,)
        mask of the samples kept. A fault either raises (``reward_error="raise"``) or drops the
        prompt groups it touches (``"skip_group"``): all of them when the call itself fails.
        """
        k = self.config.num_samples_per_prompt
        skip = self.config.reward_error == "skip_group"
        try:
            with self._reward_lock:
                output = self.reward_function(images, prompts, metadata)
            if not (isinstance(output, tuple) and len(output) == 2):
                raise TypeError(f"reward_function must return (rewards, reward_metadata), got {type(output).__name__}.")
            values = as_reward_tensor(output[0], prompts)
        except Exception as error:
            where = f"epoch {epoch}, sampling batch {batch}, prompts {sorted(set(prompts))}"
            if not skip:
                raise type(error)(f"{error} [{where}]") if type(error) in (TypeError, ValueError) else \
                    RuntimeError(f"reward_function raised {type(error).__name__}: {error} [{where}]") from error
            logger.warning(f"reward_function failed ({type(error).__name__}: {error}) at {where}; "
                           f"dropping the batch's {len(prompts) // k} prompt groups.", main_process_only=False)
            return torch.zeros(len(prompts), dtype=torch.float64), None, torch.zeros(len(prompts), dtype=torch.bool)
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            message = (f"reward_function returned {values[i].item()} for sample {i} of sampling batch {batch} "
                       f"(epoch {epoch}, prompt {prompts[i]!r}); rewards must be finite "
                       f"({int((~finite).sum())} non-finite in this batch).")
            if not skip:
                raise ValueError(message)
            logger.warning(message + " Dropping the affected prompt groups.", main_process_only=False)
        valid = finite.view(-1, k).all(dim=1).repeat_interleave(k)  # a group is kept only if all K are finite
        return torch.where(valid, values, torch.zeros_like(values)), output[1], valid

    def _reward_components(self, prompt_image_data: list) -> dict[str, float]:
        """With several rewards: each component's mean and std over every process's images (NaN skipped)."""
        if not isinstance(self.reward_function, MultiReward):
            return {}
        names = list(self.reward_function.rewards)
        rows = []
        for images, _, _, _, reward_metadata in prompt_image_data:
            if isinstance(reward_metadata, dict) and "rewards" in reward_metadata:
                rows.append(torch.stack([torch.as_tensor(reward_metadata["rewards"][n], dtype=torch.float32) for n in names], 1))
            else:  # the batch's reward call failed (skip_group): nothing scored
                rows.append(torch.full((len(images), len(names)), float("nan")))
        matrix = self.accelerator.gather(torch.cat(rows).to(self.accelerator.device)).cpu()
        return component_metrics({name: matrix[:, i] for i, name in enumerate(names)})

    def _advantages(self, trajectories: Trajectories, rewards: torch.Tensor,
                    valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Gather rewards with their group ids from every process, compute advantages over the kept
        samples (dropped ones get 0), and return this process's share of the advantages and of the
        samples' loss weights, with the epoch's metrics."""
        accelerator, device, config = self.accelerator, self.accelerator.device, self.config
        all_rewards = accelerator.gather(rewards.to(device)).cpu()
        all_groups = accelerator.gather(trajectories.group_ids.to(device)).cpu()
        all_valid = accelerator.gather(valid.to(device)).cpu().bool()
        all_prompts = gather_object(list(trajectories.prompts)) if accelerator.num_processes > 1 else trajectories.prompts
        num_groups = len(torch.unique(all_groups))
        skipped = num_groups - len(torch.unique(all_groups[all_valid]))
        if skipped / num_groups > config.reward_max_skip_fraction or not bool(all_valid.any()):
            raise RuntimeError(f"The reward failed for {skipped} of {num_groups} prompt groups this epoch, more than "
                               f"reward_max_skip_fraction={config.reward_max_skip_fraction}; stopping. "
                               "The last checkpoint is intact; fix the reward and resume with resume_from='latest'.")
        kept_rewards, kept_groups = all_rewards[all_valid], all_groups[all_valid]
        advantages = torch.zeros_like(all_rewards)
        advantages[all_valid] = compute_advantages(
            config.advantage_estimator, kept_rewards, kept_groups,
            prompts=[p for p, keep in zip(all_prompts, all_valid.tolist()) if keep], tracker=self.stat_tracker)
        n = len(trajectories)
        mine = advantages[accelerator.process_index * n:(accelerator.process_index + 1) * n]
        # dropped samples weigh 0 (and are not scored in the PPO passes); the kept ones are weighed up by
        # 1 / (kept fraction), so the step is as if the dropped were never sampled
        keep = all_valid.double() * (len(all_valid) / all_valid.sum().double())
        sample_weights = keep[accelerator.process_index * n:(accelerator.process_index + 1) * n].float()
        metrics = {"reward_mean": kept_rewards.mean().item(), "reward_std": kept_rewards.std(unbiased=False).item(),
                   "reward_group_std": group_reward_std(kept_rewards, kept_groups).item(),
                   "advantage_abs_mean": advantages[all_valid].abs().mean().item(), "skipped_groups": skipped}
        if config.advantage_estimator == "per_prompt_tracker":  # did the per-prompt statistics engage?
            metrics["tracker_engaged_fraction"] = self.stat_tracker.last_tracked_fraction
        return mine.to(device), sample_weights.to(device), metrics

    def _train_inner_epoch(self, trajectories: Trajectories, advantages: torch.Tensor, epoch: int, inner_epoch: int,
                           global_step: int, sample_weights: torch.Tensor) -> tuple[int, dict]:
        """One PPO pass: shuffle samples and (per sample) timesteps, then minimise the clipped surrogate.

        ``sample_weights`` (B,) weigh each sample's loss: 0 for dropped groups (not scored), 1 / (kept
        fraction) for the others (see :meth:`_advantages`).

        Returns the step count and the pass's metrics: ``onpolicy_max_abs_logratio`` (the largest
        |log-ratio| over every trained step of the first minibatch, all before the pass's first
        optimizer step; 0 up to float error on the first pass when sampling and scoring agree)
        and, with ``log_per_step_metrics``, clip fraction and mean |log-ratio| by step index.
        """
        config, accelerator = self.config, self.accelerator
        generator = _generator(config.seed, epoch, accelerator.process_index, 1 + inner_epoch)
        n = len(trajectories)
        perm = torch.randperm(n, generator=generator)
        trajectories, advantages = trajectories[perm], advantages[perm.to(advantages.device)]
        sample_weights = sample_weights[perm.to(sample_weights.device)]
        kept_mask = (sample_weights > 0).cpu()  # once per pass, not a device sync per minibatch
        steps = select_timesteps(n, self.train_steps, config.num_train_timesteps, generator).to(accelerator.device)
        weights = self.step_weights.to(accelerator.device)
        per_forward = config.train_timesteps_per_forward
        guidance = None if config.train_cfg else 1.0

        window: dict[str, list[torch.Tensor]] = defaultdict(list)
        onpolicy = torch.zeros((), device=accelerator.device)
        per_step = torch.zeros(3, trajectories.num_steps, device=accelerator.device)  # count, clipped, |log-ratio|
        self.policy.denoiser.train()
        started = self._clock()
        for start in tqdm(range(0, n, config.train_batch_size), desc=f"epoch {epoch}: training", leave=False,
                          disable=not accelerator.is_local_main_process):
            members = torch.arange(start, start + config.train_batch_size)
            kept = members[kept_mask[start:start + config.train_batch_size]]
            if len(kept) == len(members):  # the usual case: the whole minibatch
                batch, index = trajectories[slice(start, start + config.train_batch_size)], members
            else:  # samples of dropped groups are not scored; one stays, weighing 0, if none is kept, so that
                index = kept if len(kept) else members[:1]  # every process makes the same calls
                batch = trajectories[index]
            batch = batch.to(accelerator.device)
            index = index.to(accelerator.device)
            # the loss is the sum over the kept samples divided by the minibatch size, as if every sample were scored
            batch_adv = advantages[index].repeat(per_forward)
            batch_weights = (sample_weights[index] * (len(index) / len(members))).repeat(per_forward)
            # one forward pass scores per_forward steps of each trajectory: its rows are the minibatch repeated
            rows = torch.arange(len(index), device=steps.device).repeat(per_forward)
            positions = torch.arange(len(rows), device=steps.device)
            if per_forward > 1:
                batch = batch[rows]
            for j in range(0, config.num_train_timesteps, per_forward):
                step = steps[index, j:j + per_forward].T.reshape(-1)
                with accelerator.accumulate(self.policy.denoiser):
                    log_prob = self.policy.log_prob(batch, step, guidance_scale=guidance)
                    old_log_prob = batch.log_probs[positions, step]
                    out = clipped_surrogate(log_prob, old_log_prob, batch_adv, config.train_clip_range,
                                            weights[step] * batch_weights)
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        grad_norm = self._optimizer_step(losses=[*window["loss"], out.loss.detach()])
                log_ratio = (log_prob - old_log_prob).detach()
                if start == 0:
                    onpolicy = torch.maximum(onpolicy, log_ratio.abs().max())
                if config.log_per_step_metrics:
                    per_step[0].index_add_(0, step, torch.ones_like(log_ratio))
                    per_step[1].index_add_(0, step, ((log_ratio.exp() - 1).abs() > config.train_clip_range).float())
                    per_step[2].index_add_(0, step, log_ratio.abs())
                for name in ("loss", "approx_kl", "clipfrac", "ratio"):
                    window[name].append(out.__dict__[name].detach())
                if accelerator.sync_gradients:
                    global_step += 1
                    metrics = {name: accelerator.reduce(torch.stack(v).mean(), "mean").item() for name, v in window.items()}
                    metrics.update(epoch=epoch, inner_epoch=inner_epoch, learning_rate=self.optimizer.param_groups[0]["lr"],
                                   grad_norm=grad_norm, nonfinite_steps=self.nonfinite_steps,
                                   scaler_skipped_steps=self.scaler_skipped_steps)
                    self._log(metrics, global_step)
                    window.clear()
        self._timers["training"] += self._clock() - started
        metrics = {"onpolicy_max_abs_logratio": accelerator.reduce(onpolicy, "max").item()}
        if config.log_per_step_metrics:
            per_step = accelerator.reduce(per_step, "sum").cpu()
            for index in self.train_steps:
                if per_step[0, index] > 0:
                    metrics[f"steps/{index}/clipfrac"] = (per_step[1, index] / per_step[0, index]).item()
                    metrics[f"steps/{index}/abs_logratio"] = (per_step[2, index] / per_step[0, index]).item()
        return global_step, metrics

    def _clock(self) -> float:
        """Wall time in seconds, after the accelerator has finished its queued work."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ optimizer, checkpoints, saving
    def _optimizer_step(self, losses: Sequence[torch.Tensor] = ()) -> float:
        """Clip and step, unless the gradient norm is not finite: then skip, count, and stop after too many.

        Under fp16 the gradient scaler skips the steps whose scaled gradients overflow and halves its scale
        (it starts at 2^16, so a healthy run skips a few steps at first). Such a skip, with every loss of
        the step finite and the scale still above 1, is the scaler finding its range: counted apart
        (``scaler_skipped_steps``), not as a non-finite step. ``losses`` are the step's losses on this
        process (looked at only after such a skip).

        Returns the gradient norm before clipping, for the log (NaN where DeepSpeed clips inside its own step)."""
        accelerator, config = self.accelerator, self.config
        grad_norm = accelerator.clip_grad_norm_(self.trainable_parameters, config.train_max_grad_norm)
        norm = float("nan") if grad_norm is None else float(grad_norm)
        if accelerator.scaler is not None:  # fp16: the gradient scaler skips inf/NaN steps and lowers its scale
            scale = float(accelerator.scaler.get_scale())
            self.optimizer.step()
            skipped = self.optimizer.step_was_skipped
            if skipped and scale > 1.0 and self._all_finite(losses):
                self.optimizer.zero_grad()
                self.scaler_skipped_steps += 1
                logger.info(f"The fp16 gradient scaler skipped a step at scale {scale:g} (it halves its scale and "
                            "goes on); not counted as a non-finite step.")
                return norm
        elif grad_norm is None:  # DeepSpeed clips, skips overflowing steps and steps inside backward()
            skipped = False
        else:
            skipped = not bool(torch.isfinite(torch.as_tensor(grad_norm)))  # equal on all ranks after all-reduce
            if not skipped:
                self.optimizer.step()
        self.optimizer.zero_grad()
        if not skipped:
            self.lr_scheduler.step()
            self.consecutive_nonfinite_steps = 0
            return norm
        self.consecutive_nonfinite_steps += 1
        self.nonfinite_steps += 1
        logger.warning(f"Non-finite gradient norm ({grad_norm}); optimizer step skipped "
                       f"({self.consecutive_nonfinite_steps} in a row).")
        if self.consecutive_nonfinite_steps >= config.max_consecutive_nonfinite_steps:
            raise RuntimeError(f"{self.consecutive_nonfinite_steps} optimizer steps in a row had a non-finite loss or "
                               f"gradient (max_consecutive_nonfinite_steps={config.max_consecutive_nonfinite_steps}). "
                               "Lower train_learning_rate, check the reward's scale, or use mixed_precision='bf16'; "
                               "the last checkpoint is intact.")
        return norm

    def _all_finite(self, losses: Sequence[torch.Tensor]) -> bool:
        """Whether every loss is finite on every process (the same answer everywhere)."""
        finite = torch.stack([torch.isfinite(loss).all() for loss in losses]).all() if losses else torch.tensor(True)
        return self.accelerator.reduce(finite.float().to(self.accelerator.device), "min").item() > 0

    def _make_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        optimizer_cls = torch.optim.AdamW
        if config.train_use_8bit_adam:
            try:
                import bitsandbytes
            except ImportError as error:
                raise ImportError("train_use_8bit_adam=True needs bitsandbytes: pip install bitsandbytes") from error
            optimizer_cls = bitsandbytes.optim.AdamW8bit
        return optimizer_cls(self.trainable_parameters, lr=config.train_learning_rate,
                             betas=(config.train_adam_beta1, config.train_adam_beta2),
                             weight_decay=config.train_adam_weight_decay, eps=config.train_adam_epsilon)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.config.output_dir, "checkpoints")

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        # Write only the trainable weights (a LoRA adapter, not the whole UNet), unless FSDP or
        # DeepSpeed has written the module's sharded state itself.
        if self._engine_saves_model:
            return
        if self.accelerator.is_main_process:
            self.policy.save_adapter(output_dir)
        while weights:
            weights.pop()

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        if self._engine_saves_model:  # FSDP / DeepSpeed loaded their own sharded state
            return
        self.policy.load_adapter(input_dir)
        while models:
            models.pop()

    def _trainer_state(self, eval_pending: bool) -> dict:
        """What a checkpoint holds beside accelerate's state: counters, history, the tracker run."""
        run_ids = {tracker.name: tracker.run.id for tracker in self.accelerator.trackers
                   if tracker.name == "wandb" and getattr(tracker, "run", None) is not None}
        return {"epoch": self.first_epoch, "global_step": self.global_step, "stat_tracker": self.stat_tracker.state_dict(),
                "log_history": self.log_history, "nonfinite_steps": self.nonfinite_steps,
                "consecutive_nonfinite_steps": self.consecutive_nonfinite_steps,
                "scaler_skipped_steps": self.scaler_skipped_steps, "tracker_run_ids": run_ids,
                "eval_pending": eval_pending}

    def _mark_evaluated(self) -> None:
        """Record in the newest checkpoint that its evaluation is logged (an atomic rewrite of its state file)."""
        if self.accelerator.is_main_process:
            path = os.path.join(self.checkpoint_dir, f"checkpoint_{self.first_epoch}", "trainer_state.json")
            _write_json_atomically(path, self._trainer_state(eval_pending=False))
        self._eval_pending = False
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self, eval_pending: bool = False) -> str:
        """Write a resumable checkpoint of the epochs completed so far.

        It is written to a temporary folder and renamed into place, so a crash never leaves a
        half-written ``checkpoint_N``. The oldest checkpoints beyond ``num_checkpoint_limit`` are removed.
        Beside accelerate's state (weights, optimizer, schedule, RNG) it holds the trainer's: epoch and
        step, the per-prompt statistics, ``log_history``, the non-finite step counters and the W&B run
        id; ``eval_pending`` marks an evaluation due at this epoch and not yet logged.
        """
        accelerator = self.accelerator
        final = os.path.join(self.checkpoint_dir, f"checkpoint_{self.first_epoch}")
        partial = final + ".partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(partial)
        # every process writes its own files (its RNG states) into the folder: all must be done before
        # the main process renames it (seen: a busy rank 1 found checkpoint_1.partial already gone)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(partial, "trainer_state.json"), "w") as f:
                json.dump(self._trainer_state(eval_pending), f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self._checkpoints()[:-self.config.num_checkpoint_limit]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def _checkpoints(self) -> list[str]:
        """Completed checkpoints, oldest first (``.partial`` folders are never listed)."""
        if not os.path.isdir(self.checkpoint_dir):
            return []
        found = [(int(m.group(1)), name) for name in os.listdir(self.checkpoint_dir) if (m := _CHECKPOINT.match(name))]
        return [os.path.join(self.checkpoint_dir, name) for _, name in sorted(found)]

    def _find_checkpoint(self, resume_from: str) -> tuple[str | None, dict]:
        """The checkpoint folder ``resume_from`` names ('latest': the newest) and its trainer state."""
        if resume_from == "latest":
            checkpoints = self._checkpoints()
            if not checkpoints:
                logger.warning(f"resume_from='latest': no checkpoint under {self.checkpoint_dir}; starting from epoch 0.",
                               main_process_only=True)
                return None, {}
            resume_from = checkpoints[-1]
        if not os.path.isfile(os.path.join(resume_from, "trainer_state.json")):
            raise ValueError(f"{resume_from!r} is not a LOOP checkpoint (no trainer_state.json).")
        with open(os.path.join(resume_from, "trainer_state.json")) as f:
            return resume_from, json.load(f)

    def _resume(self, resume_from: str, state: dict) -> None:
        self.accelerator.load_state(resume_from)
        self.first_epoch, self.global_step = state["epoch"], state["global_step"]
        self.stat_tracker.load_state_dict(state["stat_tracker"])
        # older checkpoints hold no history or counters
        self.log_history = list(state.get("log_history", []))
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.consecutive_nonfinite_steps = state.get("consecutive_nonfinite_steps", 0)
        self.scaler_skipped_steps = state.get("scaler_skipped_steps", 0)
        self._eval_pending = bool(state.get("eval_pending", False))
        logger.info(f"Resumed from {resume_from} at epoch {self.first_epoch}, step {self.global_step}.")

    def save_pretrained(self, save_directory: str, repo_id: str | None = None) -> None:
        """Write the trained weights (LoRA in diffusers format) and a model card to ``save_directory``.

        ``repo_id`` is the Hub repository the card's loading snippet points at (default: the folder).
        Call it on every process: under FSDP or DeepSpeed ZeRO-3 the sharded weights are gathered
        from all of them (only the main process writes).
        """
        state_dict = None
        if self._engine_saves_model:
            state_dict = self.accelerator.get_state_dict(self.policy.denoiser)  # collective: whole weights
        if not self.accelerator.is_main_process:
            return
        self.policy.save_adapter(save_directory, state_dict=state_dict)
        example = self.eval_prompts[0][0] if self.eval_prompts else (self.prompts.rows[0][0] if self.prompts.rows else None)
        card = make_model_card(
            base_model=self.policy.base_model_name,
            base_model_loader=self.policy.base_model_loader,
            example_prompt=example or "a photo of a cat",
            reward_name=getattr(self.reward_function, "__name__", type(self.reward_function).__name__),
            config=self.config.to_dict(),
            repo_id=repo_id or save_directory,
            use_lora=self.policy.use_lora,
            epochs_trained=self.first_epoch,
            **self.policy.model_card_info(),
        )
        card.save(os.path.join(save_directory, "README.md"))

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    commit_message: str = "Upload LOOP-trained weights") -> str | None:
        """Save the weights and model card to a temporary folder and upload it to ``repo_id``.

        Call it on every process (see :meth:`save_pretrained`); the main process uploads and returns
        the URL, the others return None."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id)
            if self.accelerator.is_main_process:
                return upload_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message)
        return None
