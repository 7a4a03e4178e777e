"""Stable Diffusion 1.x / 2.x as a LOOP policy: LoRA (or full) fine-tuning of the UNet, DDIM sampling."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ..sampling import (ddim_step, ddim_step_distribution, ddim_step_std, ddim_step_with_logprob, gaussian_log_prob,
                        standard_normal)
from .base import Conditioning, StepDistribution, Trajectories
from .diffusers_policy import LORA_WEIGHT_NAME, DiffusersPolicy

__all__ = ["LOOPStableDiffusionPipeline", "LORA_WEIGHT_NAME", "ddim_overrides"]

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def ddim_overrides(scheduler_config) -> dict:
    """The settings that turn a checkpoint's scheduler config into the DDIM sampler the UNet families train with:
    ``set_alpha_to_one=False`` (True gives the last step zero variance) and, where the config does not say,
    ``clip_sample=False`` (latent models never clip x0; DDIM's own default would). Only what differs."""
    overrides = {"set_alpha_to_one": False, "clip_sample": scheduler_config.get("clip_sample", False)}
    return {key: value for key, value in overrides.items() if scheduler_config.get(key) != value}


class LOOPStableDiffusionPipeline(DiffusersPolicy):
    """Wraps a diffusers ``StableDiffusionPipeline`` for RL fine-tuning of its UNet.

    Sampling always uses a DDIM scheduler built from the pipeline's scheduler config
    (epsilon and v-prediction checkpoints both work), with DDIM's ``eta`` as the stochasticity.
    LoRA targets default to the attention projections, as diffusers' ``train_text_to_image_lora.py``.
    See :class:`~loop_trl.pipelines.diffusers_policy.DiffusersPolicy` for the arguments.
    """

    pipeline_class = StableDiffusionPipeline
    module_name = "unet"
    default_lora_target_modules = DEFAULT_LORA_TARGETS
    tags = ("stable-diffusion",)
    from_pretrained_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    @property
    def default_resolution(self) -> int:
        return self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor

    def _setup_scheduler(self) -> None:
        if self.pipeline.scheduler.config.get("set_alpha_to_one", False):
            logger.warning("set_alpha_to_one=True gives the last DDIM step zero variance; using set_alpha_to_one=False.")
        # what a user sets to sample as trained: DDIMScheduler.from_config(pipe.scheduler.config, **these)
        self.scheduler_overrides = ddim_overrides(self.pipeline.scheduler.config)
        self.pipeline.scheduler = DDIMScheduler.from_config(self.pipeline.scheduler.config, **self.scheduler_overrides)

    # ------------------------------------------------------------------ family hooks
    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        """Prompt conditioning and, with guidance, the unconditional one; every tensor (B, ...)."""
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        embeds, negative_embeds = self.pipeline.encode_prompt(prompts, self.device, 1, guided, negative)
        return {"prompt_embeds": embeds.float()}, ({"prompt_embeds": negative_embeds.float()} if guided else None)

    def _unet_kwargs(self, cond: Conditioning) -> dict:
        """The UNet's conditioning keyword arguments."""
        return {"encoder_hidden_states": cond["prompt_embeds"]}

    # ------------------------------------------------------------------ sampling and scoring
    def _predict_noise(self, unet, latents, timesteps, cond: Conditioning, uncond: Conditioning | None,
                       guidance_scale: float) -> torch.Tensor:
        """The (guided) UNet output for latents (B, C, H, W) at timesteps (B,)."""
        return self._guided(lambda x, t, c: unet(x, t, **self._unet_kwargs(c), return_dict=False)[0],
                            latents, timesteps, cond, uncond, guidance_scale)

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
        """Sample one image per prompt with the stochastic DDIM sampler.

        All noise comes from ``generator`` (a CPU generator), so a seed fixes the result on any device.
        Steps outside ``stochastic_steps`` (all steps when None) are deterministic DDIM steps with log-prob 0.
        """
        pipe, device = self.pipeline, self.device
        pipe.unet.eval()  # the trainer puts it back in training mode for its passes
        prompts = list(prompts)
        cond, uncond = self._encode(prompts, guidance_scale > 1.0, negative_prompt)
        scheduler = pipe.scheduler
        scheduler.set_timesteps(num_steps, device=device)
        size = self.resolution // pipe.vae_scale_factor
        shape = (len(prompts), pipe.unet.config.in_channels, size, size)
        latents = standard_normal(shape, generator).to(device) * scheduler.init_noise_sigma
        all_latents, all_log_probs = [latents], []
        deterministic = set(self._zero_variance_indices())  # no noise to add there, whatever eta
        for i, t in enumerate(scheduler.timesteps):
            timesteps = t.expand(len(prompts)).to(device)
            noise_pred = self._predict_noise(pipe.unet, latents, timesteps, cond, uncond, guidance_scale)
            if (stochastic_steps is None or i in stochastic_steps) and i not in deterministic:
                latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, eta, generator=generator)
            else:
                latents, log_prob = ddim_step(scheduler, noise_pred, timesteps, latents), torch.zeros(len(prompts), device=device)
            all_latents.append(latents)
            all_log_probs.append(log_prob)
        return Trajectories(
            prompts=prompts,
            conditioning=cond,
            negative_conditioning=uncond,
            latents=torch.stack(all_latents, dim=1),
            timesteps=scheduler.timesteps.to(device).unsqueeze(0).expand(len(prompts), -1).clone(),
            log_probs=torch.stack(all_log_probs, dim=1),
            images=self.decode(latents),
            group_ids=torch.arange(len(prompts), device=device),
            guidance_scale=guidance_scale,
            eta=eta,
        )

    def zero_variance_steps(self, num_steps: int) -> list[int]:
        """Step indices of the ``num_steps``-step DDIM schedule whose Gaussian has zero variance at any eta:
        a step to the timestep it starts from (the last step when the schedule reaches timestep 0:
        ``timestep_spacing='leading'`` with ``steps_offset=0``). They are sampled deterministically,
        record a log-probability of 0 and cannot be trained."""
        self.pipeline.scheduler.set_timesteps(num_steps, device=self.device)
        return self._zero_variance_indices()

    def _zero_variance_indices(self) -> list[int]:
        """:meth:`zero_variance_steps` of the schedule the scheduler is set to."""
        scheduler = self.pipeline.scheduler
        return (ddim_step_std(scheduler, scheduler.timesteps.cpu()) <= 0).nonzero().flatten().tolist()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) to images (B, 3, H, W) in [0, 1], fp32."""
        vae = self.pipeline.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def log_prob(self, trajectories: Trajectories, step: int | torch.Tensor, guidance_scale: float | None = None, *,
                 denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        """Log-probability (B,) of ``latents[:, step] -> latents[:, step + 1]`` under the current UNet.

        ``step`` is an index into the T denoising steps, one int or a (B,) tensor. Guidance
        defaults to the sampling guidance; pass 1.0 to score with the conditional model only.
        Gradients flow to the trainable weights through ``denoiser`` (the trainer's prepared module;
        default :attr:`trainable_module`).
        """
        return self.step_distribution(trajectories, step, guidance_scale, denoiser=denoiser).log_prob

    def step_distribution(self, trajectories: Trajectories, step: int | torch.Tensor, guidance_scale: float | None = None,
                          *, denoiser: torch.nn.Module | None = None) -> StepDistribution:
        """The DDIM step's Gaussian at the stored transition and the log-probability of its stored end (see
        :meth:`log_prob`)."""
        traj = trajectories
        scheduler = self.pipeline.scheduler
        if scheduler.num_inference_steps != traj.num_steps:
            scheduler.set_timesteps(traj.num_steps, device=self.device)
        step, latents, next_latents = traj.transition(step)
        timesteps = traj.timesteps.gather(1, step[:, None]).squeeze(1)
        scale = traj.guidance_scale if guidance_scale is None else guidance_scale
        noise_pred = self._predict_noise(self.trainable_module if denoiser is None else denoiser, latents, timesteps,
                                         traj.conditioning, traj.negative_conditioning, scale)
        mean, std = ddim_step_distribution(scheduler, noise_pred, timesteps, latents.float(), traj.eta)
        return StepDistribution(gaussian_log_prob(next_latents.float(), mean, std), mean, std)
