"""What a user keeps: shapes-testbed adapters sampled as users sample them, beside the base model.

    python benchmarks/deployed_sampler.py --adapters shapes-loop [more run folders ...]

Each adapter (a folder ``examples/train_shapes.py`` wrote) is loaded into a plain diffusers
``StableDiffusionPipeline`` with ``load_lora_weights`` and sampled with the pipeline's own scheduler
(the testbed's: deterministic DDIM, eta 0) at every guidance scale and step count asked for, on the
example's fixed training-evaluation prompts from fixed noise (the same images for every model, so
differences are the weights'); the base model is sampled the same way. Prints a markdown table of
strict accuracy +- standard error, and per step count each model's best guidance, so that a gain is
compared with what guidance alone gives ("best against best"). Writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from loop_trl.testbeds.shapes import evaluate_plain_pipeline, load_pipeline, train_eval_prompts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", nargs="+", required=True, help="run folders holding pytorch_lora_weights.safetensors")
    parser.add_argument("--guidance", default="1,3,5,7.5", help="guidance scales, comma-separated")
    parser.add_argument("--steps", default="10,50", help="step counts, comma-separated (50 is the pipeline's default)")
    parser.add_argument("--families", default="binding", help="prompt families, as the example's --families")
    parser.add_argument("--num_prompts", type=int, default=48, help="training-evaluation prompts, as the example's --num_train_eval_prompts")
    parser.add_argument("--images_per_prompt", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=1, help="seed of the noise (the example's eval_seed)")
    parser.add_argument("--output", default="deployed_sampler.json", help="where to write the results")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    prompts = [p for f, ps in train_eval_prompts(args.num_prompts // len(families)).items() if f in families for p in ps]
    scales = [float(g) for g in args.guidance.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    results, started = {}, time.time()
    for name in ["base", *args.adapters]:
        pipe = load_pipeline()
        pipe.set_progress_bar_config(disable=True)
        if name != "base":
            pipe.load_lora_weights(name)
        results[name] = {f"{n}:{g:g}": evaluate_plain_pipeline(pipe, prompts, args.images_per_prompt, args.seed, n, g)
                         for n in steps for g in scales}
        print(f"{name}: done after {time.time() - started:.0f} s", flush=True)
    header = [f"{n} steps, g {g:g}" for n in steps for g in scales]
    print(f"\nstrict accuracy, plain StableDiffusionPipeline (DDIM eta 0), {len(prompts)} prompts x "
          f"{args.images_per_prompt} images, seed {args.seed}:\n")
    print("| model | " + " | ".join(header) + " |")
    print("| --- |" + " --- |" * len(header))
    for name, cells in results.items():
        print(f"| {os.path.basename(os.path.normpath(name))} | " +
              " | ".join(f"{m['strict']:.3f} +- {m['strict_sem']:.3f}" for m in cells.values()) + " |")
    print("\nbest guidance per step count (best against best):\n")
    for n in steps:
        base = max(results["base"][f"{n}:{g:g}"]["strict"] for g in scales)
        for name in args.adapters:
            best_g = max(scales, key=lambda g: results[name][f"{n}:{g:g}"]["strict"])
            best = results[name][f"{n}:{best_g:g}"]["strict"]
            print(f"- {n} steps: {os.path.basename(os.path.normpath(name))} {best:.3f} (g {best_g:g}) against base "
                  f"{base:.3f}: {best - base:+.3f}")
    with open(args.output, "w") as f:
        json.dump({"args": vars(args), "prompts": prompts, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
