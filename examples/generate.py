"""Generate images (or videos) from a base model plus a LOOP-trained adapter (Hub id or folder), with plain diffusers.

    python examples/generate.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --adapter you/sd15-loop-aesthetic --prompts "a cat" "a dog" --output_dir samples

Any supported family works (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, FLUX.2 [dev] and [klein], Qwen-Image, Z-Image, Wan): diffusers
picks the pipeline class from the base model's model_index.json. By default it samples with the scheduler the adapter
was trained with (DDIM for SD and SDXL, deterministic: --eta 0; Euler steps on Wan's flow sigmas), as the model card
does. Videos (Wan) are written as animated GIFs, and as MP4s too when imageio and imageio-ffmpeg are installed; the
grid shows their first frames.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import diffusers
from diffusers import DiffusionPipeline
from PIL import Image
from trl import TrlParser

from loop_trl import LOOPStableDiffusionPipeline, LOOPWanPipeline, policy_class_for
from loop_trl.hooks import write_gif
from loop_trl.pipelines.stable_diffusion import ddim_overrides
from loop_trl.hub import exit_if_hub_unreachable


@dataclass
class GenerateArguments:
    base: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5", metadata={"help": "Base model (Hub id or folder)."})
    adapter: Optional[str] = field(default=None, metadata={"help": "LoRA adapter or full-fine-tune folder (Hub id or folder); none gives the base model."})
    prompts: list[str] = field(default_factory=lambda: ["a cat"], metadata={"help": "Prompts, one image set each."})
    num_images: int = field(default=4, metadata={"help": "Images per prompt."})
    seed: int = field(default=0, metadata={"help": "Seed; the same seed with and without the adapter compares like with like."})
    num_inference_steps: int = field(default=50, metadata={"help": "Denoising steps."})
    guidance_scale: float = field(default=5.0, metadata={"help": "The pipeline's own guidance scale (for most pipelines 1 turns guidance off; for ZImagePipeline 0 does, and loop-trl's sample_guidance_scale g is its g - 1; for QwenImagePipeline it is passed as true_cfg_scale, with the negative prompt " ")."})
    height: Optional[int] = field(default=None, metadata={"help": "Image height (default: the model's)."})
    width: Optional[int] = field(default=None, metadata={"help": "Image width (default: the model's)."})
    num_frames: Optional[int] = field(default=None, metadata={"help": "Video pipelines (Wan): frames per video, 4k + 1 (default: the pipeline's 81; pass the num_frames the adapter was trained with, which its model card shows)."})
    expert: Optional[str] = field(default=None, metadata={"help": "Wan 2.2 A14B: the expert the adapter was trained on, 'high_noise' (transformer, the default) or 'low_noise' (transformer_2; its model card says load_into_transformer_2=True)."})
    fps: int = field(default=16, metadata={"help": "Video pipelines: frames per second of the written GIFs and MP4s."})
    output_dir: str = field(default="samples", metadata={"help": "Where the PNGs (GIFs for videos) and grid.png go."})
    device: Optional[str] = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    dtype: str = field(default="auto", metadata={"help": "'fp16', 'bf16', 'fp32' or 'auto' (fp16 on GPU, fp32 on CPU)."})
    scheduler: str = field(default="trained", metadata={"help": "'trained': the sampler loop-trl trains the family with (DDIM for SD 1.x/2.x and SDXL, whose checkpoints ship PNDM or Euler; Euler steps on the flow sigmas for Wan, whose checkpoints ship UniPC; the pipeline's own flow-matching scheduler for the other flow families); 'default': the checkpoint's own scheduler."})
    eta: float = field(default=0.0, metadata={"help": "With the DDIM sampler: its eta (0 deterministic, as users deploy; the run's sample_eta is the training sampler)."})


def load_pipeline(args: GenerateArguments, device: str, dtype: torch.dtype) -> DiffusionPipeline:
    family = policy_class_for(args.base)
    if args.expert not in (None, "high_noise", "low_noise"):
        raise ValueError(f"--expert must be 'high_noise' or 'low_noise' (Wan 2.2 A14B), got {args.expert!r}.")
    low_noise = args.expert == "low_noise"
    module_name = "transformer_2" if low_noise else family.module_name
    extra = dict(family.from_pretrained_kwargs)
    module_config = os.path.join(args.adapter or "", module_name, "config.json")
    full_finetune = bool(args.adapter) and os.path.isfile(module_config)
    if full_finetune:  # a fine-tuned UNet or transformer replaces the base model's
        with open(module_config) as f:
            module_class = getattr(diffusers, json.load(f)["_class_name"])
        extra[module_name] = module_class.from_pretrained(args.adapter, subfolder=module_name, dtype=dtype)
    pipe = DiffusionPipeline.from_pretrained(args.base, dtype=dtype, **extra)
    if args.adapter and not full_finetune:
        pipe.load_lora_weights(args.adapter, **({"load_into_transformer_2": True} if low_noise else {}))
    if args.scheduler not in ("trained", "default"):
        raise ValueError(f"--scheduler must be 'trained' or 'default', got {args.scheduler!r}.")
    if args.scheduler == "trained" and issubclass(family, LOOPStableDiffusionPipeline):  # SDXL's policy is one too
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, **ddim_overrides(pipe.scheduler.config))
    if args.scheduler == "trained" and family is LOOPWanPipeline and pipe.scheduler.config.get("use_flow_sigmas"):
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                               shift=pipe.scheduler.config.flow_shift)
    pipe.set_progress_bar_config(desc="denoising")
    return pipe.to(device)


def write_video(frames, stem: str, fps: int) -> Image.Image:
    """Write one video's (F, H, W, 3) frames in [0, 1] as ``stem.gif`` (and ``stem.mp4`` when imageio can); its first frame."""
    import importlib.util

    pixels = (frames.clip(0, 1) * 255).round().astype("uint8")
    write_gif(pixels, stem + ".gif", fps)
    if importlib.util.find_spec("imageio") and importlib.util.find_spec("imageio_ffmpeg"):
        diffusers.utils.export_to_video(list(frames), stem + ".mp4", fps=fps)  # floats in [0, 1], as it takes them
    return Image.fromarray(pixels[0])


