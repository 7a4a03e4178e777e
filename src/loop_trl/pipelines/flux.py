"""FLUX.1 as a LOOP policy: LoRA (or full) fine-tuning of the guidance-distilled flow transformer."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ..sampling import standard_normal
from .base import Conditioning
from .flow_matching import FlowMatchingPolicy
from .latent_layout import latent_image_ids, pack_latents, unpack_latents

__all__ = ["LOOPFluxPipeline"]

# the default of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py (when --lora_layers is not given)
DEFAULT_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                        "ff_context.net.2")


class LOOPFluxPipeline(FlowMatchingPolicy):
    """Wraps a diffusers ``FluxPipeline`` (FLUX.1 [dev] or [schnell]) for RL fine-tuning of its transformer.

    FLUX.1 [dev] is guidance-distilled: the guidance scale is an input of the transformer (one
    forward pass per sample, no unconditional batch), so negative prompts are not used. Latents
    are stored packed into 2x2 patches, (B, N, 4C), as the transformer reads them. Sigmas are
    FluxPipeline's: ``linspace(1, 1/T, T)`` shifted for the image's token count. See
    :class:`~loop_trl.pipelines.diffusers_policy.DiffusersPolicy` for the common arguments.

    Args:
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 512).
    """

    pipeline_class = FluxPipeline
    default_lora_target_modules = DEFAULT_LORA_TARGETS
    tags = ("flux", "flow-matching")

    def __init__(self, pipeline, *, max_sequence_length: int = 512, **kwargs):
        self.max_sequence_length = max_sequence_length
        super().__init__(pipeline, **kwargs)

    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        if negative_prompt:
            raise ValueError("FLUX.1 takes its guidance as an input of the transformer and uses no negative prompt; "
                             "leave negative_prompts empty.")
        embeds, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=self.device, num_images_per_prompt=1,
                                                        max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}, None

    def _initial_noise(self, batch: int, generator) -> torch.Tensor:
        channels, size = self.pipeline.transformer.config.in_channels // 4, self._latent_size
        noise = standard_normal((batch, channels, size, size), generator)
        return pack_latents(noise)

    def _sigmas(self, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        config = scheduler.config
        mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(num_steps, device="cpu", sigmas=sigmas, mu=mu)
        return scheduler.sigmas.float().clone()

    def _velocity(self, transformer, latents, sigmas, cond, uncond, guidance_scale):
        batch, half = latents.shape[0], self._latent_size // 2
        image_ids = latent_image_ids(half, half, latents.device, latents.dtype)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if self.pipeline.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), device=latents.device)
        with self._autocast():
            return transformer(hidden_states=latents, timestep=sigmas, guidance=guidance,
                               pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                               txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0].float()

    def step_distribution(self, trajectories, step, guidance_scale=None, *, denoiser=None):
        """As :meth:`FlowMatchingPolicy.step_distribution` (and so :meth:`log_prob`), always with the sampling
        guidance: for FLUX.1 it is an input of the transformer, not classifier-free guidance, so scoring
        without it (``train_cfg=False``) would score a different model."""
        return super().step_distribution(trajectories, step, guidance_scale=None, denoiser=denoiser)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae_decode(unpack_latents(latents, self.resolution, self.resolution, self.pipeline.vae_scale_factor))

