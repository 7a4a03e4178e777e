"""Small layout helpers that diffusers keeps private, written out here so that a diffusers release that
renames or changes one cannot silently break a family. Each one mirrors the named diffusers method;
``tests/test_latent_layout.py`` checks them against the installed diffusers wherever it still has them."""

from __future__ import annotations

import torch

__all__ = ["flux2_patchify", "flux2_positions", "flux2_unpatchify", "latent_image_ids", "pack_latents", "sdxl_add_time_ids",
           "unpack_latents"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches.
    Mirrors diffusers' ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """(B, N, 4C) tokens of an image of ``height`` x ``width`` pixels -> (B, C, H, W) latents.
    Mirrors diffusers' ``FluxPipeline._unpack_latents``."""
    b, _, d = tokens.shape
    h, w = 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))
    patches = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return patches.reshape(b, d // 4, h, w)


def latent_image_ids(height: int, width: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """(height * width, 3) position ids of the packed tokens: (0, row, column) each.
    Mirrors diffusers' ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def sdxl_add_time_ids(unet, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                      target_size: tuple[int, int], text_encoder_projection_dim: int) -> torch.Tensor:
    """SDXL's (1, 6) micro-conditioning ids: original size, crop corner, target size (all (height, width)).
    Mirrors diffusers' ``StableDiffusionXLPipeline._get_add_time_ids``, with its check that the UNet's
    added embedding takes that many numbers."""
    ids = [*original_size, *crop_top_left, *target_size]
    expected = unet.add_embedding.linear_1.in_features
    given = unet.config.addition_time_embed_dim * len(ids) + text_encoder_projection_dim
    if given != expected:
        raise ValueError(f"The UNet's added embedding takes {expected} numbers but the time ids and pooled text "
                         f"embedding give {given}: this UNet does not take SDXL's micro-conditioning as built here "
                         "(an SDXL refiner, for one, takes an aesthetic score instead of the target size).")
    return torch.tensor([ids], dtype=torch.float32)


def flux2_patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, 4C, H/2, W/2): each 2x2 patch's values as channels.
    Mirrors diffusers' ``Flux2Pipeline._patchify_latents``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def flux2_unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`flux2_patchify`. Mirrors diffusers' ``Flux2Pipeline._unpatchify_latents``."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def flux2_positions(batch: int, time: int = 1, height: int = 1, width: int = 1, length: int = 1) -> torch.Tensor:
    """(B, time * height * width * length, 4) integer coordinates (t, h, w, l), the last varying fastest:
    FLUX.2's rotary positions of image tokens (``length=1``) and of text tokens (``time = height = width = 1``).
    Mirrors diffusers' ``Flux2Pipeline._prepare_latent_ids`` and ``_prepare_text_ids``."""
    grid = torch.cartesian_prod(torch.arange(time), torch.arange(height), torch.arange(width), torch.arange(length))
    return grid.unsqueeze(0).expand(batch, -1, -1)
