"""loop-trl's copies of diffusers' private layout helpers against the installed diffusers' own, on
non-square shapes (skipped one by one once a diffusers release no longer has the method)."""

import pytest
import torch
from diffusers import Flux2KleinPipeline, FluxPipeline, QwenImagePipeline, StableDiffusionXLPipeline

from loop_trl.pipelines.latent_layout import (flux2_patchify, flux2_positions, flux2_unpatchify, latent_image_ids,
                                             pack_latents, sdxl_add_time_ids, unpack_latents)
from loop_trl.testing import build_tiny_stable_diffusion_xl


def diffusers_has(cls, name):
    if not hasattr(cls, name):
        pytest.skip(f"this diffusers has no {cls.__name__}.{name}: the copy stands on its own")
    return getattr(cls, name)


@pytest.mark.parametrize("channels, height, width", [(16, 8, 12), (4, 6, 2), (16, 32, 16)])
def test_pack_and_unpack_match_flux_pipeline(channels, height, width):
    latents = torch.randn(3, channels, height, width, generator=torch.Generator().manual_seed(0))
    theirs = diffusers_has(FluxPipeline, "_pack_latents")(latents, 3, channels, height, width)
    torch.testing.assert_close(pack_latents(latents), theirs, rtol=0, atol=0)
    scale = 8  # pixels per latent
    unpacked = diffusers_has(FluxPipeline, "_unpack_latents")(theirs, height * scale, width * scale, scale)
    torch.testing.assert_close(unpack_latents(theirs, height * scale, width * scale, scale), unpacked, rtol=0, atol=0)
    torch.testing.assert_close(unpacked, latents, rtol=0, atol=0)  # and the round trip is exact


def test_qwen_image_packs_as_flux_does():
    """LOOPQwenImagePipeline reuses the FLUX.1 packing: QwenImagePipeline's own (its unpacking adds a frames axis)."""
    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(2))
    theirs = diffusers_has(QwenImagePipeline, "_pack_latents")(latents, 2, 4, 6, 10)
    torch.testing.assert_close(pack_latents(latents), theirs, rtol=0, atol=0)
    unpacked = diffusers_has(QwenImagePipeline, "_unpack_latents")(theirs, 6 * 8, 10 * 8, 8)
    torch.testing.assert_close(unpack_latents(theirs, 6 * 8, 10 * 8, 8), unpacked[:, :, 0], rtol=0, atol=0)


@pytest.mark.parametrize("height, width", [(4, 6), (8, 8), (1, 3)])
def test_latent_image_ids_match_flux_pipeline(height, width):
    theirs = diffusers_has(FluxPipeline, "_prepare_latent_image_ids")(2, height, width, "cpu", torch.bfloat16)
    mine = latent_image_ids(height, width, "cpu", torch.bfloat16)
    assert mine.dtype == theirs.dtype
    torch.testing.assert_close(mine, theirs.reshape(mine.shape), rtol=0, atol=0)


@pytest.mark.parametrize("channels, height, width", [(4, 8, 12), (16, 6, 2)])
def test_flux2_patches_and_positions_match_its_pipeline(channels, height, width):
    latents = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(1))
    patches = diffusers_has(Flux2KleinPipeline, "_patchify_latents")(latents)
    torch.testing.assert_close(flux2_patchify(latents), patches, rtol=0, atol=0)
    torch.testing.assert_close(flux2_unpatchify(patches), diffusers_has(Flux2KleinPipeline, "_unpatchify_latents")(patches),
                               rtol=0, atol=0)
    torch.testing.assert_close(flux2_unpatchify(patches), latents, rtol=0, atol=0)
    image_ids = diffusers_has(Flux2KleinPipeline, "_prepare_latent_ids")(patches)
    torch.testing.assert_close(flux2_positions(2, height=height // 2, width=width // 2), image_ids, rtol=0, atol=0)
    text = torch.zeros(3, 7, 5)
    text_ids = diffusers_has(Flux2KleinPipeline, "_prepare_text_ids")(text)
    torch.testing.assert_close(flux2_positions(3, length=7), text_ids, rtol=0, atol=0)
    # its packing is a plain flattening of the patch grid, which the position ids above index row by row
    packed = diffusers_has(Flux2KleinPipeline, "_pack_latents")(patches)
    torch.testing.assert_close(packed, patches.flatten(2).transpose(1, 2), rtol=0, atol=0)
    unpacked = diffusers_has(Flux2KleinPipeline, "_unpack_latents_with_ids")(packed, image_ids, height // 2, width // 2)
    torch.testing.assert_close(unpacked, patches, rtol=0, atol=0)


def test_sdxl_time_ids_match_the_pipeline_and_refuse_a_mismatched_unet():
    pipe = build_tiny_stable_diffusion_xl()
    dim = pipe.text_encoder_2.config.projection_dim
    get_ids = diffusers_has(StableDiffusionXLPipeline, "_get_add_time_ids")
    theirs = get_ids(pipe, (96, 64), (8, 4), (64, 32), dtype=torch.float32, text_encoder_projection_dim=dim)
    torch.testing.assert_close(sdxl_add_time_ids(pipe.unet, (96, 64), (8, 4), (64, 32), dim), theirs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="added embedding takes"):
        sdxl_add_time_ids(pipe.unet, (96, 64), (8, 4), (64, 32), dim + 1)
