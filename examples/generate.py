"""Generate images from a base model plus a LOOP-trained adapter (Hub id or folder).

    python examples/generate.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --adapter you/sd15-loop-aesthetic --prompts "a cat" "a dog" --output_dir samples
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from trl import TrlParser


@dataclass
class GenerateArguments:
    base: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5", metadata={"help": "Base model (Hub id or folder)."})
    adapter: Optional[str] = field(default=None, metadata={"help": "LoRA adapter or full-fine-tune folder (Hub id or folder); none gives the base model."})
    prompts: list[str] = field(default_factory=lambda: ["a cat"], metadata={"help": "Prompts, one image set each."})
    num_images: int = field(default=4, metadata={"help": "Images per prompt."})
    seed: int = field(default=0, metadata={"help": "Seed; the same seed with and without the adapter compares like with like."})
    num_inference_steps: int = field(default=50, metadata={"help": "Denoising steps."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale."})
    height: Optional[int] = field(default=None, metadata={"help": "Image height (default: the model's)."})
    width: Optional[int] = field(default=None, metadata={"help": "Image width (default: the model's)."})
    output_dir: str = field(default="samples", metadata={"help": "Where the PNGs and grid.png go."})
    device: Optional[str] = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    dtype: str = field(default="auto", metadata={"help": "'fp16', 'bf16', 'fp32' or 'auto' (fp16 on GPU, fp32 on CPU)."})


def load_pipeline(args: GenerateArguments, device: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    unet = None
    if args.adapter and os.path.isfile(os.path.join(args.adapter, "unet", "config.json")):  # full fine-tune
        unet = UNet2DConditionModel.from_pretrained(args.adapter, subfolder="unet", dtype=dtype)
    extra = {"unet": unet} if unet is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(args.base, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, **extra)
    if args.adapter and unet is None:
        pipe.load_lora_weights(args.adapter)
    pipe.set_progress_bar_config(desc="denoising")
    return pipe.to(device)


def main() -> None:
    (args,) = TrlParser(GenerateArguments).parse_args_and_config()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = dtypes.get(args.dtype, torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = load_pipeline(args, device, dtype)
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    for p, prompt in enumerate(args.prompts):
        generator = torch.Generator("cpu").manual_seed(args.seed + p)
        images = pipe(prompt, num_images_per_prompt=args.num_images, generator=generator, height=args.height,
                      width=args.width, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale).images
        for i, image in enumerate(images):
            image.save(os.path.join(args.output_dir, f"{p:03d}_{i:02d}.png"))
        rows.append(images)
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * args.num_images, h * len(rows)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * w, r * h))
    grid.save(os.path.join(args.output_dir, "grid.png"))
    print(f"Wrote {len(rows) * args.num_images} images and grid.png to {args.output_dir}")


if __name__ == "__main__":
    main()
