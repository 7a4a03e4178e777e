"""Stable Diffusion XL as a LOOP policy: the SD 1.x policy with SDXL's two text encoders and size conditioning."""

from __future__ import annotations

from diffusers import StableDiffusionXLPipeline

from .base import Conditioning
from .latent_layout import sdxl_add_time_ids
from .stable_diffusion import LOOPStableDiffusionPipeline

__all__ = ["LOOPStableDiffusionXLPipeline"]


class LOOPStableDiffusionXLPipeline(LOOPStableDiffusionPipeline):
    """Wraps a diffusers ``StableDiffusionXLPipeline`` (base model) for RL fine-tuning of its UNet.

    Sampling is DDIM with log-probabilities, as for SD 1.x. The UNet is conditioned on both text
    encoders' states, the pooled projection and the size ids ``(H, W, 0, 0, H, W)`` of the
    sampling resolution, as the pipeline does without cropping; the conditioning is stored in
    the trajectories. An empty negative prompt gives zero embeddings when the checkpoint asks for
    it (``force_zeros_for_empty_prompt``), as in the pipeline. LoRA targets default to the
    attention projections, as diffusers' ``train_text_to_image_lora_sdxl.py``. Under fp16 the VAE
    decodes in fp32 when its config says so (``force_upcast``, SDXL's VAE overflows in fp16).
    """

    pipeline_class = StableDiffusionXLPipeline
    tags = ("stable-diffusion-xl",)
    from_pretrained_kwargs = {}

    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        pipe = self.pipeline
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative)
        size = (self.resolution, self.resolution)
        time_ids = sdxl_add_time_ids(pipe.unet, size, (0, 0), size, pipe.text_encoder_2.config.projection_dim)
        time_ids = time_ids.to(self.device).repeat(len(prompts), 1)
        cond = {"prompt_embeds": embeds.float(), "text_embeds": pooled.float(), "time_ids": time_ids}
        if not guided:
            return cond, None
        return cond, {"prompt_embeds": negative_embeds.float(), "text_embeds": negative_pooled.float(),
                      "time_ids": time_ids.clone()}

    def _unet_kwargs(self, cond: Conditioning) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"],
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}
