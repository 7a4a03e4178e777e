"""The policy update: the optimizer and its schedule, the clipped PPO pass over (sample, timestep)
minibatches, and the optimizer step with its handling of non-finite gradients."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import defaultdict
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import get_scheduler

from .config import LOOPConfig
from .engine import clock, seeded_generator
from .objective import clipped_surrogate, gaussian_kl
from .pipelines.base import DiffusionPolicy, Trajectories
from .timesteps import select_timesteps

__all__ = ["PPOUpdate", "make_lr_scheduler", "make_optimizer", "optimizer_steps_per_epoch"]

logger = get_logger(__name__)


def make_optimizer(parameters: list[torch.nn.Parameter], config: LOOPConfig) -> torch.optim.Optimizer:
    """AdamW (bitsandbytes' 8-bit AdamW with ``train_use_8bit_adam``) over ``parameters``."""
    optimizer_cls = torch.optim.AdamW
    if config.train_use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise ImportError("train_use_8bit_adam=True needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_cls = bitsandbytes.optim.AdamW8bit
    return optimizer_cls(parameters, lr=config.train_learning_rate,
                         betas=(config.train_adam_beta1, config.train_adam_beta2),
                         weight_decay=config.train_adam_weight_decay, eps=config.train_adam_epsilon)


def optimizer_steps_per_epoch(config: LOOPConfig) -> int:
    """Optimizer steps in one epoch: every inner epoch's minibatches, ``train_gradient_accumulation_steps`` a step."""
    minibatches = config.sample_batch_size * config.sample_num_batches_per_epoch // config.train_batch_size
    return config.train_num_inner_epochs * minibatches // config.train_gradient_accumulation_steps


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: LOOPConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule ``train_lr_scheduler`` over every optimizer step of the run (the cosine ending
    at ``train_lr_min_ratio`` when that is set), stepped once per optimizer step that was taken."""
    name, extra = config.train_lr_scheduler, None
    if config.train_lr_min_ratio > 0:
        name, extra = "cosine_with_min_lr", {"min_lr_rate": config.train_lr_min_ratio}
    return get_scheduler(name, optimizer, num_warmup_steps=config.train_lr_warmup_steps,
                         num_training_steps=config.num_epochs * optimizer_steps_per_epoch(config), scheduler_specific_kwargs=extra)


class PPOUpdate:
    """PPO passes over an epoch's samples, and the optimizer steps they take.

    ``step_weights`` (T,) weigh each denoising step's loss (mean 1 over ``train_steps``); ``log`` is
    called with each optimizer step's metrics. The counters (``nonfinite_steps``,
    ``consecutive_nonfinite_steps``, ``scaler_skipped_steps``, ``steps_taken``) are saved in checkpoints,
    the EMA (``use_ema``) through accelerate's checkpointing.
    """

    def __init__(self, config: LOOPConfig, accelerator: Accelerator, policy: DiffusionPolicy,
                 optimizer: torch.optim.Optimizer, lr_scheduler, train_steps: Sequence[int],
                 step_weights: torch.Tensor, log: Callable[[dict, int], None]):
        self.config, self.accelerator, self.policy = config, accelerator, policy
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.train_steps, self.step_weights, self.log = list(train_steps), step_weights, log
        self.trainable_parameters = policy.trainable_parameters()
        self.nonfinite_steps = self.consecutive_nonfinite_steps = self.scaler_skipped_steps = 0
        self.steps_taken = 0  # optimizer steps taken (not skipped): the EMA's update interval counts them
        self.beta = config.beta
        if self.beta and (type(policy).step_distribution is DiffusionPolicy.step_distribution
                          or type(policy).reference is DiffusionPolicy.reference):
            raise ValueError(f"beta={self.beta} needs the policy's step_distribution() and reference(), which "
                             f"{type(policy).__name__} does not implement; set beta=0.")
        # diffusers' EMAModel over the (possibly sharded) trainable parameters; checkpointed after the schedule
        self.ema = EMAModel(self.trainable_parameters, decay=config.ema_decay) if config.use_ema else None
        if self.ema is not None:
            accelerator.register_for_checkpointing(self.ema)
        parameters = inspect.signature(policy.log_prob).parameters
        self._hands_denoiser = "denoiser" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        if not self._hands_denoiser:
            warnings.warn(f"{type(policy).__name__}.log_prob takes no `denoiser` argument: the trainer sets "
                          "policy.denoiser to its prepared module instead (the former contract). Add "
                          "`denoiser=None` to log_prob and score through it.", FutureWarning, stacklevel=3)

    @property
    def counters(self) -> dict[str, int]:
        """The step counters, as checkpoints save them."""
        return {"nonfinite_steps": self.nonfinite_steps, "consecutive_nonfinite_steps": self.consecutive_nonfinite_steps,
                "scaler_skipped_steps": self.scaler_skipped_steps, "steps_taken": self.steps_taken}

    def load_counters(self, saved: dict) -> None:
        """Restore :attr:`counters` from a checkpoint's state (older checkpoints hold none: 0)."""
        for name in self.counters:
            setattr(self, name, saved.get(name, 0))

    def _log_prob_and_kl(self, model: torch.nn.Module, batch: Trajectories, step: torch.Tensor,
                         guidance: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-probability through ``model`` and the KL (B,) of its step to the reference policy's."""
        policy = self.policy.step_distribution(batch, step, guidance, denoiser=model)
        with torch.no_grad(), self.policy.reference() as reference:
            reference_mean = self.policy.step_distribution(batch, step, guidance, denoiser=reference).mean
        return policy.log_prob, gaussian_kl(policy.mean, reference_mean, policy.std)

    @contextlib.contextmanager
    def averaged_weights(self):
        """With ``use_ema``: the EMA weights in the trainable parameters for the duration, the trained ones after."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable_parameters)
        self.ema.copy_to(self.trainable_parameters)
        try:
            yield
        finally:
            self.ema.restore(self.trainable_parameters)

    def _log_prob(self, model: torch.nn.Module, batch: Trajectories, step: torch.Tensor, guidance: float | None):
        if self._hands_denoiser:
            return self.policy.log_prob(batch, step, guidance_scale=guidance, denoiser=model)
        self.policy.denoiser = model
        return self.policy.log_prob(batch, step, guidance_scale=guidance)

    def inner_epoch(self, model: torch.nn.Module, trajectories: Trajectories, advantages: torch.Tensor,
                    sample_weights: torch.Tensor, epoch: int, inner_epoch: int, global_step: int,
                    timers: defaultdict[str, float]) -> tuple[int, dict]:
        """One PPO pass: shuffle samples and (per sample) timesteps, then minimise the clipped surrogate.

        ``model`` is the accelerate-prepared trainable module, handed to ``policy.log_prob``.
        ``sample_weights`` (B,) weigh each sample's loss: 0 for dropped groups (not scored), 1 / (kept
        fraction) for the others (see :func:`loop_trl.scoring.advantages_across_processes`).

        Returns the step count and the pass's metrics: ``train/onpolicy_max_abs_logratio`` (the largest
        |log-ratio| over every trained step of the first minibatch, all before the pass's first
        optimizer step; 0 up to float error on the first pass when sampling and scoring agree)
        and, with ``log_per_step_metrics``, clip fraction and mean |log-ratio| by step index.
        """
        config, accelerator = self.config, self.accelerator
        generator = seeded_generator(config.seed, epoch, accelerator.process_index, 1 + inner_epoch)
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
        model.train()
        started = clock(accelerator)
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
                with accelerator.accumulate(model):
                    if self.beta:  # the step's Gaussian too, and the reference's mean
                        log_prob, kl = self._log_prob_and_kl(model, batch, step, guidance)
                    else:
                        log_prob = self._log_prob(model, batch, step, guidance)
                    old_log_prob = batch.log_probs[positions, step]
                    out = clipped_surrogate(log_prob, old_log_prob, batch_adv, config.train_clip_range,
                                            weights[step] * batch_weights)
                    if self.beta:  # weighed as the surrogate: per step, and 0 for dropped samples
                        kl_term = (weights[step] * batch_weights * kl).mean()
                        out.loss = out.loss + self.beta * kl_term
                        window["kl"].append(kl_term.detach())
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        grad_norm = self.optimizer_step(losses=[*window["loss"], out.loss.detach()])
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
                    metrics = {f"train/{name}": accelerator.reduce(torch.stack(v).mean(), "mean").item()
                               for name, v in window.items()}
                    metrics.update({"train/epoch": epoch, "train/inner_epoch": inner_epoch,
                                    "train/learning_rate": self.optimizer.param_groups[0]["lr"],
                                    "train/grad_norm": grad_norm, "train/nonfinite_steps": self.nonfinite_steps,
                                    "train/scaler_skipped_steps": self.scaler_skipped_steps})
                    self.log(metrics, global_step)
                    window.clear()
        timers["training"] += clock(accelerator) - started
        metrics = {"train/onpolicy_max_abs_logratio": accelerator.reduce(onpolicy, "max").item()}
        if config.log_per_step_metrics:
            per_step = accelerator.reduce(per_step, "sum").cpu()
            for index in self.train_steps:
                if per_step[0, index] > 0:
                    metrics[f"train/steps/{index}/clipfrac"] = (per_step[1, index] / per_step[0, index]).item()
                    metrics[f"train/steps/{index}/abs_logratio"] = (per_step[2, index] / per_step[0, index]).item()
        return global_step, metrics

    def optimizer_step(self, losses: Sequence[torch.Tensor] = ()) -> float:
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
            self.steps_taken += 1
            if self.ema is not None and self.steps_taken % self.config.ema_update_interval == 0:
                self.ema.step(self.trainable_parameters)
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
