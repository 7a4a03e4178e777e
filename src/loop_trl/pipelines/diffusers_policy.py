"""What every diffusers-backed family shares: the trained module, LoRA through peft, dtypes, saving.

A family class names its diffusers pipeline class, the module it trains (``unet`` or
``transformer``) and its default LoRA targets, and implements sampling and scoring; this
class does the rest the same way for every family. (It runs past 300 lines because saving and
loading in diffusers' own formats, LoRA with its metadata and full fine-tunes, sharded or not, is
one job that every family shares; split, it would be two files always edited together.)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from typing import Sequence

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from huggingface_hub import save_torch_state_dict
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .base import DiffusionPolicy

__all__ = ["DiffusersPolicy", "LORA_WEIGHT_NAME"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"  # peft's adapter name for the trained LoRA


class DiffusersPolicy(DiffusionPolicy):
    """A diffusers pipeline whose ``module_name`` component (UNet or transformer) is trained.

    With ``use_lora=True`` a peft LoRA adapter is added to that module's ``lora_target_modules``
    and only it is trained; otherwise every weight of the module is. Trainable weights stay fp32
    whatever the inference dtype; every other component is frozen.

    Args:
        pipeline: a loaded pipeline of the family's ``pipeline_class``. Its trained module must not
            already carry a LoRA adapter: fuse it first (``pipeline.fuse_lora();
            pipeline.unload_lora_weights()``) or pass its folder as ``adapter`` to keep training it.
        use_lora: train a LoRA adapter (True) or the whole module (False).
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha; the update is scaled by alpha / r. Defaults to ``lora_rank``.
        lora_target_modules: names of the modules that get LoRA layers (default: the family's,
            as diffusers' LoRA training scripts use).
        adapter: a folder or Hub id with a LoRA adapter (``pytorch_lora_weights.safetensors``, as
            :meth:`save_weights` or diffusers' ``save_lora_weights`` write it) to start from instead
            of a new one. Its own LoRA config (rank, alpha, targets) is used, read the way
            ``load_lora_weights`` reads it, so ``lora_rank``, ``lora_alpha`` and
            ``lora_target_modules`` are ignored then. With full fine-tuning: a folder written by
            :meth:`save_weights`.
        lora_seed: seed of the new adapter's random initial A matrices (B starts at zero, so the
            adapter starts as a no-op whatever the seed).
        resolution: image height and width in pixels (default: the pipeline's own default).
    """

    #: the diffusers pipeline class of the family (set by each family)
    pipeline_class: type
    #: the pipeline component that is trained
    module_name: str = "unet"
    #: LoRA target modules used when none are given
    default_lora_target_modules: tuple[str, ...] = ()
    #: model-card tags of the family
    tags: tuple[str, ...] = ()
    #: extra keyword arguments of ``pipeline_class.from_pretrained``
    from_pretrained_kwargs: dict = {}

    def __init__(
        self,
        pipeline,
        *,
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: int | None = None,
        lora_target_modules: Sequence[str] | None = None,
        adapter: str | None = None,
        lora_seed: int = 0,
        resolution: int | None = None,
    ):
        if not isinstance(pipeline, self.pipeline_class):
            raise TypeError(f"pipeline must be a diffusers {self.pipeline_class.__name__}, got {type(pipeline).__name__}. "
                            "loop_trl.load_policy(name_or_path) picks the right policy for a checkpoint.")
        module = getattr(pipeline, self.module_name)
        if getattr(module, "peft_config", None):
            raise ValueError(
                f"The pipeline's {self.module_name} already carries a LoRA adapter; training would stack a second one "
                "on it. Fuse it into the base weights first (pipeline.fuse_lora(); pipeline.unload_lora_weights()), "
                "or load the base model and pass the adapter's folder as adapter=... to keep training it."
            )
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}.")
        self.pipeline = pipeline
        if resolution is not None and (resolution < 1 or resolution % self.resolution_multiple):
            raise ValueError(f"resolution must be a positive multiple of {self.resolution_multiple} for "
                             f"{type(self).__name__}, got {resolution}.")
        self.use_lora = use_lora
        self.base_model_name = pipeline.name_or_path or None
        self.base_model_loader = None
        self.inference_dtype = torch.float32
        self.resolution = resolution or self.default_resolution
        self._setup_scheduler()

        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        module.requires_grad_(not use_lora)
        if use_lora and adapter is None:
            # peft draws the initial A matrices from torch's global RNG; seed them so a run repeats
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(lora_seed)
                module.add_adapter(LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha or lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(lora_target_modules or self.default_lora_target_modules),
                ))
        if adapter is not None:
            self.load_weights(adapter)
        pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *, revision: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> "DiffusersPolicy":
        """Load a checkpoint of the family (Hub id or folder) and wrap it.

        ``torch_dtype`` is the dtype the weights load in (default fp32; bf16 halves the memory of
        a large model while loading; trainable weights are fp32 either way). ``kwargs`` are the
        constructor's (``use_lora``, ``lora_rank``, ``lora_alpha``, ``lora_target_modules``,
        ``adapter``, ``lora_seed``, ``resolution``, and the family's own).
        """
        path = str(pretrained_model_name_or_path)
        if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)) and not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"{path!r} holds a LoRA adapter, not a base model. Pass the base model and adapter={path!r}.")
        dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        pipeline = cls.pipeline_class.from_pretrained(path, revision=revision, **dtype, **cls.from_pretrained_kwargs)
        return cls(pipeline, **kwargs)

    # ------------------------------------------------------------------ hooks of the families
    #: the resolution must be a multiple of this (the VAE's downsampling, times FLUX's 2x2 packing)
    @property
    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor

    @property
    def default_resolution(self) -> int:
        raise NotImplementedError

    def _setup_scheduler(self) -> None:
        """Check or replace the pipeline's scheduler for sampling with log-probabilities."""

    # ------------------------------------------------------------------ the interface
    @property
    def trainable_module(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.module_name)

    @property
    def adapter_prefix(self) -> str:
        """The name the trained module's LoRA weights are saved under (diffusers' ``<prefix>.`` keys and
        ``<prefix>_lora_layers``): the module's own, except where diffusers loads a module's adapter under another."""
        return self.module_name

    @property
    def unet(self) -> torch.nn.Module:
        """The UNet (TRL DDPO's name). For the transformer families use :attr:`trainable_module`."""
        if self.module_name != "unet":
            warnings.warn(f"{type(self).__name__}.unet is its {self.module_name}; use trainable_module.",
                          FutureWarning, stacklevel=2)
        return self.trainable_module

    @property
    def device(self) -> torch.device:
        return self.trainable_module.device

    def to(self, device: torch.device | str, inference_dtype: torch.dtype = torch.float32) -> "DiffusersPolicy":
        """Move to ``device``; frozen weights in ``inference_dtype`` (a VAE that asks for fp32 decoding,
        as SDXL's does, stays fp32 under fp16), trainable weights always fp32."""
        self.inference_dtype = inference_dtype
        for name, component in self.pipeline.components.items():
            if not isinstance(component, torch.nn.Module) or name == self.module_name:
                continue
            dtype = inference_dtype
            if name == "vae" and inference_dtype == torch.float16 and component.config.get("force_upcast", False):
                dtype = torch.float32
            component.to(device)
            if getattr(component, "dtype", dtype) != dtype:
                component.to(dtype=dtype)
        module = self.trainable_module.to(device)
        for param in module.parameters():
            param.data = param.data.to(torch.float32 if param.requires_grad else inference_dtype)
        return self

    def prepare_reference(self) -> None:
        """Keep the reference policy for the KL penalty: with LoRA nothing (the base model is the module with
        its adapter disabled, no copy in memory); for full fine-tuning a frozen copy of the module as it is
        now, in the inference dtype (one more copy of its weights). Call it before training."""
        if not self.use_lora and getattr(self, "_reference_module", None) is None:
            module = copy.deepcopy(self.trainable_module).requires_grad_(False).eval()
            self._reference_module = module.to(dtype=getattr(self, "inference_dtype", torch.float32))

    @contextlib.contextmanager
    def reference(self):
        """A context in which the returned module is the reference policy: the trained module with its LoRA
        adapter disabled (through peft, so the base weights; an ``adapter=`` the policy started from is
        disabled too), or the copy :meth:`prepare_reference` made."""
        module = self.trainable_module
        if self.use_lora:
            module.disable_adapters()
            try:
                yield module
            finally:
                module.enable_adapters()
            return
        if getattr(self, "_reference_module", None) is None:
            raise RuntimeError("Call prepare_reference() before training: full fine-tuning keeps a frozen copy "
                               "of the module as the reference.")
        yield self._reference_module

    def enable_gradient_checkpointing(self) -> None:
        self.trainable_module.enable_gradient_checkpointing()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.trainable_module.parameters() if p.requires_grad]

    #: set by families that replace the checkpoint's scheduler: the settings that differ from its config
    scheduler_overrides: dict | None = None

    def model_card_info(self) -> dict:
        replaced = self.scheduler_overrides is not None  # the sampler is not the checkpoint's default one
        return dict(pipeline_class=self.pipeline_class.__name__, module_name=self.module_name,
                    module_class=type(self.trainable_module).__name__, tags=list(self.tags),
                    takes_eta="eta" in inspect.signature(self.pipeline_class.__call__).parameters and replaced,
                    scheduler_class=type(self.pipeline.scheduler).__name__ if replaced else None,
                    scheduler_kwargs=dict(self.scheduler_overrides or {}))

    def _guided(self, forward, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict, uncond: dict | None,
                guidance_scale: float) -> torch.Tensor:
        """``forward(latents, timesteps, cond)`` under autocast, in fp32; with classifier-free guidance
        (``guidance_scale > 1`` and an unconditional branch) once on the doubled batch, then combined."""
        guided = guidance_scale > 1.0 and uncond is not None
        if guided:  # unconditional first, as diffusers does
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
            cond = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
        with self._autocast():
            output = forward(latents, timesteps, cond).float()
        if not guided:
            return output
        uncond_out, cond_out = output.chunk(2)
        return uncond_out + guidance_scale * (cond_out - uncond_out)

    def _autocast(self):
        """Autocast to the inference dtype for forward passes (none in fp32)."""
        if self.inference_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.inference_dtype)

    # ------------------------------------------------------------------ saving and loading
    def save_weights(self, save_directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` in diffusers format (for ``load_lora_weights``).
        Full fine-tuning: the module in ``save_directory/<module_name>``.

        ``state_dict`` is the trained module's whole state (``module.state_dict()`` keys) when its
        parameters are sharded (FSDP, DeepSpeed ZeRO-3) and were gathered by the caller.
        """
        os.makedirs(save_directory, exist_ok=True)
        module = self.trainable_module
        if not self.use_lora:
            folder = os.path.join(save_directory, self.module_name)
            if state_dict is None:
                module.save_pretrained(folder, safe_serialization=True)
            else:  # the module's own parameters are shards: write the gathered ones in diffusers' layout
                module.save_config(folder)
                save_torch_state_dict(state_dict, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                      max_shard_size="10GB")
            return
        layers = get_peft_model_state_dict(module, state_dict=state_dict)
        if self.module_name == "unet":  # UNet adapters use diffusers' key names, transformer adapters peft's
            layers = convert_state_dict_to_diffusers(layers)  # (as diffusers' LoRA training scripts save them)
        # the LoRA config goes into the file's metadata, as diffusers' training scripts write it: without it,
        # load_lora_weights takes lora_alpha = r and an adapter with alpha != r loads at the wrong strength
        self.pipeline_class.save_lora_weights(
            save_directory, weight_name=LORA_WEIGHT_NAME, safe_serialization=True,
            **{f"{self.adapter_prefix}_lora_layers": layers,
               f"{self.adapter_prefix}_lora_adapter_metadata": module.peft_config[ADAPTER_NAME].to_dict()})

    def load_weights(self, directory: str) -> None:
        """Load weights written by :meth:`save_weights` (a folder or, for LoRA, a Hub id).

        LoRA: read as diffusers' ``load_lora_weights`` reads it, so the adapter's saved config (rank,
        alpha, targets) applies; an adapter saved without one (older loop-trl, other tools) gets what
        diffusers assumes, alpha = rank. Into a policy whose adapter has that same config, the weights
        are loaded in place (the optimizer's parameters stay the same objects: resuming); otherwise the
        policy's adapter is replaced by the saved one.
        """
        module = self.trainable_module
        if not self.use_lora:
            loaded = type(module).from_pretrained(directory, subfolder=self.module_name, use_safetensors=True)
            module.load_state_dict(loaded.state_dict())
            return
        state_dict, network_alphas, metadata = self._read_lora(directory)
        prefix = f"{self.adapter_prefix}."
        current = getattr(module, "peft_config", {}).get(ADAPTER_NAME)
        if current is not None and _same_lora(current, state_dict, network_alphas, metadata):
            module_state = {k.removeprefix(prefix): v for k, v in state_dict.items()}
            result = set_peft_model_state_dict(module, convert_unet_state_dict_to_peft(module_state), adapter_name=ADAPTER_NAME)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"The adapter in {directory!r} does not fit this {self.module_name}'s LoRA layers "
                                 f"(unexpected keys such as {unexpected[0]!r}).")
            return
        if current is not None:
            module.delete_adapters(ADAPTER_NAME)
        # diffusers' own path (what load_lora_weights calls): the LoRA config from the file's metadata, or
        # inferred from the weights and kohya-style alphas; the layers injected; the weights loaded
        module.load_lora_adapter(state_dict, prefix=self.adapter_prefix, adapter_name=ADAPTER_NAME,
                                 network_alphas=network_alphas, metadata=metadata)
        for name, param in module.named_parameters():
            if "lora_" in name:  # trainable, and fp32 like every trainable weight
                param.data = param.data.to(device=self.device, dtype=torch.float32)
                param.requires_grad_(True)

    def _read_lora(self, directory: str) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
        """The trained module's LoRA weights as diffusers reads them (keys with the module's prefix), their
        kohya-style ``network_alphas`` if any, and the LoRA config saved in the file's metadata (or None)."""
        # safetensors only, under the name diffusers and save_weights write: a pickle is never opened
        loaded = self.pipeline_class.lora_state_dict(directory, weight_name=LORA_WEIGHT_NAME, return_lora_metadata=True)
        state_dict, metadata = loaded[0], loaded[-1]  # (state_dict, [network_alphas,] metadata)
        network_alphas = loaded[1] if len(loaded) == 3 else None
        prefix = f"{self.adapter_prefix}."
        others = sorted({k.split(".")[0] for k in state_dict if not k.startswith(prefix)})
        if others:
            raise ValueError(f"The adapter in {directory!r} has LoRA weights for {others}; loop-trl trains only "
                             f"the {self.module_name}. Fuse those into the base model first.")
        if not state_dict:
            raise ValueError(f"No {self.module_name} LoRA weights found in {directory!r}.")
        return state_dict, network_alphas or None, metadata or None


def _same_lora(config: LoraConfig, state_dict: dict[str, torch.Tensor], network_alphas: dict | None,
               metadata: dict | None) -> bool:
    """Whether a saved adapter has the rank, alpha and targets of ``config`` (so it can load in place)."""
    if metadata is None:  # what diffusers assumes without a saved config: the weights' rank, alpha = rank
        ranks = {v.shape[0] for k, v in state_dict.items() if "lora_A" in k or "lora.down" in k}
        return (not network_alphas and ranks == {config.r} and config.lora_alpha == config.r
                and not config.rank_pattern and not config.alpha_pattern)
    prefix = next(iter(state_dict)).split(".")[0] + "."
    saved = {k.removeprefix(prefix): v for k, v in metadata.items()}
    defaults = LoraConfig()

    def norm(value):
        return sorted(value) if isinstance(value, (list, set, tuple)) else value

    keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
    return all(norm(saved.get(k, getattr(defaults, k))) == norm(getattr(config, k)) for k in keys)
