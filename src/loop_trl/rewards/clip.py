"""Prompt-image agreement from a CLIP model: CLIPScore, PickScore and HPSv2.

All embed the image and its prompt with a (transformers) CLIP model and score the cosine
similarity of the two embeddings; they differ in the model and the scale:

* :class:`CLIPScore` (Hessel et al. 2021): ``w * max(cos, 0)`` with ``w = 2.5``, on
  ``openai/clip-vit-base-patch32`` with the prompt prefixed by "A photo depicts ", as their
  ``clipscore.py``. Range [0, 2.5]; typical matching pairs score 0.6-0.9. Measures how well the
  image matches the text.
* :class:`PickScore` (Kirstain et al. 2023): ``logit_scale * cos`` with the model's learned
  ``logit_scale`` (100), on ``yuvalkirstain/PickScore_v1`` with the
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor, as its model card shows. Range [-100, 100];
  typical images score about 18-24. Trained on human preferences between images of one prompt,
  so its differences within a prompt are what carry meaning.
* :class:`HPSv2` (Wu et al. 2023, Human Preference Score v2.1): the plain cosine of an OpenCLIP
  ViT-H/14 fine-tuned on human preference pairs (HPD v2), ``xswu/HPSv2`` /
  ``HPS_v2.1_compressed.pt``. Range [-1, 1]; typical images about 0.2-0.35. Its checkpoint is in
  OpenCLIP's layout; it is converted to a transformers ``CLIPModel`` on loading
  (:func:`openai_clip_to_transformers`), so open_clip (and torchvision) are not needed. Images are
  letterboxed (longest side to 224, black padding), as HPSv2's own ``img_score.py`` does, not cropped.

Weights load from safetensors, or for HPSv2's checkpoint with ``torch.load(weights_only=True)``;
model and processor may be Hub ids or local folders.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from .base import clip_preprocess, letterbox_preprocess, load_state_dict_file, score_in_batches

__all__ = ["CLIPScore", "HPSv2", "PickScore", "openai_clip_to_transformers"]


class _CLIPSimilarity:
    """Cosine similarity (B,) between each image and its prompt under a CLIP model."""

    default_model: str = ""
    default_processor: str = ""
    #: the image transform of the reward's authors: (images, size, mean, std) -> pixels
    preprocess = staticmethod(clip_preprocess)
    #: text put before each prompt (CLIPScore's "A photo depicts ")
    prefix: str = ""

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
        return score_in_batches(images, prompts, self.batch_size, self._cosine_batch)

    def _cosine_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images.to(self.device), self.image_size, self.mean, self.std)
        tokens = self.tokenizer([self.prefix + p for p in prompts], padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        output = self.model(input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device),
                            pixel_values=pixels.to(next(self.model.parameters()).dtype))
        image_embeds = output.image_embeds.float()
        text_embeds = output.text_embeds.float()
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        return (image_embeds * text_embeds).sum(dim=-1)


class CLIPScore(_CLIPSimilarity):
    """``reward_function`` with CLIPScore, ``w * max(cos(image, prefix + prompt), 0)`` (w = 2.5), in [0, 2.5].

    By default this is Hessel et al.'s definition as their ``clipscore.py`` computes it: ViT-B/32
    (``openai/clip-vit-base-patch32``), the text prefixed with ``"A photo depicts "``, OpenAI CLIP's
    image transform on 8-bit images.

    Args:
        model: a transformers ``CLIPModel``, or None to load ``model_id`` (default
            ``openai/clip-vit-base-patch32``; ``openai/clip-vit-large-patch14`` is a common stronger
            choice, no longer CLIPScore as published).
        processor: its processor, or None to load ``processor_id`` (default: the same as the model).
        w: the scale (2.5 in the CLIPScore paper).
        prefix: put before every prompt (``""`` scores the bare prompt).
        **kwargs: ``device`` (default: CUDA if available), ``dtype`` and ``batch_size`` (images per forward pass).
    """

    default_model = default_processor = "openai/clip-vit-base-patch32"

    def __init__(self, model=None, processor=None, *, w: float = 2.5, prefix: str = "A photo depicts ", **kwargs):
        super().__init__(model, processor, **kwargs)
        self.w, self.prefix = w, prefix

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        cos = self.cosine(images, prompts)
        return self.w * cos.clamp(min=0), {"cosine": cos.tolist()}


class PickScore(_CLIPSimilarity):
    """``reward_function`` with PickScore, ``logit_scale * cos(image, prompt)`` (about 18-24 for typical images).

    Args:
        model: a transformers ``CLIPModel``, or None to load ``model_id`` (default ``yuvalkirstain/PickScore_v1``).
        processor: its processor, or None to load ``processor_id`` (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        device: where the model runs (default: CUDA if available).
        dtype: the model's dtype.
        batch_size: images scored per forward pass.
    """

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        cos = self.cosine(images, prompts)
        return self.model.logit_scale.exp().float().cpu() * cos, {"cosine": cos.tolist()}


_LAYER_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}

_TOWER_NAMES = {
    ("vision_model", "conv1.weight"): "vision_model.embeddings.patch_embedding.weight",
    ("vision_model", "class_embedding"): "vision_model.embeddings.class_embedding",
    ("vision_model", "positional_embedding"): "vision_model.embeddings.position_embedding.weight",
    ("vision_model", "ln_pre.weight"): "vision_model.pre_layrnorm.weight",
    ("vision_model", "ln_pre.bias"): "vision_model.pre_layrnorm.bias",
    ("vision_model", "ln_post.weight"): "vision_model.post_layernorm.weight",
    ("vision_model", "ln_post.bias"): "vision_model.post_layernorm.bias",
    ("vision_model", "proj"): "visual_projection.weight",
    ("text_model", "token_embedding.weight"): "text_model.embeddings.token_embedding.weight",
    ("text_model", "positional_embedding"): "text_model.embeddings.position_embedding.weight",
    ("text_model", "ln_final.weight"): "text_model.final_layer_norm.weight",
    ("text_model", "ln_final.bias"): "text_model.final_layer_norm.bias",
    ("text_model", "text_projection"): "text_projection.weight",
    ("text_model", "logit_scale"): "logit_scale",
}


def openai_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split) a CLIP state dict in OpenAI's / OpenCLIP's layout into transformers' ``CLIPModel`` names.

    The fused attention input projection (``in_proj_weight``, q, k and v stacked) is split into
    ``q_proj``, ``k_proj`` and ``v_proj``; the two output projections, stored as ``x @ proj``, are
    transposed into ``nn.Linear`` weights. OpenCLIP's ``module.`` prefix (from DDP) is dropped and
    its ``attn_mask`` buffer ignored.
    """
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        tower, key = ("vision_model", key[len("visual."):]) if key.startswith("visual.") else ("text_model", key)
        block = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key)
        if block:
            prefix, rest = f"{tower}.encoder.layers.{block.group(1)}.", block.group(2)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight or bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.clone()
                continue
            stem, kind = rest.rsplit(".", 1)
            if stem not in _LAYER_NAMES:
                raise ValueError(f"Unexpected key in a CLIP checkpoint: {block.group(0)!r}.")
            out[f"{prefix}{_LAYER_NAMES[stem]}.{kind}"] = value
            continue
        if key == "attn_mask":
            continue
        if (tower, key) not in _TOWER_NAMES:
            raise ValueError(f"Unexpected key in a CLIP checkpoint: {key!r}.")
        out[_TOWER_NAMES[tower, key]] = value.t().contiguous() if key in ("proj", "text_projection") else value
    return out


