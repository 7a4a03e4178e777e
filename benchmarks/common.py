"""What the benchmark scripts share: the workload's command-line options, a synchronised clock, peak memory."""

from __future__ import annotations

import argparse
import resource
import time

import torch


def add_workload_arguments(parser: argparse.ArgumentParser, epochs: int, images_per_epoch: int = 32) -> None:
    """Options that fix the work of one run, the same for every method compared."""
    parser.add_argument("--epochs", type=int, default=epochs, help="epochs per run")
    parser.add_argument("--images_per_epoch", type=int, default=images_per_epoch, help="sampled images per epoch, the same for every method")
    parser.add_argument("--sample_batch_size", type=int, default=16, help="images per sampling batch")
    parser.add_argument("--train_batch_size", type=int, default=16, help="trajectories per training minibatch")
    parser.add_argument("--num_steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="mixed precision")


def clock(device: torch.device) -> float:
    """Wall time in seconds once ``device`` has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident memory (MB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


#: 64 ordinary prompts for timing runs (what they say does not change the work)
TIMING_PROMPTS = [f"a photo of a {a} {b}" for a in ("red", "green", "blue", "small", "large", "wooden", "striped", "shiny")
                  for b in ("cat", "dog", "car", "house", "bird", "boat", "chair", "tree")]


def brightness_reward(images: torch.Tensor, prompts, metadata):
    """A reward that costs next to nothing: each image's mean pixel value in [0, 1] (for timing runs)."""
    return images.float().mean(dim=(1, 2, 3)), {}
