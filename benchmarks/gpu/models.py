"""Full-size model shapes with random weights, built from their published configs (nothing downloaded).

Timings and memory do not depend on trained weights, so the GPU benchmark builds each model of
the family at its real size from the configuration its Hub checkpoint ships: SD 1.5 (UNet, VAE
and CLIP ViT-L text encoder), SD 3.5 Medium (MMDiT transformer, VAE, CLIP-L, CLIP-G and T5-XXL
encoders), FLUX.1-dev (12B transformer, VAE, CLIP-L and T5-XXL), Z-Image (6.2B DiT, VAE and Qwen3-4B), Qwen-Image
(20.4B MMDiT, video VAE and Qwen2.5-VL-7B), FLUX.2 [klein] 4B (its DiT, the FLUX.2 VAE and Qwen3-4B) and Wan 2.1 T2V 1.3B (video DiT, video VAE, UMT5-XXL). The only stand-in is the
tokenizer: the byte-level one of :mod:`loop_trl.testing` (it needs no vocabulary files), which
gives prompts a realistic token count; the text encoders keep their real vocabulary sizes.
"""

from __future__ import annotations

import torch

from loop_trl.testing import TINY_BUILDERS, tiny_clip_tokenizer  # first: loop_trl quiets transformers' import notices
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, DDIMScheduler, Flux2KleinPipeline, Flux2Transformer2DModel, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       UNet2DConditionModel, ZImagePipeline, ZImageTransformer2DModel, AutoencoderKLQwenImage,
                       QwenImagePipeline, QwenImageTransformer2DModel, AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline,
                       WanTransformer3DModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM, Qwen3Model, T5Config, T5EncoderModel, UMT5Config,
                          UMT5EncoderModel)

__all__ = ["MODELS", "POLICY_KWARGS", "build_model"]


def _clip_text(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, act: str, projection: int | None = None):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, hidden_act=act, max_position_embeddings=77,
                            projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5_xxl(tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                                   decoder_start_token_id=0))


def _vae(latent_channels: int, **config) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=latent_channels, sample_size=512, **config)


def build_sd15() -> StableDiffusionPipeline:
    """runwayml/stable-diffusion-v1-5's shapes: 860M-parameter UNet, 84M VAE, 123M CLIP ViT-L/14 text encoder."""
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the other defaults are SD 1.5's
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(4), text_encoder=_clip_text(tokenizer, 768, 12, 12, 3072, "quick_gelu"),
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_sd35_medium() -> StableDiffusion3Pipeline:
    """stabilityai/stable-diffusion-3.5-medium's shapes: 2.5B-parameter MMDiT-X transformer, 16-channel VAE,
    CLIP-L, CLIP-G and T5-XXL text encoders."""
    tokenizer = tiny_clip_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip_text(tokenizer, 768, 12, 12, 3072, "quick_gelu", projection=768), tokenizer=tokenizer,
        text_encoder_2=_clip_text(tokenizer, 1280, 32, 20, 5120, "gelu", projection=1280), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_t5_xxl(tokenizer), tokenizer_3=tiny_clip_tokenizer())


def build_flux_dev() -> FluxPipeline:
    """black-forest-labs/FLUX.1-dev's shapes: 12B-parameter transformer with guidance embedding, 16-channel VAE,
    CLIP-L and T5-XXL text encoders."""
    tokenizer = tiny_clip_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip_text(tokenizer, 768, 12, 12, 3072, "quick_gelu"), tokenizer=tokenizer,
        text_encoder_2=_t5_xxl(tokenizer), tokenizer_2=tiny_clip_tokenizer())


def _qwen3_4b(tokenizer, causal_lm: bool = False):
    """Qwen/Qwen3-4B's shapes (4.0B parameters, input and output embeddings tied)."""
    config = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rope_theta=1_000_000.0, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    return Qwen3ForCausalLM(config) if causal_lm else Qwen3Model(config)


