"""Run by tests/test_engines.py under torchrun with 2 CPU processes (gloo): a LoRA policy whose UNet is
sharded with FSDP2 (torch's fully_shard, what accelerate's FSDP2 applies) samples through the sharded
module, takes one SGD step, and writes its adapter from the gathered state.

    torchrun --nproc_per_node 2 tests/scripts/fsdp2_policy.py SD_FOLDER OUT

Both processes draw the same noise, so the averaged gradient is the single-process one. Rank 0
writes OUT/latents.pt (the sampled trajectory's latents) and OUT/pytorch_lora_weights.safetensors.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from loop_trl import LOOPStableDiffusionPipeline


def one_step(policy, shard: bool):
    """Sample 2 images, one SGD step on the first step's log-prob; return the trajectory's latents.

    (SGD, not Adam: Adam's first step divides each gradient by its own magnitude, so float
    summation order in an element near zero would decide the result.)"""
    unet = policy.trainable_module
    if shard:
        for block in reversed(list(unet.modules())):  # innermost first, as accelerate wraps
            if type(block).__name__ in unet._no_split_modules:
                fully_shard(block)
        fully_shard(unet)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=100.0)
    trajectory = policy.sample(["a red circle", "a blue square"], num_steps=2, guidance_scale=2.0, eta=1.0,
                               generator=torch.Generator().manual_seed(0))
    log_prob = policy.log_prob(trajectory, torch.zeros(2, dtype=torch.long), guidance_scale=2.0)
    (-log_prob.mean()).backward()
    optimizer.step()
    return trajectory.latents


if __name__ == "__main__":
    folder, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    policy = LOOPStableDiffusionPipeline.from_pretrained(folder, lora_rank=4)
    latents = one_step(policy, shard=True)
    assert type(next(policy.trainable_module.parameters())).__name__ == "DTensor"
    state = get_model_state_dict(policy.trainable_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save(latents, f"{out}/latents.pt")
        policy.save_weights(out, state_dict=state)
    # Both ranks leave together. Then the script leaves without the interpreter's shutdown: fully_shard
    # keeps the group (and gloo's worker threads) referenced from places this script cannot clear, and a
    # worker that frees its last collective during shutdown aborts the process (see
    # LOOPTrainer.end_training, which can drop the DDP wrapper instead). Everything is written by now.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
