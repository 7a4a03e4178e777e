"""Stable Diffusion 1.x / 2.x as a LOOP policy: LoRA (or full) fine-tuning of the UNet."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ..sampling import ddim_step_with_logprob
from .base import DiffusionPolicy, Trajectories

__all__ = ["LOOPStableDiffusionPipeline"]

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LOOPStableDiffusionPipeline(DiffusionPolicy):
    """Wraps a diffusers ``StableDiffusionPipeline`` for RL fine-tuning.

    Sampling always uses a DDIM scheduler built from the pipeline's scheduler config
    (epsilon and v-prediction checkpoints both work). With ``use_lora=True`` a peft LoRA
    adapter is added to the UNet's attention projections and only it is trained; otherwise
    every UNet weight is trained. Trainable weights stay fp32 whatever the inference dtype.

    Args:
        pipeline: a loaded ``StableDiffusionPipeline``. It must not already carry a LoRA
            adapter: fuse it first (``pipeline.fuse_lora(); pipeline.unload_lora_weights()``)
            or pass its folder as ``adapter`` to keep training it.
        use_lora: train a LoRA adapter (True) or the full UNet (False).
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha; the update is scaled by alpha / r. Defaults to ``lora_rank``.
        lora_target_modules: names of the UNet modules that get LoRA layers.
        adapter: a folder or Hub id with a LoRA adapter (``pytorch_lora_weights.safetensors``)
            to start from instead of a new one.
        lora_seed: seed of the new adapter's random initial A matrices (B starts at zero, so the
            adapter starts as a no-op whatever the seed).
    """

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: int | None = None,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        adapter: str | None = None,
        lora_seed: int = 0,
    ):
        if not isinstance(pipeline, StableDiffusionPipeline):
            raise TypeError(f"pipeline must be a diffusers StableDiffusionPipeline, got {type(pipeline).__name__}.")
        if getattr(pipeline.unet, "peft_config", None):
            raise ValueError(
                "The pipeline's UNet already carries a LoRA adapter; training would stack a second one on it. "
                "Fuse it into the base weights first (pipeline.fuse_lora(); pipeline.unload_lora_weights()), "
                "or load the base model and pass the adapter's folder as adapter=... to keep training it."
            )
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}.")
        self.pipeline = pipeline
        self.use_lora = use_lora
        # for model cards: the base model's name, and optional code that loads it as `pipe`
        # (None: StableDiffusionPipeline.from_pretrained(base_model_name))
        self.base_model_name: str | None = pipeline.name_or_path or None
        self.base_model_loader: str | None = None
        self.inference_dtype = torch.float32

        config = dict(pipeline.scheduler.config)
        if config.get("set_alpha_to_one", False):
            logger.warning("set_alpha_to_one=True gives the last DDIM step zero variance; using set_alpha_to_one=False.")
        config["set_alpha_to_one"] = False
        pipeline.scheduler = DDIMScheduler.from_config(config)

        pipeline.vae.requires_grad_(False)
        pipeline.text_encoder.requires_grad_(False)
        pipeline.unet.requires_grad_(not use_lora)
        if use_lora:
            # peft draws the initial A matrices from torch's global RNG; seed them so a run repeats
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(lora_seed)
                pipeline.unet.add_adapter(
                    LoraConfig(
                        r=lora_rank,
                        lora_alpha=lora_alpha or lora_rank,
                        init_lora_weights="gaussian",
                        target_modules=list(lora_target_modules),
                    )
                )
        if adapter is not None:
            self.load_adapter(adapter)
        pipeline.set_progress_bar_config(disable=True)
        # The module used for training forward passes; the trainer swaps in its
        # accelerate-wrapped (e.g. DistributedDataParallel) copy so gradients sync.
        self.denoiser: torch.nn.Module = pipeline.unet

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *, revision: str | None = None, **kwargs) -> "LOOPStableDiffusionPipeline":
        """Load a Stable Diffusion checkpoint (Hub id or folder) in fp32 and wrap it.

        ``kwargs`` are the constructor's (``use_lora``, ``lora_rank``, ``lora_alpha``,
        ``lora_target_modules``, ``adapter``, ``lora_seed``).
        """
        path = str(pretrained_model_name_or_path)
        if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)) and not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(
                f"{path!r} holds a LoRA adapter, not a base model. Pass the base model and adapter={path!r}."
            )
        pipeline = StableDiffusionPipeline.from_pretrained(
            path, revision=revision, safety_checker=None, requires_safety_checker=False
        )
        return cls(pipeline, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    def to(self, device: torch.device | str, inference_dtype: torch.dtype = torch.float32) -> "LOOPStableDiffusionPipeline":
        """Move to ``device``; frozen weights (VAE, text encoder, LoRA's base UNet) in ``inference_dtype``.

        Trainable weights always stay fp32.
        """
        self.inference_dtype = inference_dtype
        for frozen in (self.pipeline.vae, self.pipeline.text_encoder):
            frozen.to(device)
            if frozen.dtype != inference_dtype:
                frozen.to(dtype=inference_dtype)
        self.pipeline.unet.to(device)
        if self.use_lora:
            for param in self.pipeline.unet.parameters():
                param.data = param.data.to(torch.float32 if param.requires_grad else inference_dtype)
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.pipeline.unet.enable_gradient_checkpointing()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.pipeline.unet.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ sampling and scoring
    def _predict_noise(self, unet, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale):
        """The (guided) UNet output for latents (B, C, H, W) at timesteps (B,)."""
        guided = guidance_scale > 1.0 and negative_prompt_embeds is not None
        if guided:
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        autocast = torch.autocast(self.device.type, dtype=self.inference_dtype, enabled=self.inference_dtype != torch.float32)
        with autocast:
            output = unet(latents, timesteps, encoder_hidden_states=prompt_embeds, return_dict=False)[0].float()
        if guided:
            uncond, cond = output.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        return output

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_steps: int,
        guidance_scale: float,
        eta: float,
        generator: torch.Generator,
        negative_prompt: str | None = None,
    ) -> Trajectories:
        """Sample one image per prompt with the stochastic DDIM sampler.

        All noise comes from ``generator`` (a CPU generator), so a seed fixes the result on any device.
        """
        pipe, device = self.pipeline, self.device
        pipe.unet.eval()  # the trainer puts it back in training mode for its passes
        prompts = list(prompts)
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompts, device, 1, guidance_scale > 1.0, [negative_prompt or ""] * len(prompts)
        )
        scheduler = pipe.scheduler
        scheduler.set_timesteps(num_steps, device=device)
        size = pipe.unet.config.sample_size
        shape = (len(prompts), pipe.unet.config.in_channels, size, size)
        latents = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
        all_latents, all_log_probs = [latents], []
        for t in scheduler.timesteps:
            timesteps = t.expand(len(prompts)).to(device)
            noise_pred = self._predict_noise(pipe.unet, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale)
            latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, eta, generator=generator)
            all_latents.append(latents)
            all_log_probs.append(log_prob)
        return Trajectories(
            prompts=prompts,
            prompt_embeds=prompt_embeds.float(),
            negative_prompt_embeds=negative_embeds.float() if negative_embeds is not None else None,
            latents=torch.stack(all_latents, dim=1),
            timesteps=scheduler.timesteps.to(device).unsqueeze(0).expand(len(prompts), -1).clone(),
            log_probs=torch.stack(all_log_probs, dim=1),
            images=self.decode(latents),
            group_ids=torch.arange(len(prompts), device=device),
            guidance_scale=guidance_scale,
            eta=eta,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) to images (B, 3, H, W) in [0, 1], fp32."""
        vae = self.pipeline.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def log_prob(self, trajectories: Trajectories, step: int | torch.Tensor, guidance_scale: float | None = None) -> torch.Tensor:
        """Log-probability (B,) of ``latents[:, step] -> latents[:, step + 1]`` under the current UNet.

        ``step`` is an index into the T denoising steps, one int or a (B,) tensor. Guidance
        defaults to the sampling guidance; pass 1.0 to score with the conditional model only.
        Gradients flow to the trainable weights through ``self.denoiser``.
        """
        traj = trajectories
        scheduler = self.pipeline.scheduler
        if scheduler.num_inference_steps != traj.num_steps:
            scheduler.set_timesteps(traj.num_steps, device=self.device)
        rows = torch.arange(len(traj), device=traj.latents.device)
        step = torch.as_tensor(step, device=traj.latents.device).long().expand(len(traj))
        timesteps = traj.timesteps[rows, step]
        latents, next_latents = traj.latents[rows, step], traj.latents[rows, step + 1]
        scale = traj.guidance_scale if guidance_scale is None else guidance_scale
        noise_pred = self._predict_noise(
            self.denoiser, latents, timesteps, traj.prompt_embeds, traj.negative_prompt_embeds, scale
        )
        _, log_prob = ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, traj.eta, prev_sample=next_latents)
        return log_prob

    # ------------------------------------------------------------------ saving and loading
    def save_adapter(self, save_directory: str) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` in diffusers format (for ``load_lora_weights``).
        Full fine-tuning: the UNet in ``save_directory/unet``."""
        os.makedirs(save_directory, exist_ok=True)
        unet = self.pipeline.unet
        if self.use_lora:
            state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            StableDiffusionPipeline.save_lora_weights(
                save_directory, unet_lora_layers=state_dict, weight_name=LORA_WEIGHT_NAME, safe_serialization=True
            )
        else:
            unet.save_pretrained(os.path.join(save_directory, "unet"), safe_serialization=True)

    def load_adapter(self, directory: str) -> None:
        """Load weights written by :meth:`save_adapter` (a folder or, for LoRA, a Hub id)."""
        unet = self.pipeline.unet
        if not self.use_lora:
            from diffusers import UNet2DConditionModel

            loaded = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", use_safetensors=True)
            unet.load_state_dict(loaded.state_dict())
            return
        state_dict, _ = StableDiffusionPipeline.lora_state_dict(directory, weight_name=LORA_WEIGHT_NAME)
        unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
        if not unet_state:
            raise ValueError(f"No UNet LoRA weights found in {directory!r}.")
        result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(
                f"The adapter in {directory!r} does not fit this UNet's LoRA layers (unexpected keys such as "
                f"{unexpected[0]!r}); check lora_target_modules and lora_rank."
            )
