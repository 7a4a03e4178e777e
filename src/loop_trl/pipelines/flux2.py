"""FLUX.2 as LOOP policies: [klein] (Qwen3 text encoder, classifier-free guidance) and [dev] (Mistral text encoder,
guidance-distilled), LoRA (or full) fine-tuning of their common transformer.

The two pipelines share the transformer, the VAE, the latent layout and the sigma schedule: those pieces are
the module's small functions below, each as both pipelines' ``__call__`` does it; each policy class adds its
own prompt encoding and guidance.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from ..sampling import standard_normal
from .base import Conditioning
from .flow_matching import FlowMatchingPolicy
from .latent_layout import flux2_positions, flux2_unpatchify

__all__ = ["LOOPFlux2KleinPipeline", "LOOPFlux2Pipeline"]


def flux2_sigmas(scheduler, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
    """The T+1 noise levels: ``linspace(1, 1/T, T)`` shifted by the empirical ``mu`` of the token count (B, 4C, h, w)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
    mu = compute_empirical_mu(image_seq_len=latents.shape[-2] * latents.shape[-1], num_steps=num_steps)
    scheduler.set_timesteps(num_steps, device="cpu", sigmas=sigmas, mu=mu)
    return scheduler.sigmas.float().clone()


def flux2_forward(transformer, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                  guidance: torch.Tensor | None) -> torch.Tensor:
    """One transformer call on patchified latents (B, 4C, h, w): flattened into tokens (the pipelines' ``_pack_latents``),
    with the pipelines' text and image positions; the prediction back in the latents' layout."""
    b, c, h, w = latents.shape
    tokens = latents.reshape(b, c, h * w).transpose(1, 2)
    out = transformer(hidden_states=tokens, timestep=timestep, guidance=guidance, encoder_hidden_states=embeds,
                      txt_ids=flux2_positions(b, length=embeds.shape[1]).to(latents.device),
                      img_ids=flux2_positions(b, height=h, width=w).to(latents.device), return_dict=False)[0]
    return out.transpose(1, 2).reshape(b, c, h, w)


@torch.no_grad()
def flux2_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Patchified, batch-normalised latents (B, 4C, h, w) to images in [0, 1]: the VAE's batch-norm statistics undone,
    unpatchified, decoded."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    images = vae.decode(flux2_unpatchify(latents * std + mean).to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


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
        return flux2_sigmas(self.pipeline.scheduler, num_steps, latents)

    def _velocity(self, transformer, latents, sigmas, cond, uncond, guidance_scale):
        scale = self.pipeline.scheduler.config.num_train_timesteps

        def forward(x, s, conditioning):
            return flux2_forward(transformer, x, (s * scale) / scale, conditioning["prompt_embeds"], None)

        return self._guided(forward, latents, sigmas, cond, uncond, guidance_scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return flux2_decode(self.pipeline.vae, latents)


class LOOPFlux2Pipeline(FlowMatchingPolicy):
    """Wraps a diffusers ``Flux2Pipeline`` (FLUX.2 [dev]) for RL fine-tuning of its transformer.

    As ``Flux2Pipeline.__call__`` does it: the prompt, with the pipeline's system message, goes through the
    Mistral Small 3.1 text encoder, and three of its hidden layers side by side are the prompt embedding
    (``prompt_embeds`` (B, L, 3D)); FLUX.2 [dev] is guidance-distilled, so the guidance scale is an input of
    the transformer (one pass per step, no unconditional branch, no negative prompt; trajectories are
    scored with the guidance they were sampled with); the latents, sigmas and decoding are FLUX.2 [klein]'s.
    See :class:`~loop_trl.pipelines.diffusers_policy.DiffusersPolicy` for the common arguments.

    Args:
        max_sequence_length: Mistral tokens per prompt, system message included (the pipeline's default is 512).
        text_encoder_out_layers: the hidden layers stacked as the prompt (the pipeline's default).
    """

    pipeline_class = Flux2Pipeline
    # the default of diffusers' examples/dreambooth/train_dreambooth_lora_flux2.py (when --lora_layers is not given)
    default_lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    tags = ("flux2", "flux2-dev", "flow-matching")

    def __init__(self, pipeline, *, max_sequence_length: int = 512, text_encoder_out_layers: tuple[int, ...] = (10, 20, 30),
                 **kwargs):
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        super().__init__(pipeline, **kwargs)

    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        if negative_prompt:
            raise ValueError("FLUX.2 [dev] is guidance-distilled and takes no negative prompt; leave negative_prompts empty.")
        embeds, _ = self.pipeline.encode_prompt(list(prompts), device=self.device, max_sequence_length=self.max_sequence_length,
                                                text_encoder_out_layers=self.text_encoder_out_layers)
        return {"prompt_embeds": embeds.float()}, None  # the guidance is embedded: no unconditional branch

    def _initial_noise(self, batch: int, generator) -> torch.Tensor:
        grid = self.resolution // (self.pipeline.vae_scale_factor * 2)
        return standard_normal((batch, self.pipeline.transformer.config.in_channels, grid, grid), generator)

    def _sigmas(self, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
        return flux2_sigmas(self.pipeline.scheduler, num_steps, latents)

    def _velocity(self, transformer, latents, sigmas, cond, uncond, guidance_scale):
        scale = self.pipeline.scheduler.config.num_train_timesteps
        guidance = torch.full((latents.shape[0],), float(guidance_scale), device=latents.device)
        with self._autocast():
            return flux2_forward(transformer, latents, (sigmas * scale) / scale, cond["prompt_embeds"], guidance).float()

    def step_distribution(self, trajectories, step, guidance_scale=None, *, denoiser=None):
        """As :meth:`FlowMatchingPolicy.step_distribution`, always with the sampling guidance: it is an input of the
        transformer, not classifier-free guidance, so scoring without it (``train_cfg=False``) would score another model."""
        return super().step_distribution(trajectories, step, guidance_scale=None, denoiser=denoiser)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return flux2_decode(self.pipeline.vae, latents)
