"""Fine-tune a text-to-image model with LOOP on the LAION aesthetic score (or another built-in reward).

    accelerate launch examples/train_aesthetic.py                       # SD 1.5, aesthetic reward
    accelerate launch examples/train_aesthetic.py --config examples/configs/aesthetic_sd15.yaml
    accelerate launch examples/train_aesthetic.py --config examples/configs/aesthetic_sd35_medium.yaml
    accelerate launch examples/train_aesthetic.py --pretrained_model stabilityai/stable-diffusion-3.5-medium
    accelerate launch examples/train_aesthetic.py --reward hpsv2      # or pickscore, imagereward, clipscore, ...
    accelerate launch examples/train_aesthetic.py --push_to_hub --hub_model_id you/sd15-loop-aesthetic
    accelerate launch examples/train_aesthetic.py --config examples/configs/aesthetic_wan21.yaml  # text-to-video

The model family (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, FLUX.2 [dev] and [klein], Qwen-Image, Z-Image, Wan) is read from the
checkpoint's model_index.json. For video (Wan) the image reward scores each frame and a video gets the mean.

Every option of LOOPConfig and of ScriptArguments below is a flag; --help lists them all.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Optional

from trl import TrlParser

import torch

from loop_trl import LOOPConfig, LOOPTrainer, load_policy, policy_class_for
from loop_trl.hooks import log_images_hook
from loop_trl.hub import exit_if_hub_unreachable
from loop_trl.rewards import AestheticReward, PerFrameReward
from loop_trl.rewards.serve import load_reward

ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]


@dataclass
class ScriptArguments:
    """Model, LoRA, reward and prompt options of this script (LOOPConfig holds the rest)."""

    pretrained_model: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                  metadata={"help": "Base model: a Hub id or a local folder in diffusers format, of any supported family (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, FLUX.2 [dev] and [klein], Qwen-Image, Z-Image, Wan)."})
    pretrained_revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the base model."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (True) or the full UNet / transformer (False)."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "LoRA alpha (default: the rank)."})
    lora_target_modules: Optional[str] = field(default=None, metadata={"help": "Comma-separated module names that get LoRA layers; default: the family's (as diffusers' LoRA training scripts)."})
    resolution: Optional[int] = field(default=None, metadata={"help": "Image height and width in pixels; default: the model's own (512 for SD 1.5, 1024 for SDXL, SD3.5 and FLUX.1)."})
    load_dtype: str = field(default="fp32", metadata={"help": "dtype the base weights load in: 'fp32', 'bf16' or 'fp16' (bf16 halves the memory of loading a large model; trained weights are fp32 either way)."})
    sde_type: Optional[str] = field(default=None, metadata={"help": "Flow families (SD3/3.5, FLUX.1, FLUX.2 [dev] and [klein], Qwen-Image, Z-Image, Wan): the stochastic sampler trained with: 'flow_grpo' (Flow-GRPO's SDE, the default; --sample_eta 0.7), 'dance_grpo' (DanceGRPO's constant noise scale; --sample_eta 0.3) or 'cps' (coefficient-preserving sampling, --sample_eta in (0, 1], with --train_timestep_stop -1 or lower). Not used by SD 1.x/2.x and SDXL (DDIM)."})
    init_adapter: Optional[str] = field(default=None, metadata={"help": "Start from this LoRA adapter (folder or Hub id) instead of a new one."})
    reward: str = field(default="aesthetic", metadata={"help": "The reward: 'aesthetic' (LAION aesthetic predictor), 'jpeg_compressibility', 'jpeg_incompressibility', 'clipscore', 'pickscore', 'hpsv2', 'imagereward', 'ocr' (docs/rewards.md), or module:callable for your own (a class is built without arguments)."})
    aesthetic_clip_model: str = field(default="openai/clip-vit-large-patch14", metadata={"help": "CLIP model (Hub id or folder) of the aesthetic reward."})
    aesthetic_head: str = field(default="trl-lib/ddpo-aesthetic-predictor", metadata={"help": "Aesthetic MLP head: Hub repository, folder or file."})
    aesthetic_head_filename: str = field(default="aesthetic-model.pth", metadata={"help": "The head's file name in its repository or folder."})
    prompts_file: Optional[str] = field(default=None, metadata={"help": "A text file with one prompt per line; default: 45 animal names."})
    log_images: bool = field(default=True, metadata={"help": "Log a few samples per epoch to the tracker (with --log_with)."})
    num_frames: Optional[int] = field(default=None, metadata={"help": "Video families (Wan): frames per video, 4k + 1 (default: the pipeline's 81). The image reward then scores every frame and averages (PerFrameReward)."})
    height: Optional[int] = field(default=None, metadata={"help": "Video families (Wan): frame height in pixels (default: --resolution, else 480)."})
    width: Optional[int] = field(default=None, metadata={"help": "Video families (Wan): frame width in pixels (default: --resolution, else 832)."})
    expert: Optional[str] = field(default=None, metadata={"help": "Wan 2.2 A14B (two experts), required there: 'high_noise' trains transformer (the steps with timestep >= boundary_ratio x 1000), 'low_noise' trains transformer_2 (the rest); set --train_timestep_start/--train_timestep_stop to that expert's steps (a wrong range is refused with the right one)."})


def make_reward(args: ScriptArguments):
    if args.reward == "aesthetic":
        return AestheticReward(clip_model=args.aesthetic_clip_model, head=args.aesthetic_head,
                               head_filename=args.aesthetic_head_filename)
    return load_reward(args.reward)  # the other built-in rewards, by name, or module:callable


def make_prompts(args: ScriptArguments):
    if args.prompts_file:
        with open(args.prompts_file) as f:
            return [line.strip() for line in f if line.strip()]
    return lambda: (random.choice(ANIMALS), {})  # the trainer seeds `random` from config.seed


def main() -> None:
    parser = TrlParser((LOOPConfig, ScriptArguments))
    config, args = parser.parse_args_and_config()
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: diffusers' fp32 default
    if args.load_dtype not in dtypes:
        raise ValueError(f"--load_dtype must be one of {sorted(dtypes)}, got {args.load_dtype!r}.")
    with exit_if_hub_unreachable(f"the {args.reward} reward's weights", args.aesthetic_clip_model if args.reward == "aesthetic"
                                 else args.reward, "Pass local folders (--aesthetic_clip_model, --aesthetic_head) or "
                                 "a reward that needs no weights (--reward jpeg_compressibility)."):
        reward = make_reward(args)
    targets = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()] if args.lora_target_modules else None
    video = {key: value for key, value in dict(num_frames=args.num_frames, height=args.height, width=args.width,
                                               expert=args.expert).items() if value is not None}
    with exit_if_hub_unreachable("the base model", args.pretrained_model + (f" and adapter {args.init_adapter}" if args.init_adapter else ""),
                                 "Pass a local folder in diffusers format: --pretrained_model /path/to/model."):
        family = policy_class_for(args.pretrained_model, args.pretrained_revision)
        if video and not family.produces_video:
            raise SystemExit(f"--num_frames, --height, --width and --expert are for video families (Wan); {args.pretrained_model} "
                             f"is a {family.pipeline_class.__name__}: use --resolution.")
        policy = load_policy(
            args.pretrained_model, revision=args.pretrained_revision, torch_dtype=dtypes[args.load_dtype],
            use_lora=args.use_lora, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_target_modules=targets,
            adapter=args.init_adapter, resolution=args.resolution, **({"sde_type": args.sde_type} if args.sde_type else {}),
            **video,
        )
    if policy.produces_video:  # the image reward scores each frame; a video's reward is the mean over its frames
        reward = PerFrameReward(reward)
    trainer = LOOPTrainer(config, reward, make_prompts(args), policy,
                          image_samples_hook=log_images_hook() if args.log_images else None)
    trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"Adapter and model card written to {os.path.abspath(config.output_dir)}")


if __name__ == "__main__":
    main()
