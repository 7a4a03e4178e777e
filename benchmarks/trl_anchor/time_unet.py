"""The testbed UNet's passes alone, under whichever torch / diffusers / peft this Python has.

    python benchmarks/trl_anchor/time_unet.py                               # loop-trl's environment
    benchmarks/.venv-trl/bin/python benchmarks/trl_anchor/time_unet.py      # the TRL 0.23.1 anchor's

compare_trl.py runs it in both environments, so that an epoch-time gap between the two trainers
can be split into what the library versions cost (the same UNet calls, timed here) and what the
trainers do around them. The UNet gets the rank-4 LoRA adapter both trainers give it
(to_q/to_k/to_v/to_out.0), then the script times guided sampling calls (no gradient) and guided
training calls (forward and backward into the LoRA weights) at the benchmark's batch sizes, and
prints one JSON line of medians. Needs only torch, diffusers and peft, so it runs in either venv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src", "loop_trl", "testbeds", "shapes", "model")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.path.normpath(MODEL_DIR), help="diffusers pipeline folder with a unet/ subfolder")
    parser.add_argument("--sample_batch_size", type=int, default=16, help="images per sampling call (doubled for guidance)")
    parser.add_argument("--train_batch_size", type=int, default=16, help="trajectories per training call (doubled for guidance)")
    parser.add_argument("--lora_rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each kind, after 3 warm-up calls")
    args = parser.parse_args(argv)

    import diffusers
    import peft
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    size, channels = unet.config.sample_size, unet.config.in_channels
    with open(os.path.join(args.model, "tokenizer", "tokenizer_config.json")) as f:
        tokens = json.load(f)["model_max_length"]  # prompt embeddings are this long

    def inputs(batch: int):
        rows = 2 * batch
        return (torch.randn(rows, channels, size, size), torch.full((rows,), 500),
                torch.randn(rows, tokens, unet.config.cross_attention_dim))

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds)

    sample_in, train_in = inputs(args.sample_batch_size), inputs(args.train_batch_size)

    def sample_call():
        with torch.no_grad():
            unet(*sample_in, return_dict=False)

    def train_call():
        unet(*train_in, return_dict=False)[0].square().mean().backward()

    result = {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
              "threads": torch.get_num_threads(), "sample_call_s": timed(sample_call), "train_call_s": timed(train_call)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
