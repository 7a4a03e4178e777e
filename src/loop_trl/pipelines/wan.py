"""Wan 2.1 / 2.2 text-to-video as a LOOP policy: LoRA (or full) fine-tuning of its video DiT."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from ..sampling import standard_normal
from .base import Conditioning
from .flow_matching import FlowMatchingPolicy

__all__ = ["LOOPWanPipeline"]

# Flow-Factory's default for Wan (its examples/grpo/lora/wan21/t2v.yaml, target_modules "default"): the attention
# projections, self- and cross-attention alike
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class LOOPWanPipeline(FlowMatchingPolicy):
    """Wraps a diffusers ``WanPipeline`` (Wan 2.1 T2V 1.3B/14B, Wan 2.2 TI2V-5B) for RL fine-tuning of its transformer.

    A sample is a video: the trajectories' latents are (B, T+1, C, F', h, w) with F' latent frames, and
    ``images`` holds the decoded frames, (B, F, 3, H, W) in [0, 1]. Rewards therefore receive videos:
    wrap an image reward in :class:`loop_trl.rewards.PerFrameReward` (the mean over frames), or give a
    video reward (``accepts_video = True``); the trainer refuses an image reward at construction.

    What differs from the image flow families, each as ``WanPipeline.__call__`` does it:

    - The prompt is UMT5's last hidden state, padded with zeros to ``max_sequence_length`` tokens (the
      pipeline's own padding, which the transformer attends to); the negative prompt defaults to ``""``.
    - The released checkpoints sample with ``UniPCMultistepScheduler`` on flow sigmas (``flow_shift``), a
      multistep solver that has no per-step Gaussian. The policy samples the same shifted schedule with
      ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` steps (the stochastic flow sampler, and its
      deterministic Euler limit); the model card sets that scheduler, so plain diffusers deploys the
      sampler that was trained.
    - Wan 2.2 TI2V-5B (``expand_timesteps``) takes one timestep per latent token; in text-to-video they
      are all the step's timestep.
    - Wan 2.2 A14B has two experts: ``transformer`` denoises the steps whose timestep is at least
      ``boundary_ratio * num_train_timesteps`` (high noise), ``transformer_2`` the rest. A run trains one
      of them (``expert``), as people train A14B's LoRAs: the policy samples with both, the other expert's
      steps are deterministic (Euler) and never trained, so ``train_timestep_start``/``stop`` must select
      the trained expert's steps (the trainer names the range). The saved adapter is diffusers' format for
      that expert: ``pipe.load_lora_weights(folder)`` for the high-noise one, with
      ``load_into_transformer_2=True`` for the low-noise one (the model card says which).

    See :class:`~loop_trl.pipelines.diffusers_policy.DiffusersPolicy` for the common arguments; ``resolution``
    (square) is overridden by ``height`` and ``width``.

    Args:
        num_frames: frames per video, ``4k + 1`` (the pipeline's default is 81; Flow-Factory's Wan recipe
            trains 5).
        height, width: frame size in pixels (default: ``resolution`` if given, else the pipeline's 480 x 832).
        max_sequence_length: UMT5 tokens per prompt (the pipeline's default is 226).
        expert: Wan 2.2 A14B only, and required there: ``"high_noise"`` (``transformer``) or ``"low_noise"``
            (``transformer_2``), the expert this run trains.
    """

    pipeline_class = WanPipeline
    default_lora_target_modules = DEFAULT_LORA_TARGETS
    tags = ("wan", "text-to-video", "flow-matching")
    produces_video = True

    def __init__(self, pipeline, *, num_frames: int = 81, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 226, expert: str | None = None, **kwargs):
        if isinstance(pipeline, WanPipeline):
            self._check_experts(pipeline, expert)
            self.module_name = {None: "transformer", "high_noise": "transformer", "low_noise": "transformer_2"}[expert]
            temporal = pipeline.vae_scale_factor_temporal
            if num_frames < 1 or (num_frames - 1) % temporal:
                raise ValueError(f"num_frames must be {temporal}k + 1 for this VAE (1, {temporal + 1}, {2 * temporal + 1}, "
                                 f"...), got {num_frames}.")
        self.num_frames, self.max_sequence_length = num_frames, max_sequence_length
        resolution = kwargs.get("resolution")
        self.height, self.width = height or resolution or 480, width or resolution or 832
        super().__init__(pipeline, **kwargs)
        for name, side in (("height", self.height), ("width", self.width)):
            if side < 1 or side % self.resolution_multiple:
                raise ValueError(f"{name} must be a positive multiple of {self.resolution_multiple} for "
                                 f"{type(self).__name__}, got {side}.")

    @staticmethod
    def _check_experts(pipeline: WanPipeline, expert: str | None) -> None:
        two = pipeline.transformer_2 is not None or pipeline.config.boundary_ratio is not None
        if pipeline.transformer is None:
            raise ValueError("This Wan pipeline has no transformer (the high-noise expert); load the whole checkpoint.")
        if two and (pipeline.transformer_2 is None or pipeline.config.boundary_ratio is None):
            raise ValueError("This Wan pipeline has half of Wan 2.2 A14B's two experts (transformer_2 and boundary_ratio "
                             "go together); load the whole checkpoint.")
        if two and expert not in ("high_noise", "low_noise"):
            raise ValueError(f"This Wan pipeline has two experts (Wan 2.2 A14B): pass expert='high_noise' to train "
                             f"transformer (the steps with timestep >= boundary_ratio {pipeline.config.boundary_ratio} x "
                             f"num_train_timesteps) or expert='low_noise' to train transformer_2 (the rest); got {expert!r}.")
        if not two and expert is not None:
            raise ValueError(f"expert={expert!r} is for Wan 2.2 A14B's two experts; this pipeline has one transformer.")

    @property
    def adapter_prefix(self) -> str:
        return "transformer"  # diffusers saves either expert's LoRA as the transformer's (load_into_transformer_2 picks)

    def _boundary(self) -> float | None:
        """The timestep from which on (downwards) transformer_2 denoises, or None for one expert."""
        ratio = self.pipeline.config.boundary_ratio
        return None if ratio is None else ratio * self.pipeline.scheduler.config.num_train_timesteps

    def _trains_step(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Which of ``timesteps`` the trained expert denoises."""
        boundary = self._boundary()
        if boundary is None:
            return torch.ones_like(timesteps, dtype=torch.bool)
        high = timesteps >= boundary
        return high if self.module_name == "transformer" else ~high

    def zero_variance_steps(self, num_steps: int) -> list[int]:
        """With two experts, the steps of the one not trained (sampled with Euler steps, never trained)."""
        if self._boundary() is None:
            return super().zero_variance_steps(num_steps)
        timesteps = self._sigmas(num_steps, None)[:-1] * self.pipeline.scheduler.config.num_train_timesteps
        other = (~self._trains_step(timesteps)).nonzero().flatten().tolist()
        return sorted(set(other) | set(super().zero_variance_steps(num_steps)))

    @property
    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor_spatial * self.pipeline.transformer.config.patch_size[1]

    @property
    def default_resolution(self) -> int:
        return self.height

    def _setup_scheduler(self) -> None:
        scheduler = self.pipeline.scheduler
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return
        if not (scheduler.config.get("use_flow_sigmas") and scheduler.config.get("flow_shift") is not None):
            raise TypeError(f"LOOPWanPipeline needs a flow-matching scheduler: FlowMatchEulerDiscreteScheduler, or the "
                            f"released checkpoints' UniPCMultistepScheduler with use_flow_sigmas; got "
                            f"{type(scheduler).__name__} without flow sigmas.")
        # what a user sets to sample as trained: FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **these)
        self.scheduler_overrides = {"shift": float(scheduler.config.flow_shift)}
        self.pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, **self.scheduler_overrides)

    def model_card_info(self) -> dict:
        info = {**super().model_card_info(), "video": True,
                "extra_call_kwargs": {"num_frames": self.num_frames, "height": self.height, "width": self.width}}
        if self.module_name == "transformer_2":
            info["lora_load_kwargs"] = {"load_into_transformer_2": True}
        return info

    def _encode(self, prompts: list[str], guided: bool, negative_prompt: str | None) -> tuple[Conditioning, Conditioning | None]:
        positive, negative = self.pipeline.encode_prompt(
            list(prompts), negative_prompt=[negative_prompt or ""] * len(prompts) if guided else None,
            do_classifier_free_guidance=guided, max_sequence_length=self.max_sequence_length, device=self.device)
        return {"prompt_embeds": positive.float()}, ({"prompt_embeds": negative.float()} if guided else None)

    def _latent_shape(self) -> tuple[int, int, int, int]:
        """(C, F', h, w) of one video's latents."""
        pipe, spatial = self.pipeline, self.pipeline.vae_scale_factor_spatial
        frames = (self.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        return pipe.transformer.config.in_channels, frames, self.height // spatial, self.width // spatial

    def _initial_noise(self, batch: int, generator) -> torch.Tensor:
        return standard_normal((batch, *self._latent_shape()), generator)

    def _velocity(self, transformer, latents, sigmas, cond, uncond, guidance_scale):
        """The trained expert's velocity (``transformer``, maybe the trainer's wrapped module); with two experts the
        other, frozen one's for the samples at its timesteps (as WanPipeline switches at the boundary)."""
        scale = self.pipeline.scheduler.config.num_train_timesteps
        trained = self._trains_step(sigmas * scale)
        if trained.all():
            return self._expert_velocity(transformer, latents, sigmas, cond, uncond, guidance_scale)
        other = self.pipeline.transformer_2 if self.module_name == "transformer" else self.pipeline.transformer
        if not trained.any():
            return self._expert_velocity(other, latents, sigmas, cond, uncond, guidance_scale)
        pick = lambda c, rows: None if c is None else {k: v[rows] for k, v in c.items()}  # noqa: E731
        velocity = torch.empty_like(latents, dtype=torch.float32)
        for module, rows in ((transformer, trained), (other, ~trained)):
            velocity[rows] = self._expert_velocity(module, latents[rows], sigmas[rows], pick(cond, rows), pick(uncond, rows),
                                                   guidance_scale)
        return velocity

    def _expert_velocity(self, transformer, latents, sigmas, cond, uncond, guidance_scale):
        scale = self.pipeline.scheduler.config.num_train_timesteps
        dtype = self.inference_dtype
        _, frames, h, w = latents.shape[1:]
        patch = self.pipeline.transformer.config.patch_size
        tokens = (frames // patch[0]) * (h // patch[1]) * (w // patch[2])

        def forward(x, s, c):
            timestep = s * scale
            if self.pipeline.config.expand_timesteps:  # Wan 2.2 TI2V: one timestep per latent token
                timestep = timestep[:, None].expand(-1, tokens)
            return transformer(hidden_states=x.to(dtype), timestep=timestep,
                               encoder_hidden_states=c["prompt_embeds"].to(dtype), return_dict=False)[0]

        return self._guided(forward, latents, sigmas, cond, uncond, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F', h, w) latents to frames (B, F, 3, H, W) in [0, 1], de-normalised as the pipeline does."""
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        video = vae.decode(latents.to(vae.dtype) / inverse_std + mean, return_dict=False)[0]  # (B, 3, F, H, W)
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)
