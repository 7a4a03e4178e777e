"""Tiny pipelines of every supported family (SD, SDXL, SD3, FLUX.1, FLUX.2 [dev] and [klein], Qwen-Image, Z-Image, Wan) for tests,
examples and benchmarks.

Nothing here downloads anything: the tokenizer's vocabulary is made from the 256 byte
symbols of CLIP's byte-level BPE, and the models are built from small configs with seeded
random weights. :func:`save_tiny_stable_diffusion` writes a folder that loads with
``StableDiffusionPipeline.from_pretrained``, the path users take with Hub ids.
"""

from __future__ import annotations

import logging
import os
import socket

import torch
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       Flux2KleinPipeline, Flux2Pipeline, QwenImagePipeline, QwenImageTransformer2DModel, Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel, UniPCMultistepScheduler,
                       AutoencoderKLWan, WanPipeline, WanTransformer3DModel, ZImagePipeline, ZImageTransformer2DModel)
from transformers import (CLIPTextConfig, Mistral3Config, Mistral3ForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3Model, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel)

__all__ = ["TINY_BUILDERS", "build_tiny_flux", "build_tiny_flux2_dev", "build_tiny_flux2_klein", "build_tiny_qwen_image",
           "build_tiny_stable_diffusion",
           "build_tiny_stable_diffusion_3",
           "build_tiny_stable_diffusion_xl", "build_tiny_wan", "build_tiny_z_image", "save_tiny_pipeline", "save_tiny_stable_diffusion",
           "tiny_clip_tokenizer"]


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


def _tiny_text_encoder(tokenizer: CLIPTokenizer, hidden: int = 32, with_projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _tiny_t5(tokenizer: CLIPTokenizer, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=64, num_layers=1,
                                   num_heads=2, pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=0))


def _tiny_vae(sample_size: int, latent_channels: int = 4, **config) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=sample_size, **config)


def build_tiny_stable_diffusion_xl(seed: int = 0, sample_size: int = 32) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL-shaped pipeline: two CLIP text encoders, size-conditioned UNet."""
    torch.manual_seed(seed)
    tokenizer, hidden, time_dim = tiny_clip_tokenizer(), 32, 8
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * hidden,  # both encoders' states, concatenated
        attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden,  # six size ids + the pooled projection
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(sample_size), text_encoder=_tiny_text_encoder(tokenizer, hidden), tokenizer=tokenizer,
        text_encoder_2=_tiny_text_encoder(tokenizer, hidden, with_projection=True), tokenizer_2=tiny_clip_tokenizer(),
        unet=unet, scheduler=scheduler)


def build_tiny_stable_diffusion_3(seed: int = 0, sample_size: int = 32) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3-shaped pipeline: MMDiT transformer, two CLIP encoders and a T5 encoder
    (reading the byte-level tokenizer), flow-matching scheduler with SD3's shift of 3."""
    torch.manual_seed(seed)
    tokenizer, hidden = tiny_clip_tokenizer(), 32
    transformer = SD3Transformer2DModel(
        sample_size=sample_size // 2, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=2 * hidden, pooled_projection_dim=2 * hidden)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(sample_size, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_tiny_text_encoder(tokenizer, hidden, with_projection=True), tokenizer=tokenizer,
        text_encoder_2=_tiny_text_encoder(tokenizer, hidden, with_projection=True), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_tiny_t5(tokenizer, 2 * hidden), tokenizer_3=tiny_clip_tokenizer())


def build_tiny_flux(seed: int = 0, sample_size: int = 32) -> FluxPipeline:
    """A randomly initialised FLUX.1-shaped pipeline: guidance-embedding transformer, CLIP and T5 encoders
    (the T5 reads the byte-level tokenizer), flow-matching scheduler with dynamic shifting."""
    torch.manual_seed(seed)
    tokenizer, hidden = tiny_clip_tokenizer(), 32
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=hidden, pooled_projection_dim=hidden, axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_tiny_vae(sample_size, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=_tiny_text_encoder(tokenizer, hidden), tokenizer=tokenizer,
        text_encoder_2=_tiny_t5(tokenizer, hidden), tokenizer_2=tiny_clip_tokenizer())


