"""The sampling and scoring loop shared by the rectified-flow transformer families (SD3, FLUX.1, FLUX.2, Qwen-Image, Z-Image,
Wan).

A family supplies four small pieces: prompt conditioning, the initial noise, the sigma
schedule, and one velocity prediction; this class runs a stochastic flow sampler with
log-probabilities (:mod:`loop_trl.flow_sampling`: Flow-GRPO's SDE, DanceGRPO's or CPS) and
re-scores stored transitions from the sigmas the trajectories store.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..flow_sampling import FLOW_SDE_TYPES, check_noise_level, flow_ode_step, flow_sde_step_with_logprob
from .base import Conditioning, StepDistribution, Trajectories
from .diffusers_policy import DiffusersPolicy

__all__ = ["FlowMatchingPolicy", "padded_prompts"]


def padded_prompts(sequences: Sequence[torch.Tensor], length: int) -> Conditioning:
    """Prompt embeddings of different lengths, (L_i, D) each, as trajectories store them: zero-padded to
    ``length`` (``prompt_embeds`` (B, length, D), fp32) with the mask of the real tokens (``prompt_mask``
    (B, length)), so that batches of any prompts concatenate (Qwen-Image, Z-Image)."""
    padded = torch.zeros(len(sequences), length, sequences[0].shape[-1], device=sequences[0].device)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool, device=sequences[0].device)
    for i, e in enumerate(sequences):
        padded[i, :len(e)], mask[i, :len(e)] = e.float(), True
    return {"prompt_embeds": padded, "prompt_mask": mask}


class FlowMatchingPolicy(DiffusersPolicy):
    """A rectified-flow transformer trained with a stochastic flow sampler.

    The ``eta`` of the trainer's config (``sample_eta``) is the sampler's noise level ``a``.
    Images are sampled at ``resolution`` pixels square.

    Args:
        sde_type: the sampler (:mod:`loop_trl.flow_sampling`): ``"flow_grpo"`` (the default; Flow-GRPO's
            SDE, which uses ``a = 0.7``), ``"dance_grpo"`` (a constant noise scale; DanceGRPO uses
            ``a = 0.3``) or ``"cps"`` (coefficient-preserving sampling, ``a`` in (0, 1]; its last step is
            deterministic, so train with ``train_timestep_stop=-1``).
    """

    module_name = "transformer"

    def __init__(self, pipeline, *, sde_type: str = "flow_grpo", **kwargs):
        if sde_type not in FLOW_SDE_TYPES:
            raise ValueError(f"sde_type must be one of {', '.join(FLOW_SDE_TYPES)}, got {sde_type!r}.")
        self.sde_type = sde_type
        super().__init__(pipeline, **kwargs)

    def check_sampling(self, eta: float) -> None:
        check_noise_level(eta, self.sde_type)

    def zero_variance_steps(self, num_steps: int) -> list[int]:
        return [num_steps - 1] if self.sde_type == "cps" else []  # CPS adds no noise on the step that lands at 0

    def _setup_scheduler(self) -> None:
        if not isinstance(self.pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(f"{type(self).__name__} samples with the flow-matching SDE and needs the pipeline's "
                            f"FlowMatchEulerDiscreteScheduler (for its sigma schedule), got "
                            f"{type(self.pipeline.scheduler).__name__}.")

    # ------------------------------------------------------------------ family hooks
    @abc.abstractmethod
    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        """Prompt conditioning and, with classifier-free guidance, the unconditional one; tensors (B, ...)."""

    @abc.abstractmethod
    def _initial_noise(self, batch: int, generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
        """x at sigma 1: standard normal latents in the transformer's input layout, fp32 on the CPU."""

    @abc.abstractmethod
    def _velocity(self, transformer: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor,
                  cond: Conditioning, uncond: Conditioning | None, guidance_scale: float) -> torch.Tensor:
        """The (guided) velocity prediction (fp32) for latents at sigmas (B,)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents to images (B, 3, H, W) in [0, 1], fp32."""

    @property
    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor * 2  # the latents go into the transformer as 2x2 patches

    @property
    def default_resolution(self) -> int:
        return self.pipeline.default_sample_size * self.pipeline.vae_scale_factor

    @property
    def _latent_size(self) -> int:
        """Height and width of the VAE latents (unpacked) of a ``resolution``-pixel image."""
        return self.resolution // self.pipeline.vae_scale_factor

    @torch.no_grad()
    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents through an ``AutoencoderKL`` with the VAE's scaling and shift factors, to [0, 1]."""
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _sigmas(self, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
        """The T+1 noise levels of a ``num_steps`` schedule, from 1 down to 0 (resolution-shifted as the pipeline does)."""
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(num_steps, device="cpu", **self._shift_kwargs(latents))
        return scheduler.sigmas.float().clone()

    def _shift_kwargs(self, latents: torch.Tensor) -> dict:
        """Extra arguments of ``scheduler.set_timesteps`` (``mu`` for dynamic shifting)."""
        return {}

    # ------------------------------------------------------------------ sampling and scoring
    @torch.no_grad()
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
        """Sample one image per prompt with the flow sampler (noise level ``eta``), recording log-probabilities.

        All noise comes from ``generator`` (a CPU generator), so a seed fixes the result on any device.
        Steps outside ``stochastic_steps`` (all steps when None), and steps that carry no noise
        (:meth:`zero_variance_steps`), are Euler ODE steps with log-prob 0.
        """
        self.check_sampling(eta)
        device, transformer = self.device, self.trainable_module
        transformer.eval()  # the trainer puts it back in training mode for its passes
        prompts = list(prompts)
        cond, uncond = self._encode(prompts, guidance_scale > 1.0, negative_prompt)
        latents = self._initial_noise(len(prompts), generator).to(device)
        sigmas = self._sigmas(num_steps, latents).to(device)
        batch_sigmas = sigmas.unsqueeze(0).expand(len(prompts), -1)
        all_latents, all_log_probs = [latents], []
        deterministic = set(self.zero_variance_steps(num_steps))
        for i in range(num_steps):
            velocity = self._velocity(transformer, latents, batch_sigmas[:, i], cond, uncond, guidance_scale)
            if (stochastic_steps is None or i in stochastic_steps) and i not in deterministic:
                step = flow_sde_step_with_logprob(velocity, batch_sigmas[:, i], batch_sigmas[:, i + 1], latents, eta,
                                                  sde_type=self.sde_type, generator=generator)
                latents, log_prob = step.prev_sample, step.log_prob
            else:
                latents = flow_ode_step(velocity, batch_sigmas[:, i], batch_sigmas[:, i + 1], latents)
                log_prob = torch.zeros(len(prompts), device=device)
            all_latents.append(latents)
            all_log_probs.append(log_prob)
        return Trajectories(
            prompts=prompts,
            conditioning=cond,
            negative_conditioning=uncond,
            latents=torch.stack(all_latents, dim=1),
            timesteps=batch_sigmas[:, :-1] * self.pipeline.scheduler.config.num_train_timesteps,
            log_probs=torch.stack(all_log_probs, dim=1),
            images=self.decode(latents),
            group_ids=torch.arange(len(prompts), device=device),
            guidance_scale=guidance_scale,
            eta=eta,
            sigmas=batch_sigmas.clone(),
            sde_type=self.sde_type,
        )

    def log_prob(self, trajectories: Trajectories, step: int | torch.Tensor, guidance_scale: float | None = None, *,
                 denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        """Log-probability (B,) of ``latents[:, step] -> latents[:, step + 1]`` under the current transformer.

        A pure function of the stored latents, sigmas and conditioning; gradients flow to the
        trainable weights through ``denoiser`` (the trainer's prepared module; default
        :attr:`trainable_module`).
        """
        return self.step_distribution(trajectories, step, guidance_scale, denoiser=denoiser).log_prob

    def step_distribution(self, trajectories: Trajectories, step: int | torch.Tensor, guidance_scale: float | None = None,
                          *, denoiser: torch.nn.Module | None = None) -> StepDistribution:
        """The flow sampler's Gaussian at the stored transition and the log-probability of its stored end."""
        traj = trajectories
        step, latents, next_latents = traj.transition(step)
        sigma = traj.sigmas.gather(1, step[:, None]).squeeze(1)
        sigma_next = traj.sigmas.gather(1, step[:, None] + 1).squeeze(1)
        scale = traj.guidance_scale if guidance_scale is None else guidance_scale
        velocity = self._velocity(self.trainable_module if denoiser is None else denoiser, latents, sigma,
                                  traj.conditioning, traj.negative_conditioning, scale)
        out = flow_sde_step_with_logprob(velocity, sigma, sigma_next, latents, traj.eta, sde_type=traj.sde_type or "flow_grpo",
                                         prev_sample=next_latents)
        return StepDistribution(out.log_prob, out.mean, out.std)
