"""Measure the testbed: verifier accuracy on renders and on VAE reconstructions, base-model accuracy.

    python -m loop_trl.testbeds.shapes.report [--model DIR] [--n 100]

Prints one JSON object; docs/shapes.md quotes it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ...pipelines import LOOPStableDiffusionPipeline
from .model import MODEL_DIR
from .scenes import FAMILIES, random_scene, render
from .splits import evaluate, heldout_prompts, train_prompts
from .verifier import detect, score


@torch.no_grad()
def verifier_accuracy(n: int, vae=None, seed: int = 0) -> dict[str, float]:
    """Strict pass rate of the verifier on ``n`` renders per family (through ``vae`` if given)."""
    rng = np.random.default_rng(seed)
    result = {}
    for family in FAMILIES:
        scenes = [random_scene(rng, family, 32) for _ in range(n)]
        images = np.stack([np.asarray(render(s, 32)) for s in scenes])
        if vae is not None:
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
            x = vae.decode(vae.encode(x).latent_dist.mean).sample
            images = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        result[family] = float(np.mean([score(s.prompt, detect(img))[1] for s, img in zip(scenes, images)]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL_DIR, help="a testbed model folder")
    parser.add_argument("--n", type=int, default=100, help="renders per family for the verifier checks")
    parser.add_argument("--prompts_per_family", type=int, default=16, help="prompts per family for the model checks")
    parser.add_argument("--images_per_prompt", type=int, default=4, help="images per prompt for the model checks")
    parser.add_argument("--num_steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="classifier-free guidance")
    args = parser.parse_args()
    policy = LOOPStableDiffusionPipeline.from_pretrained(args.model)
    held = heldout_prompts(per_family=args.prompts_per_family, seed=0)
    rng = np.random.default_rng(0)
    train = train_prompts()
    train_subset = list(rng.choice(train, size=min(len(train), 4 * args.prompts_per_family), replace=False))
    kwargs = dict(n_per_prompt=args.images_per_prompt, seed=0, num_steps=args.num_steps, guidance_scale=args.guidance_scale)
    report = {
        "verifier_on_renders": verifier_accuracy(args.n),
        "verifier_on_vae_reconstructions": verifier_accuracy(args.n, policy.pipeline.vae),
        "base_model_heldout": evaluate(policy, held, **kwargs),
        "base_model_train_prompts": evaluate(policy, train_subset, **kwargs),
        "settings": vars(args),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
