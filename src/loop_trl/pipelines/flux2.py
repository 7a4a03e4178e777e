"""FLUX.2 [klein] as a LOOP policy: LoRA (or full) fine-tuning of its transformer."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import Flux2KleinPipeline

from ..sampling import standard_normal
from .base import Conditioning
from .flow_matching import FlowMatchingPolicy
from .latent_layout import flux2_positions, flux2_unpatchify

__all__ = ["LOOPFlux2KleinPipeline"]


class LOOPFlux2KleinPipeline(FlowMatchingPolicy):
    """Wraps a diffusers ``Flux2KleinPipeline`` (FLUX.2 [klein], base or step-distilled) for RL fine-tuning.

    As ``Flux2KleinPipeline.__call__`` does it: the prompt is three hidden layers of the Qwen3 text
    encoder side by side (``prompt_embeds`` (B, L, 3D)); the latents are 2x2-patchified VAE latents,
    stored as (B, 4C, H/2, W/2) and flattened into tokens for the transformer; the time input is
    ``sigma``; sigmas are ``linspace(1, 1/T, T)`` shifted by the pipeline's empirical ``mu``. The base
    model takes classifier-free guidance with the empty prompt as negative (the pipeline takes no
    negative prompt); a step-distilled checkpoint (``is_distilled`` in its config) takes no guidance, so
    a guidance scale above 1 is refused for it rather than ignored. See
    :class:`~loop_trl.pipelines.diffusers_policy.DiffusersPolicy` for the common arguments.

    Args:
        max_sequence_length: Qwen3 tokens per prompt (the pipeline's default is 512).
        text_encoder_out_layers: the hidden layers stacked as the prompt (the pipeline's default).
    """

    pipeline_class = Flux2KleinPipeline
    tags = ("flux2", "flux2-klein", "flow-matching")

    def __init__(self, pipeline, *, max_sequence_length: int = 512, text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
                 **kwargs):
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        super().__init__(pipeline, **kwargs)

    @property
    def default_lora_target_modules(self) -> tuple[str, ...]:
        """The default of diffusers' ``examples/dreambooth/train_dreambooth_lora_flux2_klein.py``: the attention
        projections of the double-stream blocks, and the fused projections and outputs of every single-stream block."""
        singles = self.pipeline.transformer.config.num_single_layers
        return ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)))

    @property
    def _grid(self) -> int:
        """Height and width of the patch grid (one token per patch)."""
        return self.resolution // (self.pipeline.vae_scale_factor * 2)

    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        if negative_prompt:
            raise ValueError("Flux2KleinPipeline takes no negative prompt (its guidance contrasts with the empty prompt); "
                             "leave negative_prompts empty.")
        if guided and self.pipeline.config.is_distilled:
            raise ValueError("This FLUX.2 [klein] checkpoint is step-distilled (is_distilled in its config) and samples "
                             "without guidance; set the guidance scale to 1.0.")

        def encode(texts):
            embeds, _ = self.pipeline.encode_prompt(texts, device=self.device, max_sequence_length=self.max_sequence_length,
                                                    text_encoder_out_layers=self.text_encoder_out_layers)
            return {"prompt_embeds": embeds.float()}

        return encode(prompts), (encode([""] * len(prompts)) if guided else None)

    def _initial_noise(self, batch: int, generator) -> torch.Tensor:
        channels = self.pipeline.transformer.config.in_channels  # 4x the VAE's: patchified
        return standard_normal((batch, channels, self._grid, self._grid), generator)

    def _sigmas(self, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        scheduler = self.pipeline.scheduler
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = compute_empirical_mu(image_seq_len=latents.shape[-2] * latents.shape[-1], num_steps=num_steps)
        scheduler.set_timesteps(num_steps, device="cpu", sigmas=sigmas, mu=mu)
        return scheduler.sigmas.float().clone()

    def _velocity(self, transformer, latents, sigmas, cond, uncond, guidance_scale):
        scale = self.pipeline.scheduler.config.num_train_timesteps
        b, c, h, w = latents.shape

        def forward(x, s, conditioning):
            embeds = conditioning["prompt_embeds"]
            tokens = x.reshape(x.shape[0], c, h * w).transpose(1, 2)  # the pipeline's _pack_latents
            out = transformer(hidden_states=tokens, timestep=(s * scale) / scale, guidance=None, encoder_hidden_states=embeds,
                              txt_ids=flux2_positions(x.shape[0], length=embeds.shape[1]).to(x.device),
                              img_ids=flux2_positions(x.shape[0], height=h, width=w).to(x.device), return_dict=False)[0]
            return out.transpose(1, 2).reshape(x.shape[0], c, h, w)

        return self._guided(forward, latents, sigmas, cond, uncond, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
        latents = flux2_unpatchify(latents * std + mean)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
