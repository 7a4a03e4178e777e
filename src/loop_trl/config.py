"""``LOOPConfig``: every option of a LOOP run, with its help text and its validation.

About 70 fields, one line each with the help text ``--help`` and docs/configuration.md show, make the
file run past 300 lines; the single-field rules are a table (``_RULES``, ``_CHOICES``) and the rules
that tie fields together one method.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from accelerate.utils import LoggerType
from transformers import SchedulerType

from .advantages import ADVANTAGE_ESTIMATORS
from .timesteps import eligible_steps, normalized_step_weights

__all__ = ["LOOPConfig"]

# transformers' schedules, less those that need an argument the config has no field for (a metric to watch,
# decay steps); "cosine_with_min_lr" is reached through train_lr_scheduler="cosine" with train_lr_min_ratio
_LR_SCHEDULERS = tuple(s.value for s in SchedulerType if s.value not in (
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy"))
# (field, the environment variable accelerate's launcher sets for it, the value when neither sets one)
_LAUNCH_SETTINGS = (("mixed_precision", "ACCELERATE_MIXED_PRECISION", "no"),
                    ("train_gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", 1))
_TRACKERS = tuple(tracker.value for tracker in LoggerType)  # accelerate's
_JSON_FIELDS = ("train_timestep_weights", "reward_weights", "tracker_kwargs", "accelerator_kwargs", "project_kwargs")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _trackers(value) -> bool:
    names = [value] if isinstance(value, str) else value
    return value is None or isinstance(names, (list, tuple)) and bool(names) and all(n in _TRACKERS for n in names)


#: (fields, rule, what the rule says): each field is checked on its own, in this order
_RULES = (
    (("num_epochs", "save_freq", "max_consecutive_nonfinite_steps", "num_checkpoint_limit", "sample_num_steps",
      "sample_batch_size", "sample_num_batches_per_epoch", "num_samples_per_prompt", "train_batch_size",
      "train_gradient_accumulation_steps", "train_num_inner_epochs", "per_prompt_stat_tracking_buffer_size",
      "per_prompt_stat_tracking_min_count", "eval_num_images_per_prompt", "max_workers", "ema_update_interval"),
     lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    (("train_learning_rate", "train_max_grad_norm", "train_adv_clip_max", "sample_eta", "train_adam_epsilon"),
     lambda v: _is_number(v) and v > 0, "must be > 0"),
    (("train_clip_range",), lambda v: _is_number(v) and v > 0, "must be > 0 ('inf' disables clipping)"),
    (("sample_guidance_scale",), lambda v: _is_number(v) and v >= 1.0, "must be >= 1.0 (1.0 disables guidance)"),
    (("train_timestep_fraction",), lambda v: _is_number(v) and 0.0 < v <= 1.0, "must lie in (0, 1]"),
    (("train_timestep_start",), _is_int, "must be an integer"),
    (("train_timestep_stop",), lambda v: v is None or _is_int(v), "must be an integer or None"),
    (("eval_freq", "train_lr_warmup_steps"), lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
    (("eval_num_steps", "eval_batch_size"), lambda v: v is None or _is_int(v) and v >= 1, "must be None or an integer >= 1"),
    (("eval_guidance_scale",), lambda v: v is None or _is_number(v) and v >= 1.0, "must be None or >= 1.0"),
    (("eval_eta",), lambda v: v is None or _is_number(v) and v >= 0, "must be None or >= 0 (0 samples deterministically)"),
    (("train_adam_beta1", "train_adam_beta2"), lambda v: _is_number(v) and 0.0 <= v < 1.0, "must lie in [0, 1)"),
    (("train_lr_min_ratio",), lambda v: _is_number(v) and 0 <= v < 1, "must be in [0, 1)"),
    (("beta",), lambda v: _is_number(v) and 0 <= v < math.inf, "must be a number >= 0 (0 turns the KL penalty off)"),
    (("ema_decay",), lambda v: _is_number(v) and 0 <= v < 1, "must lie in [0, 1)"),
    (("reward_max_skip_fraction",), lambda v: _is_number(v) and 0.0 <= v < 1.0, "must lie in [0, 1)"),
    (("reward_weights",), lambda v: v is None or all(_is_number(w) and math.isfinite(w) for w in v),
     "must be a list of finite numbers"),
    (("log_with",), _trackers, f"must be None, or one of (or a list of) {_TRACKERS}"),
)
#: fields whose value is one of a list, checked after the per_prompt_stat_tracking flag is mapped
_CHOICES = {"mixed_precision": ("no", "fp16", "bf16"), "advantage_estimator": ADVANTAGE_ESTIMATORS,
            "train_lr_scheduler": _LR_SCHEDULERS, "reward_error": ("raise", "skip_group")}


@dataclass
class LOOPConfig:
    r"""Configuration of [`LOOPTrainer`], field-compatible with TRL's former ``DDPOConfig``.

    Parameters are grouped as follows (run ``python examples/train_aesthetic.py --help`` for the
    full text of each):

    > General: ``exp_name``, ``run_name``, ``seed``, ``num_epochs``, ``output_dir``,
      ``mixed_precision``, ``allow_tf32``, ``log_with`` (or ``report_to``), ``tracker_project_name``,
      ``tracker_kwargs``, ``accelerator_kwargs``, ``project_kwargs``.

    > Checkpoints and the Hub: ``save_freq``, ``num_checkpoint_limit``, ``resume_from``,
      ``push_to_hub``, ``hub_model_id``, ``hub_private``.

    > Sampling: ``sample_num_steps``, ``sample_eta``, ``sample_sde_window``, ``sample_guidance_scale``,
      ``sample_batch_size``, ``sample_num_batches_per_epoch``, ``negative_prompts``,
      ``num_samples_per_prompt`` (K).

    > Advantages: ``advantage_estimator``, ``per_prompt_stat_tracking``,
      ``per_prompt_stat_tracking_buffer_size``, ``per_prompt_stat_tracking_min_count``,
      ``train_adv_clip_max``.

    > Training: ``train_batch_size``, ``train_learning_rate``, ``train_adam_*``,
      ``train_use_8bit_adam``, ``train_gradient_accumulation_steps``, ``train_max_grad_norm``,
      ``train_num_inner_epochs``, ``train_cfg``, ``train_clip_range``,
      ``train_timestep_start``, ``train_timestep_stop``, ``train_timestep_fraction``,
      ``train_timestep_weights``, ``train_lr_scheduler``, ``train_lr_warmup_steps``,
      ``train_lr_min_ratio``, ``beta`` (KL to the reference), ``use_ema``, ``ema_decay``,
      ``ema_update_interval``, ``log_per_step_metrics``.

    > Evaluation (with ``eval_prompts`` passed to the trainer): ``eval_freq``, ``eval_before_training``,
      ``eval_seed``, ``eval_num_images_per_prompt``, ``eval_num_steps``, ``eval_guidance_scale``,
      ``eval_eta``, ``eval_deterministic``, ``eval_batch_size``.

    > Memory: ``gradient_checkpointing``, ``offload_trajectories``.

    > Rewards and faults: ``reward_weights``, ``async_reward_computation``, ``max_workers``, ``reward_error``, ``reward_max_skip_fraction``, ``max_consecutive_nonfinite_steps``.

    Batch sizes are per process. Each sampling batch of ``sample_batch_size`` images holds
    ``sample_batch_size / num_samples_per_prompt`` prompts, each drawn K times.
    """

    # General
    exp_name: str = field(default="loop", metadata={"help": "Name of this experiment; the wandb run name unless run_name is set."})
    run_name: str = field(default="", metadata={"help": "Run name for wandb; empty uses exp_name."})
    seed: int = field(default=0, metadata={"help": "Seed of every random draw: prompts, sampling noise, shuffling. Process i uses a stream derived from (seed, epoch, i)."})
    num_epochs: int = field(default=100, metadata={"help": "Number of epochs. One epoch samples, scores, and trains on sample_batch_size * sample_num_batches_per_epoch images per process."})
    output_dir: str = field(default="loop-output", metadata={"help": "Folder for checkpoints (output_dir/checkpoints), tracker logs (output_dir/logs) and the final adapter and model card."})
    mixed_precision: Optional[str] = field(default=None, metadata={"help": "'no', 'fp16' or 'bf16'. The frozen VAE, text encoder (and UNet base weights with LoRA) run in this dtype; trainable weights always stay fp32. None (the default) takes accelerate's setting: the launch config or `accelerate launch --mixed_precision`, read from ACCELERATE_MIXED_PRECISION, else 'no'. A value set here wins over the launcher's, with a warning when they differ."})
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls on Ampere or newer GPUs (faster, slightly less precise)."})
    log_with: Optional[str] = field(default=None, metadata={"help": "Tracker for metrics: 'tensorboard', 'wandb', 'comet_ml', 'mlflow', 'trackio', ... or 'all' (accelerate's names; a list logs to several). None logs to the progress bar only."})
    report_to: Optional[str] = field(default=None, metadata={"help": "TRL's and transformers' name for log_with: used when log_with is not set ('none' logs to no tracker)."})
    tracker_project_name: str = field(default="loop-trl", metadata={"help": "Project name passed to the trackers."})
    tracker_kwargs: Optional[Union[dict, str]] = field(default_factory=dict, metadata={"help": "Keyword arguments for the trackers, e.g. '{\"wandb\": {\"entity\": \"me\"}}'."})
    accelerator_kwargs: Optional[Union[dict, str]] = field(default_factory=dict, metadata={"help": "Extra keyword arguments for accelerate.Accelerator."})
    project_kwargs: Optional[Union[dict, str]] = field(default_factory=dict, metadata={"help": "Extra keyword arguments for accelerate.utils.ProjectConfiguration."})

    # Checkpoints and the Hub
    save_freq: int = field(default=1, metadata={"help": "Write a resumable checkpoint every this many epochs."})
    num_checkpoint_limit: int = field(default=5, metadata={"help": "Keep at most this many checkpoints; older ones are deleted."})
    resume_from: str = field(default="", metadata={"help": "Resume from a checkpoint folder, or 'latest' for the newest one under output_dir/checkpoints. Empty starts fresh."})
    push_to_hub: bool = field(default=False, metadata={"help": "At the end of train(), save the LoRA adapter and model card and upload them to hub_model_id."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repository ('user/name') that push_to_hub uploads to."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})

    # Sampling
    sample_num_steps: int = field(default=50, metadata={"help": "Number of DDIM denoising steps T per image."})
    sample_eta: float = field(default=1.0, metadata={"help": "The sampler's stochasticity (> 0): DDIM's eta for SD/SDXL; for SD3/FLUX the noise level a of the policy's flow sampler (its sde_type: Flow-GRPO's SDE uses 0.7, DanceGRPO's 0.3, CPS needs a in (0, 1]). Each step's log-probability needs it > 0."})
    sample_sde_window: bool = field(default=False, metadata={"help": "Sample stochastically only on the trainable steps range(sample_num_steps)[train_timestep_start:train_timestep_stop] and deterministically elsewhere (DDIM eta 0 / the Euler ODE step), as MixGRPO's SDE window and Flow-GRPO-Fast do: steps outside it carry no noise and are never trained."})
    sample_guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale; 1.0 disables guidance."})
    sample_batch_size: int = field(default=8, metadata={"help": "Images per sampling batch per process; a multiple of num_samples_per_prompt."})
    sample_num_batches_per_epoch: int = field(default=2, metadata={"help": "Sampling batches per epoch per process."})
    negative_prompts: Optional[str] = field(default=None, metadata={"help": "Negative prompt for classifier-free guidance (default: the empty prompt)."})
    num_samples_per_prompt: int = field(default=4, metadata={"help": "K: images sampled per prompt. LOOP's leave-one-out baseline for one image is the mean reward of the other K-1."})

    # Advantages
    advantage_estimator: str = field(default="loo", metadata={"help": "'loo' (LOOP: r_i minus the mean of the other K-1 rewards), 'group_norm' (GRPO: (r - group mean) / group std), 'per_prompt_tracker' (DDPO: per-prompt running statistics), 'batch_norm' (DDPO without tracking)."})
    per_prompt_stat_tracking: bool = field(default=False, metadata={"help": "DDPO's flag, kept for migration: True is the same as advantage_estimator='per_prompt_tracker'."})
    per_prompt_stat_tracking_buffer_size: int = field(default=16, metadata={"help": "per_prompt_tracker: rewards remembered per prompt."})
    per_prompt_stat_tracking_min_count: int = field(default=16, metadata={"help": "per_prompt_tracker: rewards a prompt needs before its own statistics are used instead of the batch's."})
    train_adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to [-train_adv_clip_max, train_adv_clip_max]."})

    # Training
    train_batch_size: int = field(default=1, metadata={"help": "Trajectories per training minibatch per process."})
    train_learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    train_adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    train_adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    train_adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    train_adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    train_use_8bit_adam: bool = field(default=False, metadata={"help": "Use bitsandbytes' 8-bit AdamW (pip install bitsandbytes; CUDA only)."})
    train_gradient_accumulation_steps: Optional[int] = field(default=None, metadata={"help": "Minibatches whose gradients are summed before one optimizer step. Each minibatch contributes all its trained timesteps. None (the default) takes accelerate's launch setting (`accelerate launch --gradient_accumulation_steps`, ACCELERATE_GRADIENT_ACCUMULATION_STEPS), else 1; a value set here wins, with a warning when they differ."})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradients are clipped to this global norm before each optimizer step."})
    train_num_inner_epochs: int = field(default=1, metadata={"help": "PPO passes over each epoch's samples. 1 with train_clip_range=inf is REINFORCE."})
    train_cfg: bool = field(default=True, metadata={"help": "Use classifier-free guidance when recomputing log-probabilities during training (must match sampling to stay on-policy)."})
    train_clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range eps of the ratio exp(logp_new - logp_old); 'inf' disables clipping."})
    train_timestep_start: int = field(default=0, metadata={"help": "First denoising step index that may be trained (0 is the step from pure noise). With train_timestep_stop it selects the eligible steps range(sample_num_steps)[start:stop], Python slice rules."})
    train_timestep_stop: Optional[int] = field(default=None, metadata={"help": "End (exclusive) of the eligible denoising steps; negative counts from the end, so -2 never trains the final two steps (whose tiny noise makes their gradient large and their effect on the image small). None: up to the last step."})
    train_timestep_fraction: float = field(default=1.0, metadata={"help": "Fraction of the eligible denoising steps trained on per trajectory, drawn at random for each sample and inner epoch (at least one)."})
    train_timestep_weights: Optional[Union[list, str]] = field(default=None, metadata={"help": "Optional loss weight per denoising step (a list of sample_num_steps numbers >= 0, JSON on the command line such as '[1, 1, 0.5]'); scaled to mean 1 over the eligible steps. None weighs every step equally."})
    train_timesteps_per_forward: int = field(default=1, metadata={"help": "Trained denoising steps of each trajectory that go through the denoiser together in one forward and backward pass (the pass's batch is train_batch_size times this); must divide the steps trained per trajectory. The gradient is the same; larger values trade memory for speed (for small models and on CPUs, fewer and larger calls are much faster)."})
    train_lr_scheduler: str = field(default="constant", metadata={"help": "Learning-rate schedule over all optimizer steps of the run, one of transformers' schedules: 'constant', 'constant_with_warmup', 'linear', 'cosine', 'cosine_with_restarts', 'polynomial' or 'inverse_sqrt'."})
    train_lr_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of linear warm-up for the schedules that have one."})
    train_lr_min_ratio: float = field(default=0.0, metadata={"help": "With train_lr_scheduler='cosine': the rate the cosine ends at, as a fraction of train_learning_rate (0 decays to zero; 0.25 ends at a quarter). Must be in [0, 1)."})
    beta: float = field(default=0.0, metadata={"help": "Weight of the KL penalty to the reference policy (the base model: the LoRA adapter disabled, or a frozen copy for full fine-tuning), added to the loss at every trained step: the closed-form KL between the policy's and the reference's Gaussian step, averaged over latent entries as the log-probability is (Flow-GRPO's and TRL GRPO's beta). 0 (the default) computes no reference. Logged as train/kl."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an exponential moving average of the trainable weights (diffusers' EMAModel) and evaluate, save and push the averaged weights; sampling for training uses the current ones. Saved in checkpoints."})
    ema_decay: float = field(default=0.9, metadata={"help": "With use_ema: the largest decay. diffusers' EMAModel ramps the decay of update n as min(ema_decay, n / (n + 9)), so the first update copies the weights."})
    ema_update_interval: int = field(default=1, metadata={"help": "With use_ema: update the average every this many optimizer steps."})
    log_per_step_metrics: bool = field(default=False, metadata={"help": "Also log, each epoch, the clip fraction and mean |log-ratio| by denoising step index (steps/{index}/...), to see what each step contributes."})

    # Evaluation
    eval_freq: int = field(default=0, metadata={"help": "Evaluate on the trainer's eval_prompts every this many epochs and after the last one; 0 evaluates only when trainer.evaluate() is called."})
    eval_before_training: bool = field(default=True, metadata={"help": "With eval_freq > 0, also evaluate before the first epoch (the base model's score, logged at step 0)."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the evaluation's sampling noise; the same seed gives the same noise at every evaluation, so scores are comparable across the run."})
    eval_num_images_per_prompt: int = field(default=4, metadata={"help": "Images sampled per evaluation prompt."})
    eval_num_steps: Optional[int] = field(default=None, metadata={"help": "Denoising steps for evaluation; None uses sample_num_steps."})
    eval_guidance_scale: Optional[float] = field(default=None, metadata={"help": "Guidance scale for evaluation; None uses sample_guidance_scale."})
    eval_eta: Optional[float] = field(default=None, metadata={"help": "The sampler's stochasticity for evaluation (DDIM's eta, the flow SDE's a); None uses sample_eta, and with sample_sde_window the evaluation keeps the training window. 0 samples deterministically (DDIM eta 0, the flow ODE)."})
    eval_deterministic: bool = field(default=False, metadata={"help": "At every evaluation, also evaluate with the deterministic sampler users deploy (DDIM eta 0 for SD/SDXL, the Euler ODE for SD3/FLUX: what the plain diffusers pipeline samples), logged under eval_deterministic/ beside eval/."})
    eval_batch_size: Optional[int] = field(default=None, metadata={"help": "Images per evaluation sampling batch; None uses sample_batch_size."})

    # Memory
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute the UNet's activations during the backward pass instead of keeping them: much less activation memory in training for roughly one more forward pass of time."})
    offload_trajectories: bool = field(default=False, metadata={"help": "Keep each epoch's stored trajectories (latents of every step, text embeddings, images) in CPU memory and move one training minibatch at a time to the accelerator."})

    # Faults
    reward_weights: Optional[Union[list, str]] = field(default=None, metadata={"help": "With several rewards (reward_function a list or dict): one weight per reward, the total being the weighted sum (JSON on the command line such as '[1.0, 0.5]'). None weighs each 1."})
    async_reward_computation: bool = field(default=False, metadata={"help": "Score each sampling batch in a worker thread while the next batch samples (DDPO's option). Same results as scoring in turn; worth it when the reward runs elsewhere than the sampler (a CPU reward such as OCR, another GPU, a reward server)."})
    max_workers: int = field(default=1, metadata={"help": "With async_reward_computation: worker threads that score batches. They call the reward one at a time unless it sets thread_safe = True (most models and tokenizers are not thread-safe), so more than 1 helps only such rewards."})
    reward_error: str = field(default="raise", metadata={"help": "What a failing reward does: 'raise' stops the run with a message naming the prompt and sample; 'skip_group' drops the affected prompt groups from the epoch (they get zero advantage) and logs how many."})
    reward_max_skip_fraction: float = field(default=0.5, metadata={"help": "With reward_error='skip_group': stop if more than this fraction of an epoch's prompt groups is dropped."})
    max_consecutive_nonfinite_steps: int = field(default=5, metadata={"help": "An optimizer step whose loss or gradient norm is not finite is skipped and logged; stop after this many such steps in a row."})

    def __post_init__(self) -> None:
        self._take_launch_settings()
        if self.report_to is not None and self.log_with is None:  # TRL's name for log_with
            self.log_with = None if self.report_to in ("none", []) else self.report_to
        for name in _JSON_FIELDS:
            self._parse_json(name)
        for names, rule, message in _RULES:  # one field at a time
            for name in names:
                value = getattr(self, name)
                if not rule(value):
                    raise ValueError(f"{name} {message}, got {value!r}.")
        if self.per_prompt_stat_tracking:
            _check(self.advantage_estimator in ("loo", "per_prompt_tracker"),
                   f"per_prompt_stat_tracking=True conflicts with advantage_estimator={self.advantage_estimator!r}; "
                   "drop per_prompt_stat_tracking and set advantage_estimator='per_prompt_tracker'.")
            self.advantage_estimator = "per_prompt_tracker"
        for name, choices in _CHOICES.items():
            _check(getattr(self, name) in choices, f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        self._check_together()

    def _parse_json(self, name: str) -> None:
        """A list or dict field given as JSON text (the command line, YAML strings)."""
        value = getattr(self, name)
        wants = dict if name.endswith("_kwargs") else list
        if value is None and wants is dict:
            value = {}
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else ({} if wants is dict else None)
            except json.JSONDecodeError as error:
                example = "'{\"key\": 1}'" if wants is dict else "'[1, 1, 0.5]'"
                raise ValueError(f"{name} must be JSON such as {example}; got {value!r} ({error}).") from error
        _check(value is None or isinstance(value, wants),
               f"{name} must be a {'dictionary (a JSON object' if wants is dict else 'list (a JSON list'} on the command "
               f"line), got {value!r}.")
        setattr(self, name, value)

    def _check_together(self) -> None:
        """The rules that tie fields together: warnings, timesteps, whole prompt groups, batch divisibility."""
        if not self.train_cfg and self.sample_guidance_scale > 1.0:
            warnings.warn(f"train_cfg=False scores the sampled steps without guidance, but they were sampled with "
                          f"sample_guidance_scale={self.sample_guidance_scale}: training is off-policy from its first "
                          "step (onpolicy_max_abs_logratio will not be 0 and the clipping acts on a wrong ratio). Use "
                          "train_cfg=True, or sample without guidance (sample_guidance_scale=1.0).", stacklevel=4)
        try:
            steps = eligible_steps(self.sample_num_steps, self.train_timestep_start, self.train_timestep_stop)
            normalized_step_weights(self.train_timestep_weights, self.sample_num_steps, steps)
        except (ValueError, TypeError) as error:
            raise ValueError(str(error)) from None
        per_forward = self.train_timesteps_per_forward
        _check(isinstance(per_forward, int) and not isinstance(per_forward, bool) and per_forward >= 1
               and self.num_train_timesteps % per_forward == 0,
               f"train_timesteps_per_forward must be an integer >= 1 that divides the steps trained per trajectory "
               f"({self.num_train_timesteps} = train_timestep_fraction {self.train_timestep_fraction} of "
               f"{len(self.train_timesteps)} eligible steps), got {per_forward!r}.")
        k = self.num_samples_per_prompt
        if self.advantage_estimator in ("loo", "group_norm"):
            _check(k >= 2, f"advantage_estimator={self.advantage_estimator!r} compares the K samples of a prompt, so "
                           f"num_samples_per_prompt must be >= 2, got {k}. Use 'per_prompt_tracker' or 'batch_norm' for K=1.")
        _check(self.sample_batch_size % k == 0,
               f"sample_batch_size ({self.sample_batch_size}) must be a multiple of num_samples_per_prompt ({k}) so "
               f"that each batch holds whole prompt groups; try sample_batch_size={max(k, self.sample_batch_size // k * k)}.")
        per_epoch = self.sample_batch_size * self.sample_num_batches_per_epoch
        _check(per_epoch % self.train_batch_size == 0,
               f"train_batch_size ({self.train_batch_size}) must divide the images sampled per epoch per process "
               f"(sample_batch_size * sample_num_batches_per_epoch = {per_epoch}).")
        minibatches = per_epoch // self.train_batch_size
        _check(minibatches % self.train_gradient_accumulation_steps == 0,
               f"train_gradient_accumulation_steps ({self.train_gradient_accumulation_steps}) must divide the "
               f"minibatches per inner epoch ({minibatches} = {per_epoch} images / train_batch_size "
               f"{self.train_batch_size}), or the last optimizer step of an epoch would be left half-accumulated.")
        _check(self.train_lr_min_ratio == 0 or self.train_lr_scheduler == "cosine",
               f"train_lr_min_ratio={self.train_lr_min_ratio} sets where a cosine ends, but train_lr_scheduler is "
               f"{self.train_lr_scheduler!r}; set train_lr_scheduler='cosine' or train_lr_min_ratio=0.")
        _check(self.resume_from in ("", "latest") or os.path.isdir(self.resume_from),
               f"resume_from must be '', 'latest' or an existing checkpoint folder; {self.resume_from!r} does not exist.")
        _check(not self.push_to_hub or bool(self.hub_model_id),
               "push_to_hub=True needs hub_model_id, e.g. hub_model_id='your-name/sd15-loop-aesthetic'.")

    def _take_launch_settings(self) -> None:
        """Fields that accelerate's launcher also sets: None takes the launcher's value (its environment
        variable), an explicit value wins with a warning when the two differ."""
        for name, variable, fallback in _LAUNCH_SETTINGS:
            launched = os.environ.get(variable) or None
            value = getattr(self, name)
            if value is None:
                setattr(self, name, fallback if launched is None else type(fallback)(launched))
            elif launched is not None and str(value) != launched:
                warnings.warn(f"{name}={value!r} is set in the config and wins over accelerate's launch setting "
                              f"{launched!r} ({variable}); leave {name} unset to use the launcher's.", stacklevel=3)

    @property
    def train_timesteps(self) -> list[int]:
        """The eligible step indices: ``range(sample_num_steps)[train_timestep_start:train_timestep_stop]``."""
        return eligible_steps(self.sample_num_steps, self.train_timestep_start, self.train_timestep_stop)

    @property
    def num_train_timesteps(self) -> int:
        """Denoising steps trained on per trajectory: ``int(len(train_timesteps) * train_timestep_fraction)``, at least 1."""
        return max(1, int(len(self.train_timesteps) * self.train_timestep_fraction))

    def to_dict(self) -> dict:
        """The fields as a plain dictionary (for trackers and model cards)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
