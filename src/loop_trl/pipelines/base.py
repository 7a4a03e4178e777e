"""The data an epoch passes around, and the small interface every model family implements."""

from __future__ import annotations

import abc
import warnings
import contextlib
from dataclasses import dataclass, fields, replace
from typing import Iterator, NamedTuple, Sequence

import torch

__all__ = ["DiffusionPolicy", "StepDistribution", "Trajectories"]


Conditioning = dict[str, torch.Tensor]
_RENAMED = {"save_adapter": "save_weights", "load_adapter": "load_weights"}  # former name -> name


def _map_batched(value, fn):
    """Apply ``fn`` to a tensor, or to every tensor of a (nested) dict; other values pass unchanged."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: _map_batched(item, fn) for key, item in value.items()}
    return value


class StepDistribution(NamedTuple):
    """The Gaussian of one sampler step at a stored transition, and the log-probability of its stored end."""

    log_prob: torch.Tensor  # (B,), averaged over the latent's entries
    mean: torch.Tensor  # (B, ...) like the latents
    std: torch.Tensor  # broadcasts against mean: (B, 1, ...)


@dataclass
class Trajectories:
    """A batch of B sampled denoising trajectories of T steps each, for any model family.

    Every tensor, and every tensor of the conditioning dicts, has the batch as its first
    dimension, so a batch slices, concatenates and moves the same way whatever the family.
    Scoring a stored transition needs only what is stored here (no scheduler state).

    Attributes:
        prompts: the B prompts (each repeated K times when sampled in groups).
        conditioning: the model's prompt inputs, each (B, ...): ``prompt_embeds`` (B, L, D), and per
            family ``text_embeds`` (B, D') and ``time_ids`` (B, 6) for SDXL, ``pooled_prompt_embeds``
            (B, D') for SD3 and FLUX.
        negative_conditioning: the same for the unconditional branch of classifier-free guidance,
            or None without it.
        latents: x_T, ..., x_0 in the order visited, (B, T+1, ...): (B, T+1, C, H, W) image latents,
            (B, T+1, N, D) packed tokens (FLUX), or (B, T+1, C, F', H, W) video latents (Wan).
        timesteps: the model's timestep input at each step, (B, T).
        log_probs: log p(x_{t-1} | x_t) under the sampling policy, (B, T).
        images: decoded final images in [0, 1], (B, 3, H', W'); for a video family
            (:attr:`DiffusionPolicy.produces_video`) the frames, (B, F, 3, H', W').
        group_ids: the prompt group of each sample, (B,).
        guidance_scale: classifier-free (or, for FLUX, embedded) guidance used when sampling.
        eta: the sampler's stochasticity: DDIM's eta, or the flow SDE's noise level ``a``.
        sigmas: flow-matching models: the noise levels s_0 > ... > s_T visited, (B, T+1); None for DDIM.
        sde_type: flow-matching models: the stochastic sampler (:data:`loop_trl.flow_sampling.FLOW_SDE_TYPES`);
            None for DDIM.
    """

    prompts: list[str]
    conditioning: Conditioning
    negative_conditioning: Conditioning | None
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor
    group_ids: torch.Tensor
    guidance_scale: float
    eta: float
    sigmas: torch.Tensor | None = None
    sde_type: str | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def transition(self, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored transition at step index ``step`` (an int or one per sample): ``(step, x, x_next)``
        with ``step`` as a (B,) long tensor and the latents before and after it."""
        rows = torch.arange(len(self), device=self.latents.device)
        step = torch.as_tensor(step, device=self.latents.device).long().expand(len(self))
        return step, self.latents[rows, step], self.latents[rows, step + 1]

    def _batched_fields(self) -> Iterator[str]:
        for f in fields(self):
            if isinstance(getattr(self, f.name), (torch.Tensor, dict)):
                yield f.name

    def __getitem__(self, index: torch.Tensor | slice | Sequence[int]) -> "Trajectories":
        """Select samples along the batch dimension."""
        if isinstance(index, slice):  # views, no copy
            prompts = self.prompts[index]
        else:
            index = torch.as_tensor(index).reshape(-1).tolist()
            prompts = [self.prompts[i] for i in index]
        changes = {name: _map_batched(getattr(self, name), lambda t: t[index]) for name in self._batched_fields()}
        return replace(self, prompts=prompts, **changes)

    def to(self, device: torch.device | str) -> "Trajectories":
        return replace(self, **{name: _map_batched(getattr(self, name), lambda t: t.to(device))
                                for name in self._batched_fields()})

    @staticmethod
    def cat(batches: Sequence["Trajectories"]) -> "Trajectories":
        """Concatenate batches sampled with the same settings."""
        first = batches[0]

        def cat_field(values):
            if isinstance(values[0], dict):
                return {key: cat_field([v[key] for v in values]) for key in values[0]}
            return torch.cat(values)

        changes = {name: cat_field([getattr(b, name) for b in batches]) for name in first._batched_fields()}
        return replace(first, prompts=[p for b in batches for p in b.prompts], **changes)


class DiffusionPolicy(abc.ABC):
    """What the trainer needs from a model family: sample, score, train, move, save.

    The trainer touches a policy only through this interface. It owns the accelerate-prepared copy
    of :attr:`trainable_module` (e.g. DistributedDataParallel, so that gradients synchronise across
    processes) and hands it to :meth:`log_prob` as ``denoiser``; sampling uses the module itself.

    ``save_adapter`` / ``load_adapter`` are the former names of :meth:`save_weights` /
    :meth:`load_weights` (they also write full fine-tunes): they still work, with a ``FutureWarning``,
    and a subclass that implements only the old names gets the new ones from them.
    """

    #: for model cards: the base model's Hub id or folder, and optional Python code that loads it as ``pipe``
    base_model_name: str | None = None
    base_model_loader: str | None = None
    use_lora: bool = True
    #: whether samples are videos: ``Trajectories.images`` is then (B, F, 3, H, W), and the reward must take videos
    produces_video: bool = False

    @property
    @abc.abstractmethod
    def trainable_module(self) -> torch.nn.Module:
        """The module that holds the trained weights (the UNet or the transformer)."""

    @abc.abstractmethod
    def to(self, device: torch.device | str, inference_dtype: torch.dtype = torch.float32) -> "DiffusionPolicy":
        """Move to ``device``; frozen weights in ``inference_dtype``, trainable weights in fp32."""

    @abc.abstractmethod
    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_steps: int,
        guidance_scale: float,
        eta: float,
        generator: torch.Generator | Sequence[torch.Generator],
        negative_prompt: str | None = None,
        stochastic_steps: Sequence[int] | None = None,
    ) -> Trajectories:
        """Sample one trajectory per prompt, recording latents and per-step log-probabilities.

        ``generator`` is one CPU generator for the batch, or a list of one per prompt: then an
        image depends only on its own generator, not on its batch size or position.
        ``stochastic_steps``: the step indices that carry noise (an SDE window); the others are
        deterministic (DDIM eta 0, or the Euler ODE step) and record a log-probability of 0, so
        they must not be trained. None: every step is stochastic.
        """

    @abc.abstractmethod
    def log_prob(self, trajectories: Trajectories, step: int | torch.Tensor, guidance_scale: float | None = None, *,
                 denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        """Log-probability (B,) of the stored transition at step index ``step`` (int or (B,)) under the current
        weights, computed through ``denoiser`` (the trainer's prepared module; None: :attr:`trainable_module`)."""

    def step_distribution(self, trajectories: Trajectories, step: int | torch.Tensor, guidance_scale: float | None = None,
                          *, denoiser: torch.nn.Module | None = None) -> StepDistribution:
        """The step's Gaussian (mean, std) and :meth:`log_prob` together, for the KL to the reference
        (``beta > 0``). Optional: a policy without it trains with ``beta = 0`` only."""
        raise NotImplementedError(f"{type(self).__name__} has no step_distribution(), which beta > 0 needs.")

    def prepare_reference(self) -> None:
        """Called by the trainer before training when ``beta > 0``: keep what :meth:`reference` needs."""

    def reference(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """A context in which the returned module computes the reference policy (the base model), for the
        KL penalty. Optional: a policy without it trains with ``beta = 0`` only."""
        raise NotImplementedError(f"{type(self).__name__} has no reference(), which beta > 0 needs.")

    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates."""

    @abc.abstractmethod
    def save_weights(self, save_directory: str, state_dict: dict | None = None) -> None:
        """Write the trained weights (a LoRA adapter in diffusers format, or full weights); ``state_dict``
        is the trained module's gathered state when its parameters are sharded (FSDP, ZeRO-3)."""

    @abc.abstractmethod
    def load_weights(self, directory: str) -> None:
        """Load weights written by :meth:`save_weights` into the trainable model."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for old, new in _RENAMED.items():
            if old in cls.__dict__ and new not in cls.__dict__:  # a policy written against the old names
                warnings.warn(f"{cls.__name__}.{old} is the former name of {new}; rename it (it will stop "
                              "being found in a future release).", FutureWarning, stacklevel=2)
                setattr(cls, new, cls.__dict__[old])

    def save_adapter(self, save_directory: str, state_dict: dict | None = None) -> None:
        """Deprecated name of :meth:`save_weights`."""
        warnings.warn("save_adapter() is now save_weights().", FutureWarning, stacklevel=2)
        self.save_weights(save_directory, state_dict=state_dict)

    def load_adapter(self, directory: str) -> None:
        """Deprecated name of :meth:`load_weights`."""
        warnings.warn("load_adapter() is now load_weights().", FutureWarning, stacklevel=2)
        self.load_weights(directory)

    def model_card_info(self) -> dict:
        """What a model card needs to show how to load the weights: ``pipeline_class`` (the diffusers
        pipeline), ``module_name`` and ``module_class`` (the trained module, for full fine-tuning),
        ``tags``, ``scheduler_class`` and ``scheduler_kwargs`` (the diffusers scheduler the policy samples
        with, built as ``scheduler_class.from_config(pipe.scheduler.config, **scheduler_kwargs)``; None
        when it is the checkpoint's own), and ``takes_eta`` (whether ``eta`` acts in that sampler)."""
        return dict(pipeline_class="DiffusionPipeline", module_name="unet", module_class="UNet2DConditionModel",
                    tags=[], takes_eta=False, scheduler_class=None, scheduler_kwargs={})

    def check_sampling(self, eta: float) -> None:
        """Raise ValueError if the policy's sampler cannot sample with stochasticity ``eta`` (the trainer asks
        at construction, for ``sample_eta``)."""

    def zero_variance_steps(self, num_steps: int) -> list[int]:
        """Step indices of a ``num_steps``-step schedule whose transition carries no noise at any stochasticity
        (deterministic, log-probability 0, never trainable); the trainer refuses to train them."""
        return []

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass of training forward passes (to save memory)."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing.")
