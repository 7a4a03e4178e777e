"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU): a tiny LOOP run that checks itself.

    two_process_run.py MODEL_PATH OUT [full|first|resume] [POLICY_KWARGS_JSON]

MODEL_PATH is any supported pipeline folder (loaded with ``load_policy`` and POLICY_KWARGS_JSON); a video
family's reward scores each frame.

After every optimizer step it gathers a fingerprint of the trainable weights from both ranks;
after every epoch it checks that the gathered group ids form whole groups of K samples that each
come from one process. Each rank writes what it saw to OUT/rank_N.json for the test to assert on.
The script never calls end_training(): the trainer leaves the process group at exit by itself, and
the threads still alive after that are written to OUT/threads_at_exit_N.json.
"""

import atexit
import json
import os
import sys

import torch

from loop_trl import LOOPConfig, LOOPTrainer, load_policy
from loop_trl.rewards import JpegCompressibility, PerFrameReward

sd_path, out = sys.argv[1], sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "full"  # full | first (stop after epoch 1) | resume
policy_kwargs = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
torch.use_deterministic_algorithms(True)


def thread_name(task: str) -> str | None:
    """The name of one of this process's threads, or None if it ended after /proc listed it."""
    try:
        with open(f"/proc/self/task/{task}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def record_threads_at_exit():
    """Registered before the trainer exists, so it runs after the trainer's own exit handler (last in, first out).
    A thread that ends between listing and reading is skipped (it is not alive at exit); raising here would
    lose the record while the process still exits 0."""
    tasks = "/proc/self/task"
    threads = None
    if os.path.isdir(tasks):
        threads = [name for name in map(thread_name, os.listdir(tasks)) if name is not None]
    with open(f"{out}/threads_at_exit_{int(os.environ.get('RANK', 0))}.json", "w") as f:
        json.dump(threads, f)


atexit.register(record_threads_at_exit)
config = LOOPConfig(num_epochs=2, resume_from="latest" if mode == "resume" else "", sample_num_steps=3, sample_batch_size=8, sample_num_batches_per_epoch=2,
                    train_batch_size=4, mixed_precision="no", output_dir=out, train_learning_rate=1e-2,
                    sample_guidance_scale=2.0, seed=0, eval_num_images_per_prompt=3)
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a cat"]
policy = load_policy(sd_path, **policy_kwargs)
reward = PerFrameReward(JpegCompressibility()) if policy.produces_video else JpegCompressibility()  # videos: per frame
trainer = LOOPTrainer(config, reward, PROMPTS, policy, eval_prompts=PROMPTS)
accelerator = trainer.accelerator
report = {"rank": accelerator.process_index, "world": accelerator.num_processes, "weight_spread": [], "groups": []}


def fingerprint() -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in trainer.trainable_parameters])


original_step = trainer.optimizer.step


def checked_step(*args, **kwargs):
    result = original_step(*args, **kwargs)
    if accelerator.sync_gradients:
        both = accelerator.gather(fingerprint().unsqueeze(0))  # (2, n_params)
        report["weight_spread"].append((both.max(0).values - both.min(0).values).abs().max().item())
    return result


trainer.optimizer.step = checked_step
import loop_trl.trainer as trainer_module  # noqa: E402

original_advantages = trainer_module.advantages_across_processes


def checked_advantages(accelerator, config, rewards, group_ids, *args):
    ids = accelerator.gather(group_ids)
    ranks = accelerator.gather(torch.full_like(group_ids, accelerator.process_index))
    groups = {}
    for gid, rank in zip(ids.tolist(), ranks.tolist()):
        groups.setdefault(gid, []).append(rank)
    report["groups"].append(sorted((len(r), len(set(r))) for r in groups.values()))
    return original_advantages(accelerator, config, rewards, group_ids, *args)


trainer_module.advantages_across_processes = checked_advantages
trainer.train(epochs=1 if mode == "first" else None)
report["steps"] = trainer.global_step
if mode == "full":  # 12 evaluation images in batches of 8: each rank samples one batch, then they are gathered
    report["eval"] = trainer.evaluate(log=False)
with open(f"{out}/rank_{accelerator.process_index}.json", "w") as f:
    json.dump(report, f)