def build_flux2_klein_4b() -> Flux2KleinPipeline:
    """black-forest-labs/FLUX.2-klein-base-4B's shapes (the undistilled model people fine-tune, sampled with
    guidance): a DiT of 5 double- and 20 single-stream blocks of width 3072 (24 heads of 128) reading three
    Qwen3-4B layers (3 x 2560 = 7680 wide), the FLUX.2 VAE (diffusers' AutoencoderKLFlux2 defaults, 32 latent
    channels patchified to 128), Qwen3-4B itself. The dimensions are those MLX and C ports read from the
    release's config files (not checked against the files themselves here: nothing is downloaded)."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    transformer = Flux2Transformer2DModel(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                                          num_attention_heads=24, joint_attention_dim=7680, mlp_ratio=3.0,
                                          guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=scheduler, vae=AutoencoderKLFlux2(), text_encoder=_qwen3_4b(tokenizer, causal_lm=True),
                              tokenizer=tokenizer, transformer=transformer)


def build_z_image() -> ZImagePipeline:
    """Tongyi-MAI/Z-Image's shapes: 6.2B-parameter single-stream DiT (diffusers' ZImageTransformer2DModel defaults
    are the released config), FLUX.1's 16-channel VAE, Qwen3-4B as the text encoder. The tokenizer's chat
    template is a plain one (the stand-in tokenizer has none); the scheduler's shift of 3 is not checked
    against the release (timings do not depend on it)."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    text_encoder = _qwen3_4b(tokenizer)
    return ZImagePipeline(
        transformer=ZImageTransformer2DModel(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder, tokenizer=tokenizer)


def build_qwen_image() -> QwenImagePipeline:
    """Qwen/Qwen-Image's shapes: 20.4B-parameter MMDiT (diffusers' QwenImageTransformer2DModel defaults are the
    released config), its causal video VAE, and Qwen2.5-VL-7B-Instruct as the text encoder (vision tower included,
    as the checkpoint ships it). The stand-in tokenizer leaves room for the pipeline's prompt template."""
    tokenizer = tiny_clip_tokenizer(model_max_length=1100)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1_000_000.0,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192)
    return QwenImagePipeline(transformer=QwenImageTransformer2DModel(), scheduler=scheduler, vae=AutoencoderKLQwenImage(),
                             text_encoder=text_encoder, tokenizer=tokenizer)


def build_wan21_1_3b() -> WanPipeline:
    """Wan-AI/Wan2.1-T2V-1.3B-Diffusers' shapes: the 1.3B video DiT (30 blocks of width 1536), Wan's causal video VAE
    (diffusers' AutoencoderKLWan defaults are the released config), UMT5-XXL's encoder, and the release's UniPC
    scheduler on flow sigmas with flow_shift 3 (its 480p setting)."""
    tokenizer = tiny_clip_tokenizer(model_max_length=512)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                               num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                                               decoder_start_token_id=0))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    with torch.device("cpu"):  # the scheduler's own tables (build_model may be drawing on the meta device)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=AutoencoderKLWan(), transformer=transformer,
                       scheduler=scheduler)


#: model name -> (builder of the full-size pipeline, family of loop_trl.testing.TINY_BUILDERS for --dry_run, pixels)
MODELS = {
    "sd15": (build_sd15, "stable-diffusion", 512),
    "sd35_medium": (build_sd35_medium, "stable-diffusion-3", 512),
    "flux_dev": (build_flux_dev, "flux", 512),
    "z_image": (build_z_image, "z-image", 512),
    "qwen_image": (build_qwen_image, "qwen-image", 512),
    "flux2_klein_4b": (build_flux2_klein_4b, "flux2-klein", 512),
    "wan21_1_3b": (build_wan21_1_3b, "wan", 256),
}
#: what else a model's policy is built with (the video families' frames: Flow-Factory's Wan recipe trains 5; 33 here
#: measures a video of 2 seconds at 16 fps)
POLICY_KWARGS = {"wan21_1_3b": {"num_frames": 33}}


def build_model(name: str, device: torch.device, dtype: torch.dtype, tiny: bool = False, seed: int = 0):
    """The pipeline of ``name``, its weights drawn on ``device`` (fast for billions of parameters) in ``dtype``.

    ``tiny`` builds the family's tiny test pipeline instead (32 px), for the CPU dry run.
    """
    builder, family, _ = MODELS[name]
    if tiny:
        return TINY_BUILDERS[family](seed=seed)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return builder()
    finally:
        torch.set_default_dtype(previous)
