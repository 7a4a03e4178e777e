"""The data an epoch passes around, and the small interface every model family implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass, fields, replace
from typing import Iterator, Sequence

import torch

__all__ = ["DiffusionPolicy", "Trajectories"]


@dataclass
class Trajectories:
    """A batch of B sampled denoising trajectories of T steps each.

    Attributes:
        prompts: the B prompts (each repeated K times when sampled in groups).
        prompt_embeds: text-encoder states, (B, L, D).
        negative_prompt_embeds: unconditional states for guidance, (B, L, D), or None without guidance.
        latents: x_T, ..., x_0 in the order visited, (B, T+1, C, H, W).
        timesteps: the scheduler timestep of each step, (B, T).
        log_probs: log p(x_{t-1} | x_t) under the sampling policy, (B, T).
        images: decoded final images in [0, 1], (B, 3, H', W').
        group_ids: the prompt group of each sample, (B,).
        guidance_scale: classifier-free guidance used when sampling.
        eta: the DDIM stochasticity used when sampling.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor
    group_ids: torch.Tensor
    guidance_scale: float
    eta: float

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def _tensor_fields(self) -> Iterator[str]:
        for f in fields(self):
            if isinstance(getattr(self, f.name), torch.Tensor):
                yield f.name

    def __getitem__(self, index: torch.Tensor | slice | Sequence[int]) -> "Trajectories":
        """Select samples along the batch dimension."""
        if isinstance(index, slice):  # views, no copy
            changes = {name: getattr(self, name)[index] for name in self._tensor_fields()}
            changes["prompts"] = self.prompts[index]
            return replace(self, **changes)
        positions = torch.as_tensor(index).reshape(-1).tolist()
        changes = {name: getattr(self, name)[positions] for name in self._tensor_fields()}
        changes["prompts"] = [self.prompts[i] for i in positions]
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> "Trajectories":
        return replace(self, **{name: getattr(self, name).to(device) for name in self._tensor_fields()})

    @staticmethod
    def cat(batches: Sequence["Trajectories"]) -> "Trajectories":
        """Concatenate batches sampled with the same settings."""
        first = batches[0]
        changes = {name: torch.cat([getattr(b, name) for b in batches]) for name in first._tensor_fields()}
        changes["prompts"] = [p for b in batches for p in b.prompts]
        return replace(first, **changes)


class DiffusionPolicy(abc.ABC):
    """What the trainer needs from a model family: sample, score, train, save."""

    @abc.abstractmethod
    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_steps: int,
        guidance_scale: float,
        eta: float,
        generator: torch.Generator,
        negative_prompt: str | None = None,
    ) -> Trajectories:
        """Sample one trajectory per prompt, recording latents and per-step log-probabilities."""

    @abc.abstractmethod
    def log_prob(self, trajectories: Trajectories, step: int | torch.Tensor, guidance_scale: float | None = None) -> torch.Tensor:
        """Log-probability (B,) of the stored transition at step index ``step`` (int or (B,)) under the current weights."""

    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates."""

    @abc.abstractmethod
    def save_adapter(self, save_directory: str) -> None:
        """Write the trained weights (a LoRA adapter in diffusers format, or full weights)."""

    @abc.abstractmethod
    def load_adapter(self, directory: str) -> None:
        """Load weights written by :meth:`save_adapter` into the trainable model."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass of training forward passes (to save memory)."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing.")
