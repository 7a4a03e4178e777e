"""ImageReward (Xu et al. 2023): human preference for a prompt-image pair, on transformers' BLIP.

The released scorer (``THUDM/ImageReward``, ``ImageReward.pt``) is BLIP: a ViT-L/16 image encoder
whose patch states a BERT-base text encoder reads through cross-attention; the text encoder's
[CLS] state goes through a 5-layer linear head, and the result is standardised with the mean
and standard deviation of the training set's scores. Range: unbounded, about -2.5 to 2.5;
0 is an average image, higher is preferred.

The ``image-reward`` package (last released in 2023) pins old versions and imports names that
transformers 5 no longer has, so loop-trl implements the scorer on transformers' own BLIP
modules (``BlipVisionModel``, ``BlipTextModel``) and loads the released checkpoint into them:
the text encoder's weights keep their names, the image encoder's are renamed from BLIP's
timm-style layout (:func:`blip_vision_to_transformers`), the head's load as they are. The
checkpoint is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from .base import clip_preprocess, load_state_dict_file, score_in_batches

__all__ = ["ImageReward", "ImageRewardModel", "blip_vision_to_transformers", "image_reward_configs"]

#: standardisation of the head's output, from the released scorer
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
#: CLIP's normalisation, which the released scorer's preprocessing uses
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

_VISION_NAMES = [  # BLIP's ViT (timm layout) -> transformers' BlipVisionModel, applied in order
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def blip_vision_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename BLIP's image-encoder weights (``visual_encoder.`` prefix removed) to ``BlipVisionModel``'s."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _VISION_NAMES:
            new, found = re.subn(pattern, replacement, key)
            if found:
                out[new] = value
                break
        else:
            raise ValueError(f"Unexpected key in BLIP's image encoder: {key!r}.")
    return out


def image_reward_configs(vocab_size: int = 30524):
    """The configs of the released scorer: BLIP's ViT-L/16 at 224 px and BERT-base with cross-attention."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
    text = BlipTextConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=512, encoder_hidden_size=1024,
                          layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True, pad_token_id=0)
    return vision, text


class ImageRewardModel(torch.nn.Module):
    """BLIP image and text encoders and ImageReward's linear head: ``forward`` returns the raw head output (B,)."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        width = text_config.hidden_size
        # the released head (``mlp.layers.*``): linear layers only; the dropouts are inactive when scoring
        self.mlp = torch.nn.Module()
        self.mlp.layers = torch.nn.Sequential(
            torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_states = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_states,
                                 encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return self.mlp.layers(text[:, 0]).squeeze(-1)

    @classmethod
    def from_checkpoint(cls, path: str, vision_config=None, text_config=None) -> "ImageRewardModel":
        """Load the released checkpoint's state dict (``blip.visual_encoder.``, ``blip.text_encoder.``, ``mlp.``)
        from a file or ``"<repo id>/<file name>"`` (see :func:`loop_trl.rewards.base.load_state_dict_file`)."""
        state = load_state_dict_file(path)
        if vision_config is None or text_config is None:
            vision_config, text_config = image_reward_configs()
        model = cls(vision_config, text_config)
        vision = {k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
        own = {f"vision_model.{k}": v for k, v in blip_vision_to_transformers(vision).items()}
        own.update({f"text_encoder.{k[len('blip.text_encoder.'):]}": v for k, v in state.items()
                    if k.startswith("blip.text_encoder.")})
        own.update({k: v for k, v in state.items() if k.startswith("mlp.layers.")})
        own = {k: v for k, v in own.items() if not k.endswith("position_ids")}
        missing, unexpected = model.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{path!r} does not fit ImageReward's architecture: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}.")
        return model


class ImageReward:
    """``reward_function`` with ImageReward: standardised human preference for each image and its prompt.

    Args:
        model: an :class:`ImageRewardModel` with weights, or None to load ``checkpoint``.
        tokenizer: the BERT tokenizer, or None to load ``tokenizer_id`` (``bert-base-uncased``, with
            BLIP's two added tokens ``[DEC]`` and ``[ENC]``).
        checkpoint: a local file, or ``"<repo id>/<file name>"`` on the Hub (default
            ``THUDM/ImageReward/ImageReward.pt``).
        max_length: prompt tokens kept (35, as the released scorer).
        device: where the model runs (default: CUDA if available).
        dtype: the model's dtype.
        batch_size: images scored per forward pass.
    """

    default_checkpoint = "THUDM/ImageReward/ImageReward.pt"

    def __init__(self, model: ImageRewardModel | None = None, tokenizer: Any = None, *, checkpoint: str | None = None,
                 tokenizer_id: str = "bert-base-uncased", max_length: int = 35,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32, batch_size: int = 32):
        if model is None:
            model = ImageRewardModel.from_checkpoint(checkpoint or self.default_checkpoint)
        if tokenizer is None:
            from transformers import BertTokenizer

            tokenizer = BertTokenizer.from_pretrained(tokenizer_id)
            tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device, dtype).requires_grad_(False).eval()
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.image_size = model.vision_model.config.image_size

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        return (score_in_batches(images, prompts, self.batch_size, self._raw_batch) - SCORE_MEAN) / SCORE_STD, {}

    def _raw_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.image_size, CLIP_MEAN, CLIP_STD)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return self.model(pixels.to(next(self.model.parameters()).dtype), tokens["input_ids"].to(self.device),
                          tokens["attention_mask"].to(self.device))
