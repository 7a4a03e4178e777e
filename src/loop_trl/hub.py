"""Model cards and uploads to the Hugging Face Hub."""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Iterator

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

__all__ = ["exit_if_hub_unreachable", "hub_unreachable", "make_model_card", "upload_to_hub", "write_model_card"]

_CARD_KEYS = ("num_samples_per_prompt", "advantage_estimator", "num_epochs", "sample_num_steps", "sample_eta",
              "sample_guidance_scale", "sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size",
              "train_learning_rate", "train_num_inner_epochs", "train_clip_range", "train_timestep_start",
              "train_timestep_stop", "train_timestep_fraction", "train_lr_scheduler", "mixed_precision", "seed")


def make_model_card(*, base_model: str | None, reward_name: str, config: dict[str, Any], repo_id: str | None = None,
                    use_lora: bool = True, epochs_trained: int | None = None,
                    base_model_loader: str | None = None, example_prompt: str = "a photo of a cat",
                    pipeline_class: str = "StableDiffusionPipeline", module_name: str = "unet",
                    module_class: str = "UNet2DConditionModel", tags: list[str] | tuple[str, ...] = ("stable-diffusion",),
                    takes_eta: bool = True, scheduler_class: str | None = "DDIMScheduler",
                    scheduler_kwargs: dict | None = None, pipeline_guidance_offset: float = 0.0,
                    guidance_argument: str = "guidance_scale", extra_call_kwargs: dict | None = None,
                    video: bool = False, lora_load_kwargs: dict | None = None) -> ModelCard:
    """A model card: base model, reward, K, the key settings, and how to load and sample the result.

    ``base_model_loader`` is Python code that creates the base pipeline as ``pipe`` (for a base
    model that is not a Hub id or folder, such as the shapes testbed's shipped model); by default
    the card loads ``base_model`` with ``pipeline_class.from_pretrained``. The sampling line
    samples ``example_prompt`` with the run's steps and guidance (and eta, for pipelines that take
    it), the settings the weights were trained for. ``module_name``/``module_class`` name the
    trained module for full fine-tuning. ``scheduler_class`` (with ``scheduler_kwargs``) is the
    scheduler the weights were trained with, set on the pipeline before sampling (SD 1.5's default
    PNDM, for one, ignores ``eta``); None keeps the pipeline's own. ``pipeline_guidance_offset`` is what
    the pipeline's ``guidance_scale`` adds to loop-trl's (-1 for ``ZImagePipeline``, whose 0 turns guidance
    off); ``guidance_argument`` is the pipeline's name for it (``true_cfg_scale`` for ``QwenImagePipeline``)
    and ``extra_call_kwargs`` what else the pipeline needs to sample as trained (Qwen-Image's negative
    prompt, Wan's frame count and size). ``video``: the pipeline makes videos (the card writes an MP4).
    ``lora_load_kwargs`` go to ``load_lora_weights`` (Wan 2.2 A14B's low-noise expert: ``load_into_transformer_2``).
    A policy's ``model_card_info()`` gives all of these.
    """
    base = base_model or "<base model id or folder>"
    target = repo_id or "<this repository or folder>"
    rows = "\n".join(f"| `{key}` | `{config[key]}` |" for key in _CARD_KEYS if key in config)
    if use_lora:
        load = (base_model_loader or
                f'pipe = {pipeline_class}.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")')
        load += f'\npipe.load_lora_weights("{target}"' + "".join(f", {k}={v!r}" for k, v in (lora_load_kwargs or {}).items()) + ")"
    else:
        load = (f'{module_name} = {module_class}.from_pretrained("{target}", subfolder="{module_name}", '
                f'torch_dtype=torch.bfloat16)\n')
        load += (f"{base_model_loader}\npipe.{module_name} = {module_name}.to(pipe.device)" if base_model_loader else
                 f'pipe = {pipeline_class}.from_pretrained("{base}", {module_name}={module_name}, torch_dtype=torch.bfloat16).to("cuda")')
    if scheduler_class:
        extra = "".join(f", {key}={value!r}" for key, value in (scheduler_kwargs or {}).items())
        load += f"\npipe.scheduler = {scheduler_class}.from_config(pipe.scheduler.config{extra})  # the sampler it was trained with"
    eta = f', eta={config.get("sample_eta", 1.0)}' if takes_eta else ""
    guidance = config.get("sample_guidance_scale", 5.0)
    sample = (f'{"video" if video else "image"} = pipe(prompt="{example_prompt}", '
              f'num_inference_steps={config.get("sample_num_steps", 50)}, '
              f'{guidance_argument}={guidance + pipeline_guidance_offset}{eta}'
              + "".join(f", {key}={value!r}" for key, value in (extra_call_kwargs or {}).items())
              + (').frames[0]' if video else ').images[0]'))
    if takes_eta:
        sample += "  # eta=0.0 samples deterministically"
    if pipeline_guidance_offset:
        sample += f"  # this pipeline's scale for loop-trl's sample_guidance_scale {guidance}"
    if video:
        sample += '\nexport_to_video(video, "sample.mp4", fps=16)'

    video_import = "\nfrom diffusers.utils import export_to_video" if video else ""
    k = config.get("num_samples_per_prompt", "K")
    others = f"{k - 1}" if isinstance(k, int) else "K-1"
    card_data = ModelCardData(
        base_model=base_model if base_model_loader is None else None,  # metadata takes Hub ids only
        library_name="diffusers",
        license="openrail++" if base_model and "stable-diffusion-2" in base_model else None,
        tags=["loop-trl", *([] if video else ["text-to-image"]), *tags, "reinforcement-learning",
              "lora" if use_lora else "full-finetune"],
        pipeline_tag="text-to-video" if video else "text-to-image",
    )
    content = f"""---
{card_data.to_yaml()}
---

# {os.path.basename(target.rstrip('/'))}

{'A LoRA adapter' if use_lora else 'A fine-tuned ' + module_class} for `{base}`, trained with reinforcement learning by
loop-trl using LOOP (leave-one-out PPO, Gupta et al. 2025,
arXiv:2503.00897).

- **Reward:** `{reward_name}`
- **Samples per prompt (K):** {k}; with `advantage_estimator` `loo` each image's baseline is
  the mean reward of the other {others} images of its prompt.
- **Epochs trained:** {epochs_trained if epochs_trained is not None else 'see config'}

## How to load it

```python
import torch
from diffusers import {pipeline_class}{', ' + module_class if not use_lora else ''}{', ' + scheduler_class if scheduler_class else ''}{video_import}

{load}
{sample}
```

## Training configuration

| setting | value |
| --- | --- |
{rows}
"""
    return ModelCard(content)