class HPSv2(_CLIPSimilarity):
    """``reward_function`` with HPS v2.1: the cosine of image and prompt under the HPSv2 model (about 0.2-0.35).

    Args:
        checkpoint: the OpenCLIP-format checkpoint: a local file, or ``"<repo id>/<file name>"`` on
            the Hub (default ``xswu/HPSv2/HPS_v2.1_compressed.pt``, HPS v2.1). Read with
            ``torch.load(weights_only=True)``: nothing in it is executed.
        config: the transformers ``CLIPConfig`` of its architecture, or a Hub id / folder holding one
            (default: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the OpenCLIP ViT-H/14 HPSv2 fine-tunes).
        processor: the CLIP processor, or None to load ``processor_id`` (default: the same laion repository).
        model: a ``CLIPModel`` already holding HPSv2's weights (then ``checkpoint`` and ``config`` are unused).
        **kwargs: ``device`` (default: CUDA if available), ``dtype`` and ``batch_size`` (images per forward pass).
    """

    default_checkpoint = "xswu/HPSv2/HPS_v2.1_compressed.pt"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    # img_score.py scores with OpenCLIP's light_augmentation transform: longest side to 224, then black padding
    preprocess = staticmethod(letterbox_preprocess)

    def __init__(self, model=None, processor=None, *, checkpoint: str | None = None, config: Any = None, **kwargs):
        if model is None:
            model = self.load_model(checkpoint or self.default_checkpoint, config or self.default_processor)
        super().__init__(model, processor, **kwargs)

    @staticmethod
    def load_model(checkpoint: str, config: Any) -> torch.nn.Module:
        """A transformers ``CLIPModel`` of ``config`` holding the OpenCLIP-format weights of ``checkpoint``."""
        from transformers import CLIPConfig, CLIPModel

        state = load_state_dict_file(checkpoint)
        if not isinstance(config, CLIPConfig):
            config = CLIPConfig.from_pretrained(config)
        model = CLIPModel(config)
        missing, unexpected = model.load_state_dict(openai_clip_to_transformers(state), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{checkpoint!r} does not fit the CLIP architecture of the config: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}.")
        return model

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        cos = self.cosine(images, prompts)
        return cos, {"cosine": cos.tolist()}
