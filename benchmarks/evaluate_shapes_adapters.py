"""Score saved shapes-testbed adapters on one fixed evaluation, so runs made at different times compare.

    python benchmarks/evaluate_shapes_adapters.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds an adapter written by ``examples/train_shapes.py`` (``pytorch_lora_weights.safetensors``).
Every adapter, and the base model, is scored on the example's fixed-noise evaluation of its 48
binding training prompts (4 images each, the trainer's evaluation with the example's default
sampler and seed), and the held-out binding prompts. Prints a markdown table with standard errors.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from train_shapes import ShapesArguments, defaults  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="folders with a LoRA adapter written by examples/train_shapes.py")
    parser.add_argument("--lora_rank", type=int, default=ShapesArguments.lora_rank, help="LoRA rank of the adapters")
    args = parser.parse_args(argv)

    from loop_trl import LOOPConfig
    from loop_trl.evaluation import sample_and_score, summarize
    from loop_trl.testbeds.shapes import ShapesReward, evaluate, heldout_prompts, load_policy, train_eval_prompts

    d = vars(LOOPConfig(**defaults()))  # the example's settings, with LOOPConfig's defaults for the rest
    prompts = train_eval_prompts(ShapesArguments.num_train_eval_prompts)["binding"]
    held_out = {"binding": heldout_prompts(per_family=ShapesArguments.num_heldout_prompts, seed=0)["binding"]}
    sampler = dict(num_steps=d["sample_num_steps"], guidance_scale=d["sample_guidance_scale"], eta=d["sample_eta"])
    print(f"fixed-noise evaluation: {len(prompts)} training prompts x {d['eval_num_images_per_prompt']} images "
          f"(eval_seed {d['eval_seed']}); held-out: {len(held_out['binding'])} prompts x "
          f"{ShapesArguments.heldout_images_per_prompt} images; {sampler}")
    print("| run | strict | mean score | held-out strict |")
    print("| --- | --- | --- | --- |")
    for run in [None] + args.runs:
        policy = load_policy(lora_rank=args.lora_rank)
        if run is not None:
            policy.load_weights(run)
        m = summarize(sample_and_score(policy, ShapesReward(), prompts, images_per_prompt=d["eval_num_images_per_prompt"],
                                       seed=d["eval_seed"], batch_size=d["eval_batch_size"], **sampler))
        h = evaluate(policy, held_out, ShapesArguments.heldout_images_per_prompt, seed=d["eval_seed"], **sampler)
        print(f"| {run or 'base model'} | {m['strict_mean']:.3f} +- {m['strict_sem']:.3f} | "
              f"{m['reward_mean']:.3f} +- {m['reward_sem']:.3f} | {h['overall']:.3f} +- {h['overall_sem']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
