"""Prompt-image agreement from a CLIP model: CLIPScore and PickScore.

Both embed the image and its prompt with a (transformers) CLIP model and score the cosine
similarity of the two embeddings; they differ in the model and the scale:

* :class:`CLIPScore` (Hessel et al. 2021): ``w * max(cos, 0)`` with ``w = 2.5``, on
  ``openai/clip-vit-large-patch14`` by default. Range [0, 2.5]; typical matching pairs score
  0.6-0.9. Measures how well the image matches the text.
* :class:`PickScore` (Kirstain et al. 2023): ``logit_scale * cos`` with the model's learned
  ``logit_scale`` (100), on ``yuvalkirstain/PickScore_v1`` with the
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor, as its model card shows. Range [-100, 100];
  typical images score about 18-24. Trained on human preferences between images of one prompt,
  so its differences within a prompt are what carry meaning.

Weights load from safetensors only; model and processor may be Hub ids or local folders.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import clip_preprocess, to_image_tensor

__all__ = ["CLIPScore", "PickScore"]


class _CLIPSimilarity:
    """Cosine similarity (B,) between each image and its prompt under a CLIP model."""

    default_model: str = ""
    default_processor: str = ""

    def __init__(self, model: torch.nn.Module | None = None, processor: Any = None, *, model_id: str | None = None,
                 processor_id: str | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 32):
        if model is None or processor is None:
            from transformers import AutoProcessor, CLIPModel

            model = model or CLIPModel.from_pretrained(model_id or self.default_model, use_safetensors=True)
            processor = processor or AutoProcessor.from_pretrained(processor_id or self.default_processor)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device, dtype).requires_grad_(False).eval()
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        crop = image_processor.crop_size  # a dict, or a SizeDict in newer transformers
        self.image_size = int(crop["height"] if isinstance(crop, dict) else getattr(crop, "height", crop))
        self.mean, self.std = list(image_processor.image_mean), list(image_processor.image_std)
        self.batch_size = batch_size

    @torch.no_grad()
    def cosine(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        images = to_image_tensor(images)
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} images for {len(prompts)} prompts; the reward scores each image with its prompt.")
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, len(prompts), self.batch_size):
            pixels = clip_preprocess(images[start:start + self.batch_size].to(self.device), self.image_size, self.mean, self.std)
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
            output = self.model(input_ids=tokens["input_ids"].to(self.device),
                                attention_mask=tokens["attention_mask"].to(self.device), pixel_values=pixels.to(dtype))
            image_embeds = output.image_embeds.float()
            text_embeds = output.text_embeds.float()
            image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
            text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
            out.append((image_embeds * text_embeds).sum(dim=-1).cpu())
        return torch.cat(out)


class CLIPScore(_CLIPSimilarity):
    """``reward_function`` with CLIPScore, ``w * max(cos(image, prompt), 0)`` (w = 2.5), in [0, 2.5].

    Args:
        model, processor: a transformers ``CLIPModel`` and its processor, or None to load
            ``model_id`` / ``processor_id`` (default ``openai/clip-vit-large-patch14`` for both).
        w: the scale (2.5 in the CLIPScore paper).
        device, dtype, batch_size: where and how the model runs (default: CUDA if available).
    """

    default_model = default_processor = "openai/clip-vit-large-patch14"

    def __init__(self, model=None, processor=None, *, w: float = 2.5, **kwargs):
        super().__init__(model, processor, **kwargs)
        self.w = w

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        cos = self.cosine(images, prompts)
        return self.w * cos.clamp(min=0), {"cosine": cos.tolist()}


class PickScore(_CLIPSimilarity):
    """``reward_function`` with PickScore, ``logit_scale * cos(image, prompt)`` (about 18-24 for typical images).

    Args:
        model, processor: a transformers ``CLIPModel`` and its processor, or None to load
            ``model_id`` (default ``yuvalkirstain/PickScore_v1``) and ``processor_id`` (default
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        device, dtype, batch_size: where and how the model runs (default: CUDA if available).
    """

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        cos = self.cosine(images, prompts)
        return self.model.logit_scale.exp().float().cpu() * cos, {"cosine": cos.tolist()}
