"""Qwen-Image as a LOOP policy: LoRA (or full) fine-tuning of its MMDiT transformer."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import QwenImagePipeline

from ..sampling import standard_normal
from .base import Conditioning
from .flow_matching import FlowMatchingPolicy, padded_prompts
from .latent_layout import pack_latents, unpack_latents

__all__ = ["LOOPQwenImagePipeline"]

# the default of diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py (when --lora_layers is not given)
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: the negative prompt Qwen-Image's own examples sample with (its guidance needs one)
DEFAULT_NEGATIVE_PROMPT = " "


class LOOPQwenImagePipeline(FlowMatchingPolicy):
    """Wraps a diffusers ``QwenImagePipeline`` (Qwen-Image, Qwen-Image-2512) for RL fine-tuning of its transformer.

    As ``QwenImagePipeline.__call__`` does it:

    - The prompt is the Qwen2.5-VL encoder's last hidden state of the templated prompt, its template
      tokens dropped; prompts differ in length, so trajectories store them padded to
      ``max_sequence_length`` (``prompt_embeds`` (B, L, D)) with the mask of real tokens
      (``prompt_mask`` (B, L)), which the transformer takes as its attention mask.
    - Latents are packed into 2x2 patches, (B, N, 4C), as for FLUX.1; the time input is ``sigma``;
      sigmas are ``linspace(1, 1/T, T)`` shifted by the image's token count.
    - **Guidance** is the pipeline's ``true_cfg_scale``: ``neg + g (pos - neg)``, then rescaled per token to
      the norm of the conditional prediction. It needs a negative prompt: ``negative_prompts`` of the
      config, else ``" "`` as in Qwen-Image's own examples. The model card samples with
      ``true_cfg_scale`` and that negative prompt. (A guidance-distilled checkpoint, with
      ``guidance_embeds`` in its transformer config, gets the scale as an input instead.)

    See :class:`~loop_trl.pipelines.diffusers_policy.DiffusersPolicy` for the common arguments.

    Args:
        max_sequence_length: prompt tokens kept after the template (the pipeline's default is 1024; prompts
            shorter than this are unaffected, and the stored trajectories are padded to it).
    """

    pipeline_class = QwenImagePipeline
    default_lora_target_modules = DEFAULT_LORA_TARGETS
    tags = ("qwen-image", "flow-matching")

    def __init__(self, pipeline, *, max_sequence_length: int = 512, **kwargs):
        self.max_sequence_length = max_sequence_length
        super().__init__(pipeline, **kwargs)

    @property
    def _distilled(self) -> bool:
        return bool(self.pipeline.transformer.config.guidance_embeds)

    def model_card_info(self) -> dict:
        if self._distilled:
            return super().model_card_info()
        return {**super().model_card_info(), "guidance_argument": "true_cfg_scale",
                "extra_call_kwargs": {"negative_prompt": DEFAULT_NEGATIVE_PROMPT}}

    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        cond = self._padded(*self.pipeline.encode_prompt(list(prompts), device=self.device,
                                                         max_sequence_length=self.max_sequence_length))
        if not guided or self._distilled:
            return cond, None
        negative = [negative_prompt or DEFAULT_NEGATIVE_PROMPT] * len(prompts)
        return cond, self._padded(*self.pipeline.encode_prompt(negative, device=self.device,
                                                               max_sequence_length=self.max_sequence_length))

    def _padded(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> Conditioning:
        """The pipeline's (B, L_batch, D) embeddings, its real tokens first (``mask``; None: all real), as stored."""
        real = list(embeds) if mask is None else [e[m.bool()] for e, m in zip(embeds, mask)]
        return padded_prompts(real, self.max_sequence_length)

    def _initial_noise(self, batch: int, generator) -> torch.Tensor:
        channels, size = self.pipeline.transformer.config.in_channels // 4, self._latent_size
        return pack_latents(standard_normal((batch, channels, size, size), generator))

    def _sigmas(self, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        scheduler = self.pipeline.scheduler
        config = scheduler.config
        mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(num_steps, device="cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.float().clone()

    def _velocity(self, transformer, latents, sigmas, cond, uncond, guidance_scale):
        scale, half = self.pipeline.scheduler.config.num_train_timesteps, self._latent_size // 2
        guidance = torch.full((latents.shape[0],), float(guidance_scale), device=latents.device) if self._distilled else None

        def forward(x, s, c, g):
            return transformer(hidden_states=x, timestep=(s * scale) / scale, guidance=g,
                               encoder_hidden_states=c["prompt_embeds"], encoder_hidden_states_mask=c["prompt_mask"],
                               img_shapes=[[(1, half, half)]] * x.shape[0], return_dict=False)[0].float()

        with self._autocast():
            if uncond is None or guidance_scale <= 1.0:
                return forward(latents, sigmas, cond, guidance)
            both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
            negative, positive = forward(torch.cat([latents, latents]), torch.cat([sigmas, sigmas]), both, None).chunk(2)
        combined = negative + guidance_scale * (positive - negative)
        return combined * (positive.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = unpack_latents(latents, self.resolution, self.resolution, self.pipeline.vae_scale_factor).unsqueeze(2)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        images = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
