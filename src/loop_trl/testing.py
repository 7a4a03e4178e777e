"""Tiny Stable-Diffusion-shaped pipelines for tests, examples and benchmarks.

Nothing here downloads anything: the tokenizer's vocabulary is made from the 256 byte
symbols of CLIP's byte-level BPE, and the models are built from small configs with seeded
random weights. :func:`save_tiny_stable_diffusion` writes a folder that loads with
``StableDiffusionPipeline.from_pretrained``, the path users take with Hub ids.
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = ["build_tiny_stable_diffusion", "save_tiny_stable_diffusion", "tiny_clip_tokenizer"]


def _bytes_to_unicode() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges): 512 byte symbols plus the two specials."""
    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_tiny_stable_diffusion(
    seed: int = 0,
    sample_size: int = 32,
    prediction_type: str = "epsilon",
    block_out_channels: tuple[int, ...] = (32, 64),
) -> StableDiffusionPipeline:
    """A randomly initialised Stable-Diffusion-shaped pipeline, small enough for CPU tests.

    Images are ``sample_size`` pixels square; the VAE downsamples by 2 per extra block.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    hidden = 32
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2 ** (len(block_out_channels) - 1),
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(block_out_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_stable_diffusion(path: str | os.PathLike, **kwargs) -> str:
    """Build a tiny pipeline (see :func:`build_tiny_stable_diffusion`) and save it to ``path``."""
    pipeline = build_tiny_stable_diffusion(**kwargs)
    pipeline.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    """``python -m loop_trl.testing FOLDER``: write a tiny pipeline to try the examples offline."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random Stable-Diffusion-shaped pipeline to FOLDER.")
    parser.add_argument("folder", help="where to save the pipeline (loads with StableDiffusionPipeline.from_pretrained)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    args = parser.parse_args(argv)
    path = save_tiny_stable_diffusion(args.folder, seed=args.seed, prediction_type=args.prediction_type)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(__name__).info(f"Tiny pipeline written to {path}")


if __name__ == "__main__":
    main()