def write_model_card(directory: str, policy, config, reward_function, *, example_prompt: str | None,
                     repo_id: str, epochs_trained: int) -> None:
    """Write the model card of a trained ``policy`` (a :class:`~loop_trl.DiffusionPolicy`) as ``directory/README.md``."""
    card = make_model_card(
        base_model=policy.base_model_name, base_model_loader=policy.base_model_loader,
        example_prompt=example_prompt or "a photo of a cat",
        reward_name=getattr(reward_function, "__name__", type(reward_function).__name__),
        config=config.to_dict(), repo_id=repo_id, use_lora=policy.use_lora, epochs_trained=epochs_trained,
        **policy.model_card_info())
    card.save(os.path.join(directory, "README.md"))


def upload_to_hub(folder: str, repo_id: str, *, private: bool = False, token: str | None = None,
                  commit_message: str = "Upload LOOP-trained weights") -> str:
    """Create ``repo_id`` if needed and upload ``folder``; returns the commit URL.

    The token (argument, ``HF_TOKEN`` or ``huggingface-cli login``) is passed to huggingface_hub only.
    """
    create_repo(repo_id, private=private, token=token, exist_ok=True)
    info = upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def hub_unreachable(error: BaseException) -> BaseException | None:
    """The deepest link of ``error``'s chain that says the Hub could not be reached (no network, offline mode, refused or
    timed-out connection, or a file missing from the local cache in offline mode), or None."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds: tuple[type, ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),  # huggingface_hub 2.x, 1.x
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):  # and before
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        kinds += tuple(getattr(found, name) for name in names)
    seen, found = set(), None
    while error is not None and id(error) not in seen:  # the deepest such link: the connection error itself
        seen.add(id(error))
        text = str(error).lower()
        if isinstance(error, kinds) or "couldn't connect to" in text or "offline mode is enabled" in text:
            found = error
        error = error.__cause__ or error.__context__
    return found


@contextlib.contextmanager
def exit_if_hub_unreachable(what: str, name: str, fix: str) -> Iterator[None]:
    """For scripts: when loading ``what`` (``name``, a Hub id) fails because the Hub cannot be reached, exit with
    one line that says what could not be fetched and how to go on (``fix``), instead of a chain of tracebacks.
    Any other error passes unchanged."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - only the unreachable-Hub case is turned into a message
        cause = hub_unreachable(error)
        if cause is None:
            raise
        raise SystemExit(f"error: could not fetch {what} {name!r} from the Hugging Face Hub (offline or unreachable: "
                         f"{type(cause).__name__}). {fix} Files already in the Hub cache load with HF_HUB_OFFLINE=1; "
                         "with no network at all, `python examples/train_shapes.py` runs the whole loop offline.") from None
