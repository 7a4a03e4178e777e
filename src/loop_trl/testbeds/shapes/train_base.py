"""Train the shapes testbed's base model from scratch on CPU: VAE, text encoder and UNet.

    python -m loop_trl.testbeds.shapes.train_base --output_dir src/loop_trl/testbeds/shapes/model

The result is an ordinary ``StableDiffusionPipeline`` folder (32x32 images, 16x16x4 latents, a
word-level CLIP tokenizer, a DDIM scheduler). Everything is seeded. The shipped model took
40 minutes on 2 CPU cores that other jobs shared part of the time (about 30 minutes alone at the
measured step rates) and is 9.8 MB of fp32 safetensors; see docs/shapes.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ...testing import _bytes_to_unicode
from .scenes import COLORS, FAMILIES, NUMBERS, SHAPES, random_scene, render

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
# Little binding data on purpose: with 25% binding scenes and 6000 steps the model bound 83% of held-out
# pairings, which leaves RL little to do (the testbed's target band is 20-70%).
FAMILY_MIX = {"single": 0.45, "binding": 0.1, "counting": 0.2, "spatial": 0.25}
WORDS = [*COLORS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBERS.values(), "a", "and", "to", "the", "left", "of"]


def word_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges turn each testbed word into one token (other text falls back to bytes).

    The merges are learned as BPE learns them (most frequent pair first, over the word list), so
    applying them by rank rebuilds every word.
    """
    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    words = [list(word[:-1]) + [word[-1] + "</w>"] for word in WORDS]
    merges = []
    while any(len(w) > 1 for w in words):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda pair: (counts[pair], pair))  # ties broken deterministically
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [best[0] + best[1]]
                i += 1
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_models(tokenizer: CLIPTokenizer) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3, cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    return vae, text_encoder, unet


def sample_batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, list[str]]:
    """Rendered scenes (B, 3, 32, 32) in [-1, 1] and their prompts, families drawn by FAMILY_MIX."""
    families = rng.choice(FAMILIES, size=size, p=[FAMILY_MIX[f] for f in FAMILIES])
    scenes = [random_scene(rng, family, IMAGE_SIZE) for family in families]
    images = np.stack([np.asarray(render(scene, IMAGE_SIZE)) for scene in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, [s.prompt for s in scenes]


def train_vae(vae: AutoencoderKL, rng: np.random.Generator, steps: int, batch_size: int) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    for step in (bar := tqdm(range(steps), desc="VAE")):
        images, _ = sample_batch(rng, batch_size)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")


def save(vae, text_encoder, tokenizer, unet, output_dir: str) -> None:
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    write_slow_tokenizer_files(tokenizer, os.path.join(output_dir, "tokenizer"))
    prefix_text_encoder_keys(os.path.join(output_dir, "text_encoder", "model.safetensors"))


def prefix_text_encoder_keys(path: str) -> None:
    """transformers 5 saves CLIPTextModel weights as ``embeddings.*``, ``encoder.*``; transformers 4
    expects ``text_model.embeddings.*`` (as Stable Diffusion's own files have) and would silently start
    from random weights. Both versions load the prefixed names, so store those."""
    state = load_file(path)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, path,
              metadata={"format": "pt"})


def write_slow_tokenizer_files(tokenizer: CLIPTokenizer, directory: str) -> None:
    """Next to the saved tokenizer.json, also write vocab.json and merges.txt, which transformers 4 (e.g.
    under TRL 0.23.1) needs to load the tokenizer; transformers 5 saves only tokenizer.json."""
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer.get_vocab(), f, ensure_ascii=False)
    with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]  # [a, b] pairs (or "a b" strings in older files), by rank
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(" ".join(m) + "\n" if isinstance(m, list) else m + "\n" for m in merges))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where the StableDiffusionPipeline folder is written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights")
    parser.add_argument("--vae_steps", type=int, default=800, help="VAE training steps")
    parser.add_argument("--unet_steps", type=int, default=3000, help="UNet + text encoder training steps")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size of both stages")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet stage")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--snapshot_every", type=int, default=0,
                        help="also write the EMA pipeline every N UNet steps to OUTPUT_DIR_stepN (0: never); the "
                             "learning rate is constant after warm-up, so a snapshot at step N is the model that "
                             "--unet_steps N would give")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.time()

    tokenizer = word_tokenizer()
    vae, text_encoder, unet = build_models(tokenizer)
    logger.info(f"parameters: vae {sum(p.numel() for p in vae.parameters()):,}, text encoder "
                f"{sum(p.numel() for p in text_encoder.parameters()):,}, unet {sum(p.numel() for p in unet.parameters()):,}")

    train_vae(vae, rng, args.vae_steps, args.batch_size)
    vae.requires_grad_(False).eval()
    with torch.no_grad():  # scale latents to unit variance, as Stable Diffusion's scaling_factor does
        latents = torch.cat([vae.encode(sample_batch(rng, 256)[0]).latent_dist.mean for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    logger.info(f"VAE done after {time.time() - start:.0f}s; scaling_factor {vae.config.scaling_factor:.4f}")

    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000, clip_sample=False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warmup = 200  # then constant, so the result does not depend on the total length (see --snapshot_every)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    for step in (bar := tqdm(range(args.unet_steps), desc="UNet")):
        images, prompts = sample_batch(rng, args.batch_size)
        prompts = ["" if drop else p for p, drop in zip(prompts, rng.random(len(prompts)) < 0.1)]  # for guidance
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (len(latents),))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0 and step + 1 < args.unet_steps:
            save(vae, ema_text, tokenizer, ema_unet, f"{args.output_dir.rstrip('/')}_step{step + 1}")
    save(vae, ema_text, tokenizer, ema_unet, args.output_dir)
    logger.info(f"Base model written to {args.output_dir} after {(time.time() - start) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
