"""Checkpoints: written atomically, listed, found for resume, with the trainer's own state beside accelerate's."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from transformers import TrainerState

from .advantages import PerPromptStatTracker

__all__ = ["CheckpointFolder", "TrainerCheckpoints", "checkpoint_state", "forwarded", "restore_state", "write_json_atomically"]

logger = get_logger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")
#: the trainer's state beside accelerate's in each checkpoint: epoch and step, the per-prompt statistics,
#: ``log_history``, the non-finite step counters, the W&B run id, and whether its evaluation is owed
STATE_FILE = "trainer_state.json"


def forwarded(path: str) -> property:
    """A property that reads and writes ``self.<path>`` (``"state.global_step"``), so that a value kept in one
    place is also found where users look for it."""
    owner, name = path.split(".")
    return property(lambda self: getattr(getattr(self, owner), name),
                    lambda self, value: setattr(getattr(self, owner), name, value), doc=f"``{path}``")


def write_json_atomically(path: str, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file beside ``path`` and rename it into place."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f)
    os.replace(temporary, path)


def checkpoint_state(state: TrainerState, stat_tracker: PerPromptStatTracker, counters: dict, run_ids: dict,
                     eval_pending: bool) -> dict:
    """What a checkpoint holds beside accelerate's state (``trainer_state.json``)."""
    return {"epoch": int(state.epoch), "global_step": state.global_step, "stat_tracker": stat_tracker.state_dict(),
            "log_history": state.log_history, **counters, "tracker_run_ids": run_ids, "eval_pending": eval_pending}


def restore_state(saved: dict, state: TrainerState, stat_tracker: PerPromptStatTracker) -> None:
    """Put a checkpoint's epoch, step, history and per-prompt statistics back (older checkpoints hold no history)."""
    state.epoch, state.global_step = saved["epoch"], saved["global_step"]
    state.log_history = list(saved.get("log_history", []))
    stat_tracker.load_state_dict(saved["stat_tracker"])


class CheckpointFolder:
    """The checkpoints of a run, ``{output_dir}/checkpoints/checkpoint_{epochs completed}``."""

    def __init__(self, directory: str, limit: int):
        self.directory, self.limit = directory, limit

    def path(self, epoch: int) -> str:
        return os.path.join(self.directory, f"checkpoint_{epoch}")

    def completed(self) -> list[str]:
        """Completed checkpoints, oldest first (``.partial`` folders are never listed)."""
        if not os.path.isdir(self.directory):
            return []
        found = [(int(m.group(1)), name) for name in os.listdir(self.directory) if (m := _CHECKPOINT.match(name))]
        return [os.path.join(self.directory, name) for _, name in sorted(found)]

    def find(self, resume_from: str) -> tuple[str | None, dict]:
        """The checkpoint folder ``resume_from`` names ('latest': the newest) and its trainer state."""
        if resume_from == "latest":
            checkpoints = self.completed()
            if not checkpoints:
                logger.warning(f"resume_from='latest': no checkpoint under {self.directory}; starting from epoch 0.",
                               main_process_only=True)
                return None, {}
            resume_from = checkpoints[-1]
        if not os.path.isfile(os.path.join(resume_from, STATE_FILE)):
            raise ValueError(f"{resume_from!r} is not a LOOP checkpoint (no {STATE_FILE}).")
        with open(os.path.join(resume_from, STATE_FILE)) as f:
            return resume_from, json.load(f)

    def save(self, accelerator: Accelerator, epoch: int, trainer_state: dict) -> str:
        """Write accelerate's state (weights, optimizer, schedule, RNG) and ``trainer_state`` as
        ``checkpoint_{epoch}``, on every process together.

        It is written to a temporary folder and renamed into place, so a crash never leaves a
        half-written checkpoint. The oldest checkpoints beyond ``limit`` are removed.
        """
        final = self.path(epoch)
        partial = final + ".partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(partial)
        # every process writes its own files (its RNG states) into the folder: all must be done before
        # the main process renames it (seen: a busy rank 1 found checkpoint_1.partial already gone)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(partial, STATE_FILE), "w") as f:
                json.dump(trainer_state, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self.completed()[:-self.limit]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def rewrite_state(self, accelerator: Accelerator, epoch: int, trainer_state: dict) -> None:
        """Replace the trainer state of ``checkpoint_{epoch}`` (an atomic rewrite, on the main process)."""
        if accelerator.is_main_process:
            write_json_atomically(os.path.join(self.path(epoch), STATE_FILE), trainer_state)
        accelerator.wait_for_everyone()


class TrainerCheckpoints:
    """A trainer's checkpoints: its :class:`CheckpointFolder`, and what goes into and comes out of each
    checkpoint beside accelerate's state (``state``, the per-prompt statistics, the update's counters,
    the tracker's run id). Registers accelerate's hooks so that a checkpoint holds only the trained
    weights (a LoRA adapter, not the whole UNet), unless FSDP or DeepSpeed save their own shards."""

    def __init__(self, accelerator: Accelerator, folder: CheckpointFolder, policy, state: TrainerState,
                 stat_tracker: PerPromptStatTracker, update, engine_saves_model: bool, run_ids):
        self.accelerator, self.folder, self.policy, self.state = accelerator, folder, policy, state
        self.stat_tracker, self.update, self.run_ids = stat_tracker, update, run_ids
        self.engine_saves_model = engine_saves_model
        accelerator.register_save_state_pre_hook(self._save_weights)
        accelerator.register_load_state_pre_hook(self._load_weights)

    def _save_weights(self, models: list, weights: list, output_dir: str) -> None:
        if not self.engine_saves_model:
            if self.accelerator.is_main_process:
                self.policy.save_weights(output_dir)
            weights.clear()

    def _load_weights(self, models: list, input_dir: str) -> None:
        if not self.engine_saves_model:
            self.policy.load_weights(input_dir)
            models.clear()

    def trainer_state(self, eval_pending: bool) -> dict:
        return checkpoint_state(self.state, self.stat_tracker, self.update.counters, self.run_ids(), eval_pending)

    def save(self, eval_pending: bool) -> str:
        return self.folder.save(self.accelerator, int(self.state.epoch), self.trainer_state(eval_pending))

    def mark_evaluated(self) -> None:
        """Record in the newest checkpoint that its evaluation is logged."""
        self.folder.rewrite_state(self.accelerator, int(self.state.epoch), self.trainer_state(eval_pending=False))

    def resume(self, path: str, saved: dict) -> bool:
        """Load ``path`` (found with ``folder.find``, its trainer state ``saved``); returns whether its
        evaluation is still owed."""
        self.accelerator.load_state(path)
        restore_state(saved, self.state, self.stat_tracker)
        self.update.load_counters(saved)
        logger.info(f"Resumed from {path} at epoch {int(self.state.epoch)}, step {self.state.global_step}.")
        return bool(saved.get("eval_pending", False))