def main() -> None:
    (args,) = TrlParser(GenerateArguments).parse_args_and_config()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = dtypes.get(args.dtype, torch.float16 if device.startswith("cuda") else torch.float32)
    with exit_if_hub_unreachable("the base model or adapter", f"{args.base} + {args.adapter}" if args.adapter else args.base,
                                 "Pass local folders: --base /path/to/model --adapter /path/to/run."):
        pipe = load_pipeline(args, device, dtype)
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    for p, prompt in enumerate(args.prompts):
        generator = torch.Generator("cpu").manual_seed(args.seed + p)
        extra = {"eta": args.eta} if isinstance(pipe.scheduler, diffusers.DDIMScheduler) else {}  # only where it acts
        if isinstance(pipe, diffusers.QwenImagePipeline) and not pipe.transformer.config.guidance_embeds:
            extra.update(true_cfg_scale=args.guidance_scale, negative_prompt=" ")  # its classifier-free guidance
        else:
            extra["guidance_scale"] = args.guidance_scale
        if isinstance(pipe, diffusers.WanPipeline):
            extra.update(num_videos_per_prompt=args.num_images, output_type="np",
                         **({"num_frames": args.num_frames} if args.num_frames else {}))
        else:
            extra["num_images_per_prompt"] = args.num_images
        output = pipe(prompt=prompt, generator=generator, height=args.height, width=args.width,
                      num_inference_steps=args.num_inference_steps, **extra)
        if hasattr(output, "frames"):  # videos, (N, F, H, W, 3) in [0, 1]
            images = [write_video(video, os.path.join(args.output_dir, f"{p:03d}_{i:02d}"), args.fps)
                      for i, video in enumerate(output.frames)]
        else:
            images = output.images
            for i, image in enumerate(images):
                image.save(os.path.join(args.output_dir, f"{p:03d}_{i:02d}.png"))
        rows.append(images)
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * args.num_images, h * len(rows)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * w, r * h))
    grid.save(os.path.join(args.output_dir, "grid.png"))
    kind = "videos" if isinstance(pipe, diffusers.WanPipeline) else "images"
    print(f"Wrote {len(rows) * args.num_images} {kind} and grid.png to {args.output_dir}")


if __name__ == "__main__":
    main()