def _tiny_chat_tokenizer() -> CLIPTokenizer:
    """The byte-level tokenizer with a plain chat template (the Qwen pipelines template their prompts through it)."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    return tokenizer


def _tiny_qwen3_config(tokenizer: CLIPTokenizer, hidden: int, layers: int, heads: int, **config) -> Qwen3Config:
    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=8,
                       max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id, **config)


def build_tiny_flux2_klein(seed: int = 0, sample_size: int = 32) -> Flux2KleinPipeline:
    """A randomly initialised FLUX.2 [klein]-shaped pipeline (the base model, with guidance): a transformer with
    one double- and one single-stream block, a 28-layer Qwen3 (three of its hidden layers make the prompt, as
    the pipeline reads them) on the byte-level tokenizer, the batch-normalised FLUX.2 VAE."""
    torch.manual_seed(seed)
    tokenizer, hidden = _tiny_chat_tokenizer(), 16
    text_encoder = Qwen3ForCausalLM(_tiny_qwen3_config(tokenizer, hidden, layers=28, heads=2, tie_word_embeddings=True))
    vae = _tiny_flux2_vae(sample_size)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * hidden, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def _tiny_flux2_vae(sample_size: int) -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                              sample_size=sample_size)


def build_tiny_flux2_dev(seed: int = 0, sample_size: int = 32) -> Flux2Pipeline:
    """A randomly initialised FLUX.2 [dev]-shaped pipeline: a guidance-embedding transformer with one double- and one
    single-stream block, a 30-layer Mistral 3 (with a one-layer Pixtral vision tower the text path never uses; three
    hidden layers make the prompt, as the pipeline reads them), the batch-normalised FLUX.2 VAE. Its byte-level
    tokenizer's chat template keeps the user's text only (the pipeline's long system message would fill a short
    ``max_sequence_length``)."""
    torch.manual_seed(seed)
    tokenizer, hidden = tiny_clip_tokenizer(model_max_length=512), 16
    tokenizer.chat_template = ("{% for message in messages %}{% if message['role'] == 'user' %}{% for part in message['content'] %}"
                               "{{ part['text'] }}{% endfor %}{% endif %}{% endfor %}")
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=32, patch_size=16),
        spatial_merge_size=1))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * hidden, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                         vae=_tiny_flux2_vae(sample_size), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def build_tiny_qwen_image(seed: int = 0, sample_size: int = 32) -> QwenImagePipeline:
    """A randomly initialised Qwen-Image-shaped pipeline: a two-block MMDiT, a two-layer Qwen2.5-VL (with a one-block
    vision tower the text path never uses) on the byte-level tokenizer, Qwen-Image's causal video VAE with one
    frame, flow-matching scheduler with dynamic shifting."""
    torch.manual_seed(seed)
    tokenizer, hidden = tiny_clip_tokenizer(model_max_length=512), 16  # room for Qwen-Image's prompt template
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=hidden, axes_dims_rope=(4, 6, 6))
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def build_tiny_z_image(seed: int = 0, sample_size: int = 32) -> ZImagePipeline:
    """A randomly initialised Z-Image-shaped pipeline: single-stream DiT with refiner layers, a Qwen3
    text encoder reading the byte-level tokenizer through a plain chat template, flow-matching
    scheduler with Z-Image's static shift of 3."""
    torch.manual_seed(seed)
    tokenizer, hidden = _tiny_chat_tokenizer(), 32
    text_encoder = Qwen3Model(_tiny_qwen3_config(tokenizer, hidden, layers=2, heads=4))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=hidden, axes_dims=[8, 12, 12], axes_lens=[256, 256, 256])
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
                          vae=_tiny_vae(sample_size, shift_factor=0.1159, scaling_factor=0.3611),
                          text_encoder=text_encoder, tokenizer=tokenizer)


def build_tiny_wan(seed: int = 0, sample_size: int = 32, two_experts: bool = False) -> WanPipeline:
    """A randomly initialised Wan-2.1-shaped text-to-video pipeline: a two-block video DiT, a one-layer UMT5
    encoder on the byte-level tokenizer, Wan's causal video VAE (8x spatial, 4x temporal compression), and the
    released checkpoints' scheduler, UniPC on flow sigmas with ``flow_shift`` 3 (the 480p setting).

    ``two_experts``: Wan 2.2 A14B's layout, a second DiT (``transformer_2``, its own weights) for the timesteps
    under ``boundary_ratio`` 0.875 x 1000 (the released A14B's text-to-video boundary)."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(model_max_length=512)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                               num_heads=2, pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=0))
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0])
    experts = [WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                     qk_norm="rms_norm_across_heads", rope_max_seq_len=32) for _ in range(1 + two_experts)]
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    second = dict(transformer_2=experts[1], boundary_ratio=0.875) if two_experts else {}
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=experts[0], scheduler=scheduler,
                       **second)


#: family name -> builder of a tiny pipeline of that family (all 32 px images; Wan: 32 px frames)
TINY_BUILDERS = {
    "stable-diffusion": build_tiny_stable_diffusion,
    "stable-diffusion-xl": build_tiny_stable_diffusion_xl,
    "stable-diffusion-3": build_tiny_stable_diffusion_3,
    "flux": build_tiny_flux,
    "flux2-klein": build_tiny_flux2_klein,
    "flux2-dev": build_tiny_flux2_dev,
    "qwen-image": build_tiny_qwen_image,
    "z-image": build_tiny_z_image,
    "wan": build_tiny_wan,
}


def save_tiny_pipeline(path: str | os.PathLike, family: str = "stable-diffusion", **kwargs) -> str:
    """Build a tiny pipeline of ``family`` (a key of :data:`TINY_BUILDERS`) and save it to ``path``;
    it loads with the family's ``from_pretrained`` or :func:`loop_trl.load_policy`."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"family must be one of {sorted(TINY_BUILDERS)}, got {family!r}.")
    TINY_BUILDERS[family](**kwargs).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def free_port() -> int:
    """A loopback TCP port that is free now, for a test that launches a process group: fixed or
    pid-derived ports can collide when tests run side by side (`pytest -n 2`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_tiny_stable_diffusion(path: str | os.PathLike, **kwargs) -> str:
    """Build a tiny SD pipeline (see :func:`build_tiny_stable_diffusion`) and save it to ``path``."""
    return save_tiny_pipeline(path, "stable-diffusion", **kwargs)


def main(argv: list[str] | None = None) -> None:
    """``python -m loop_trl.testing FOLDER``: write a tiny pipeline to try the examples offline."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random pipeline of one model family to FOLDER.")
    parser.add_argument("folder", help="where to save the pipeline (loads with the family's from_pretrained)")
    parser.add_argument("--family", default="stable-diffusion", choices=sorted(TINY_BUILDERS),
                        help="model family of the pipeline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"],
                        help="stable-diffusion only: what the UNet predicts")
    args = parser.parse_args(argv)
    extra = {"prediction_type": args.prediction_type} if args.family == "stable-diffusion" else {}
    path = save_tiny_pipeline(args.folder, args.family, seed=args.seed, **extra)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(__name__).info(f"Tiny pipeline written to {path}")


if __name__ == "__main__":
    main()
