"""Stable Diffusion 3 / 3.5 as a LOOP policy: LoRA (or full) fine-tuning of the MMDiT transformer."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from ..sampling import standard_normal
from .base import Conditioning
from .flow_matching import FlowMatchingPolicy

__all__ = ["LOOPStableDiffusion3Pipeline"]

# the default of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (when --lora_layers is not given)
DEFAULT_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


class LOOPStableDiffusion3Pipeline(FlowMatchingPolicy):
    """Wraps a diffusers ``StableDiffusion3Pipeline`` (SD 3 and 3.5) for RL fine-tuning of its transformer.

    Sampling is the flow SDE with log-probabilities over the pipeline's own (shifted) sigma
    schedule; guidance is classifier-free (a doubled batch). The conditioning stored in the
    trajectories is the joint CLIP/T5 sequence (``prompt_embeds``) and the pooled CLIP
    projections (``pooled_prompt_embeds``). See
    :class:`~loop_trl.pipelines.diffusers_policy.DiffusersPolicy` for the common arguments.

    Args:
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 256).
    """

    pipeline_class = StableDiffusion3Pipeline
    default_lora_target_modules = DEFAULT_LORA_TARGETS
    tags = ("sd3", "stable-diffusion-3", "flow-matching")

    def __init__(self, pipeline, *, max_sequence_length: int = 256, **kwargs):
        self.max_sequence_length = max_sequence_length
        super().__init__(pipeline, **kwargs)

    @property
    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor * self.pipeline.transformer.config.patch_size

    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompts, None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative, max_sequence_length=self.max_sequence_length)
        cond = {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}
        if not guided:
            return cond, None
        return cond, {"prompt_embeds": negative_embeds.float(), "pooled_prompt_embeds": negative_pooled.float()}

    def _initial_noise(self, batch: int, generator) -> torch.Tensor:
        size = self.resolution // self.pipeline.vae_scale_factor
        return standard_normal((batch, self.pipeline.transformer.config.in_channels, size, size), generator)

    def _shift_kwargs(self, latents: torch.Tensor) -> dict:
        scheduler_config = self.pipeline.scheduler.config
        if not scheduler_config.get("use_dynamic_shifting", False):
            return {}  # SD3/3.5: the static shift of the scheduler config
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = self.pipeline.transformer.config.patch_size
        seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        return {"mu": calculate_shift(seq_len, scheduler_config.get("base_image_seq_len", 256),
                                      scheduler_config.get("max_image_seq_len", 4096),
                                      scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.16))}

    def _velocity(self, transformer, latents, sigmas, cond, uncond, guidance_scale):
        def forward(x, s, c):
            return transformer(hidden_states=x, timestep=s * self.pipeline.scheduler.config.num_train_timesteps,
                               encoder_hidden_states=c["prompt_embeds"], pooled_projections=c["pooled_prompt_embeds"],
                               return_dict=False)[0]

        return self._guided(forward, latents, sigmas, cond, uncond, guidance_scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae_decode(latents)
