"""JPEG (in)compressibility rewards, from DDPO: the size of an image saved as JPEG."""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["JpegCompressibility", "JpegIncompressibility", "jpeg_size_kb", "to_pil_images"]


def to_pil_images(images: torch.Tensor | np.ndarray | Sequence[Image.Image]) -> list[Image.Image]:
    """Images as (B, 3, H, W) floats in [0, 1] (tensor or array), or PIL images, to RGB PIL images."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        array = torch.as_tensor(images).detach().float().cpu()
        if array.ndim != 4 or array.shape[1] not in (1, 3):
            raise ValueError(f"Expected images of shape (B, 3, H, W), got {tuple(array.shape)}.")
        array = (array.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).convert("RGB") for a in array]
    return [image.convert("RGB") for image in images]


def jpeg_size_kb(image: Image.Image, quality: int = 95) -> float:
    """Size in kilobytes of ``image`` saved as JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibility:
    """Reward = minus the JPEG size in kB: smaller files (simpler images) score higher."""

    sign = -1.0

    def __init__(self, quality: int = 95):
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must lie in [1, 100], got {quality}.")
        self.quality = quality

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        sizes = torch.tensor([jpeg_size_kb(image, self.quality) for image in to_pil_images(images)])
        return self.sign * sizes, {"jpeg_size_kb": sizes}


class JpegIncompressibility(JpegCompressibility):
    """Reward = the JPEG size in kB: larger files (more detail) score higher."""

    sign = 1.0
