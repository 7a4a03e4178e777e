"""The LAION aesthetic predictor: CLIP ViT-L/14 image embeddings scored by a small MLP head.

By default both parts come from the Hub by id (``openai/clip-vit-large-patch14`` and the
head in ``trl-lib/ddpo-aesthetic-predictor``, as used by DDPO); each can instead be a local
path or a module you pass in. Weights load only through safetensors or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from .base import clip_preprocess, to_image_tensor

__all__ = ["AestheticMLP", "AestheticReward", "AestheticScorer", "load_head_weights"]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"
DEFAULT_HEAD_FILE = "aesthetic-model.pth"
# CLIP's preprocessing constants, used when a CLIP model is passed in without a processor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: a 5-layer MLP from a CLIP embedding to a 1-10 score."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_head_weights(path_or_repo: str, filename: str = DEFAULT_HEAD_FILE, revision: str | None = None) -> dict:
    """A head's state dict from a file, a folder, or a Hub repository (safetensors or weights-only pickle)."""
    if os.path.isfile(path_or_repo):
        path = path_or_repo
    elif os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, filename)
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(path_or_repo, filename, revision=revision)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticScorer(nn.Module):
    """CLIP image embedding, L2-normalised, then the MLP head. Input: (B, 3, H, W) in [0, 1]."""

    def __init__(self, clip: nn.Module, head: nn.Module, image_size: int = 224,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        self.clip, self.head, self.image_size = clip, head, image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, clip_model: str = DEFAULT_CLIP, head: str = DEFAULT_HEAD_REPO,
                        head_filename: str = DEFAULT_HEAD_FILE) -> "AestheticScorer":
        """Load CLIP (Hub id or folder) and the head (Hub repo, folder or file)."""
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        clip = CLIPVisionModelWithProjection.from_pretrained(clip_model, use_safetensors=True)
        processor = CLIPImageProcessor.from_pretrained(clip_model)
        mlp = AestheticMLP(clip.config.projection_dim)
        mlp.load_state_dict(load_head_weights(head, head_filename))
        crop = processor.crop_size  # a dict, or a SizeDict in newer transformers
        size = int(crop["height"] if isinstance(crop, dict) else getattr(crop, "height", crop))
        return cls(clip, mlp, size, processor.image_mean, processor.image_std)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """OpenAI CLIP's transform on 8-bit images (short side to ``image_size``, bicubic; centre crop; normalise)."""
        return clip_preprocess(images, self.image_size, self.mean.flatten().tolist(), self.std.flatten().tolist())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.clip.parameters())
        pixels = self.preprocess(images.to(param.device, torch.float32)).to(param.dtype)
        embeddings = self.clip(pixel_values=pixels).image_embeds.float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        return self.head.to(embeddings.device, torch.float32)(embeddings).squeeze(-1)


class AestheticReward:
    """``reward_function`` with the LAION aesthetic score (about 1 to 10) of each image.

    Args:
        scorer: an :class:`AestheticScorer`; built with ``AestheticScorer.from_pretrained(clip_model, head)`` if None.
        clip_model: Hub id or folder of a CLIP model with a vision projection.
        head: Hub repository, folder or file with the MLP head weights.
        head_filename: the head's file name inside a repository or folder.
        device: where to run the scorer (default: CUDA if available).
        dtype: the scorer's weights dtype (fp16 halves its memory on GPU).
    """

    def __init__(self, scorer: AestheticScorer | None = None, *, clip_model: str = DEFAULT_CLIP,
                 head: str = DEFAULT_HEAD_REPO, head_filename: str = DEFAULT_HEAD_FILE,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        self.scorer = scorer or AestheticScorer.from_pretrained(clip_model, head, head_filename)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.scorer.clip.to(device, dtype)
        self.scorer.to(device)

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        scores = self.scorer(to_image_tensor(images)).cpu()  # PIL images are accepted as well as tensors
        return scores, {}
