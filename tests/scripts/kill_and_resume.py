"""A tiny LOOP run that can SIGKILL itself at a chosen point, for the kill-and-resume tests.

    python kill_and_resume.py SD_PATH OUT {none,sampling,optimizer,checkpoint,evaluation} {fresh,resume}

It trains 4 epochs with a checkpoint and an evaluation after each; the kill happens in epoch 2 (while
sampling, or after its second optimizer step), while checkpoint_3 is being written (after accelerate
wrote the files, before the folder is renamed into place), or in the evaluation after epoch 2 (its
checkpoint written, the evaluation not yet logged). The final adapter lands in OUT, the trainer's
log_history in OUT/history.json.
"""

import json

import os
import random
import signal
import sys

import torch

from loop_trl import LOOPConfig, LOOPStableDiffusionPipeline, LOOPTrainer
from loop_trl.rewards import JpegCompressibility

torch.use_deterministic_algorithms(True)
sd_path, out, kill_at, mode = sys.argv[1:5]
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a cat", "a dog"]


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


config = LOOPConfig(num_epochs=4, save_freq=1, resume_from="latest" if mode == "resume" else "", output_dir=out,
                    sample_num_steps=3, sample_batch_size=8, sample_num_batches_per_epoch=1, train_batch_size=4,
                    train_learning_rate=1e-2, train_lr_scheduler="linear", train_num_inner_epochs=2,
                    advantage_estimator="per_prompt_tracker", per_prompt_stat_tracking_min_count=2,
                    sample_guidance_scale=2.0, mixed_precision="no", seed=3,
                    eval_freq=1, eval_num_images_per_prompt=1, eval_num_steps=2, eval_batch_size=2)
jpeg = JpegCompressibility()
trainer = None


def reward(images, prompts, metadata):
    if kill_at == "sampling" and mode == "fresh" and trainer.first_epoch == 2:
        die()
    if kill_at == "evaluation" and mode == "fresh" and trainer.first_epoch == 2 and len(prompts) == 2:
        die()  # the evaluation after epoch 2 (2 images; training batches hold 8)
    return jpeg(images, prompts, metadata)


# prompt_function draws from Python's `random`, so resuming must restore its state too
trainer = LOOPTrainer(config, reward, lambda: (random.choice(PROMPTS), {}),
                      LOOPStableDiffusionPipeline.from_pretrained(sd_path), eval_prompts=PROMPTS[:2])
print(f"start epoch {trainer.first_epoch}", flush=True)
if mode == "fresh" and kill_at == "optimizer":
    step, calls = trainer.update.optimizer_step, []

    def step_then_die(*args, **kwargs):
        grad_norm = step(*args, **kwargs)
        calls.append(trainer.first_epoch)
        if calls.count(2) == 2:
            die()
        return grad_norm

    trainer.update.optimizer_step = step_then_die
if mode == "fresh" and kill_at == "checkpoint":
    save_state = trainer.accelerator.save_state

    def save_then_die(folder, *args, **kwargs):
        result = save_state(folder, *args, **kwargs)
        if folder.endswith("checkpoint_3.partial"):
            die()
        return result

    trainer.accelerator.save_state = save_then_die
trainer.train()
with open(os.path.join(out, "history.json"), "w") as f:
    json.dump(trainer.log_history, f)
