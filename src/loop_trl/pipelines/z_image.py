"""Z-Image (Tongyi-MAI) as a LOOP policy: LoRA (or full) fine-tuning of its single-stream DiT."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ZImagePipeline

from ..sampling import standard_normal
from .base import Conditioning
from .flow_matching import FlowMatchingPolicy, padded_prompts

__all__ = ["LOOPZImagePipeline"]

# the default of diffusers' examples/dreambooth/train_dreambooth_lora_z_image.py (when --lora_layers is not given)
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class LOOPZImagePipeline(FlowMatchingPolicy):
    """Wraps a diffusers ``ZImagePipeline`` (Z-Image, Z-Image-Turbo) for RL fine-tuning of its transformer.

    What differs from the other flow families, each as ``ZImagePipeline.__call__`` does it:

    - The prompt is the Qwen3 encoder's second-to-last hidden state of the chat-templated prompt, one
      sequence per prompt of its own length. Trajectories store them padded to
      ``max_sequence_length`` (``prompt_embeds`` (B, L, D)) with the mask of real tokens
      (``prompt_mask`` (B, L)), and the transformer gets each prompt's real tokens only.
    - The transformer takes a list of (C, 1, h, w) latents and the time ``1 - sigma``, and predicts
      ``x_0 - eps``: the velocity is its negative.
    - **Guidance scale convention.** ``ZImagePipeline`` combines ``pos + w (pos - neg)``, so its
      ``guidance_scale=0`` turns guidance off. loop-trl's ``sample_guidance_scale`` ``g`` keeps the
      meaning it has for every family (``neg + g (pos - neg)``, 1 turns guidance off), which is the
      pipeline's ``w = g - 1``; the model card writes the pipeline's number.
      Z-Image-Turbo is distilled to sample without guidance: train it with ``sample_guidance_scale 1``.
    - Sigmas are the pipeline's: ``linspace(1, 1/T, T)``, shifted by the scheduler (statically, or by
      the image's token count when it shifts dynamically). ``cfg_normalization`` and
      ``cfg_truncation`` are left at the pipeline's defaults (off).

    See :class:`~loop_trl.pipelines.diffusers_policy.DiffusersPolicy` for the common arguments.

    Args:
        max_sequence_length: Qwen3 tokens per prompt (the pipeline's default is 512).
    """

    pipeline_class = ZImagePipeline
    default_lora_target_modules = DEFAULT_LORA_TARGETS
    tags = ("z-image", "flow-matching")
    #: ZImagePipeline's guidance_scale is loop-trl's minus 1 (see the class docstring)
    pipeline_guidance_offset = -1.0

    def __init__(self, pipeline, *, max_sequence_length: int = 512, **kwargs):
        self.max_sequence_length = max_sequence_length
        super().__init__(pipeline, **kwargs)

    @property
    def default_resolution(self) -> int:
        return 1024  # ZImagePipeline's default height and width

    def model_card_info(self) -> dict:
        return {**super().model_card_info(), "pipeline_guidance_offset": self.pipeline_guidance_offset}

    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        # the pipeline rewrites the list it is given (the chat template), so it gets copies
        positive, negative = self.pipeline.encode_prompt(
            list(prompts), device=self.device, do_classifier_free_guidance=guided,
            negative_prompt=[negative_prompt or ""] * len(prompts) if guided else None,
            max_sequence_length=self.max_sequence_length)
        cond = padded_prompts(positive, self.max_sequence_length)
        return cond, (padded_prompts(negative, self.max_sequence_length) if guided else None)

    def _initial_noise(self, batch: int, generator) -> torch.Tensor:
        size = self._latent_size
        return standard_normal((batch, self.pipeline.transformer.config.in_channels, size, size), generator)

    def _sigmas(self, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        scheduler = self.pipeline.scheduler
        config = scheduler.config
        mu = calculate_shift((latents.shape[-2] // 2) * (latents.shape[-1] // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        scheduler.set_timesteps(num_steps, device="cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps).tolist(), mu=mu)
        return scheduler.sigmas.float().clone()

    def _velocity(self, transformer, latents, sigmas, cond, uncond, guidance_scale):
        scale = self.pipeline.scheduler.config.num_train_timesteps
        dtype = self.inference_dtype

        def forward(x, s, c):
            timestep = (scale - s * scale) / scale  # the pipeline's (1000 - t) / 1000, t = 1000 sigma
            captions = [e[m].to(dtype) for e, m in zip(c["prompt_embeds"], c["prompt_mask"])]
            out = transformer(list(x.to(dtype).unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
            return -torch.stack([o.float() for o in out]).squeeze(2)

        return self._guided(forward, latents, sigmas, cond, uncond, guidance_scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae_decode(latents)
