"""The accelerator: building it from a :class:`LOOPConfig`, the distributed engines' quirks, and teardown."""

from __future__ import annotations

import gc
import os
import time
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, GradientAccumulationPlugin, ProjectConfiguration

from .config import LOOPConfig

__all__ = ["DTYPES", "clock", "engine_saves_model", "leave_process_group", "make_accelerator", "seeded_generator"]

#: the dtype the frozen weights run in, per ``mixed_precision``
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, epoch, process, ...)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def accumulation_steps(config: LOOPConfig) -> int:
    """Backward calls per optimizer step: ``train_gradient_accumulation_steps`` minibatches, each of
    ``num_train_timesteps / train_timesteps_per_forward`` forward passes."""
    return config.train_gradient_accumulation_steps * config.num_train_timesteps // config.train_timesteps_per_forward


def make_accelerator(config: LOOPConfig) -> Accelerator:
    """An ``Accelerator`` for the config: its trackers, mixed precision and accumulation, with the checks
    that a launch matches what accelerate sees and that the engine is one loop-trl can train under."""
    project_config = ProjectConfiguration(project_dir=config.output_dir,
                                          logging_dir=os.path.join(config.output_dir, "logs"),
                                          **config.project_kwargs)
    accelerator_kwargs = dict(config.accelerator_kwargs)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.cuda.is_available():
        # several processes without GPUs: accelerate forms a CPU (gloo) group only when told to use the CPU
        accelerator_kwargs.setdefault("cpu", True)
    accelerator = Accelerator(
        log_with=config.log_with,
        mixed_precision=config.mixed_precision,  # the launcher's unless the config set one (LOOPConfig)
        project_config=project_config,
        # a plugin, not gradient_accumulation_steps=, which accelerate's launch environment would override:
        # the count is in backward calls, and LOOPConfig already took the launcher's minibatch count
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation_steps(config)),
        **accelerator_kwargs,
    )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError("FSDP version 1 wraps the module, so sampling could not call it directly; loop-trl supports "
                         "FSDP2: set fsdp_version: 2 in the accelerate config (examples/accelerate_configs/fsdp2.yaml).")
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"{world_size} processes were launched but accelerate sees {accelerator.num_processes}; "
                           "they would train independently and overwrite each other's checkpoints. "
                           "Check the launcher's settings (accelerate config) and accelerator_kwargs. "
                           "(FSDP and DeepSpeed through accelerate need GPUs; on CPU use the DDP config.)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # there is no dataloader to read it from
            ds_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
        if ds_config.get("gradient_clipping", "auto") == "auto":  # DeepSpeed clips inside its own step
            ds_config["gradient_clipping"] = config.train_max_grad_norm
    return accelerator


def engine_saves_model(accelerator: Accelerator) -> bool:
    """Whether the engine keeps the module's weights (and optimizer state) sharded and saves them itself
    (FSDP, DeepSpeed); the trainer then gathers the trained weights only to write the final adapter."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def clock(accelerator: Accelerator) -> float:
    """Wall time in seconds, after the accelerator has finished its queued work."""
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)
    return time.perf_counter()


def leave_process_group(accelerator: Accelerator, drop_wrapper: Callable[[], None]) -> None:
    """Close the trackers and leave the process group, all processes together.

    Leaving the group is not enough on its own: the DDP wrapper keeps the group object, and with it
    gloo's worker threads, alive until the interpreter shuts down. A worker that drops its last
    finished collective then needs the GIL to free that collective's Python tensors, and a thread
    that asks for the GIL during shutdown aborts the process ("terminate called without an active
    exception"; pytorch/pytorch#190489). So ``drop_wrapper()`` must replace the caller's only
    reference to the wrapper by the unwrapped module, and the group's threads are joined here. The
    group must go last, from the Python handle held below: that handle lets go of the GIL while the
    threads finish, where the wrapper's C++ reducer would hold it (a deadlock)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    group = torch.distributed.group.WORLD if distributed else None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    drop_wrapper()
    accelerator.free_memory()  # accelerate's own references to the wrapper and the optimizer
    gc.collect()
    del group  # the last reference: the group's threads are joined here, with the GIL released
