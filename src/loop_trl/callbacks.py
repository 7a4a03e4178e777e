"""Callbacks on transformers' ``TrainerCallback`` interface, and the trackers they report to.

A callback written for ``transformers.Trainer`` or TRL works here: the trainer calls ``on_init_end``,
``on_train_begin``, ``on_epoch_begin``, ``on_step_end`` (after each optimizer step), ``on_log``,
``on_evaluate``, ``on_save``, ``on_epoch_end`` and ``on_train_end`` with ``(args, state, control,
**kwargs)``: ``args`` is the :class:`LOOPConfig`, ``state`` a ``transformers.TrainerState`` and
``control`` a ``TrainerControl`` (``should_training_stop``, ``should_save`` and ``should_evaluate``
set in ``on_epoch_end`` are honoured). loop-trl adds one event, ``on_samples``, after each epoch's
rollout is scored, with ``prompt_image_data`` and ``tracker``: TRL's DDPO ``image_samples_hook``
is :class:`ImageSamplesCallback` over it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from accelerate import Accelerator
from transformers import TrainerCallback, TrainerControl, TrainerState

from .config import LOOPConfig

__all__ = ["CallbackList", "ImageSamplesCallback", "LOOPCallback", "close_trackers", "epoch_end_actions", "init_trackers",
           "tracker_run_ids"]


class LOOPCallback(TrainerCallback):
    """A ``TrainerCallback`` with loop-trl's one extra event."""

    def on_samples(self, args: LOOPConfig, state: TrainerState, control: TrainerControl, *,
                   prompt_image_data: list, tracker: Any = None, **kwargs) -> TrainerControl | None:
        """After an epoch's rollout is scored, before the PPO passes. ``prompt_image_data`` holds one
        ``[images, prompts, prompt_metadata, rewards, reward_metadata]`` per sampling batch of this
        process; ``tracker`` is the first tracker (None without one)."""


class ImageSamplesCallback(LOOPCallback):
    """Calls a TRL DDPO style ``hook(prompt_image_data, global_step, tracker)`` on the main process each
    epoch (e.g. :func:`loop_trl.hooks.log_images_hook`)."""

    def __init__(self, hook: Callable[[list, int, Any], None]):
        self.hook = hook

    def on_samples(self, args, state, control, *, prompt_image_data, tracker=None, **kwargs):
        if state.is_world_process_zero:
            self.hook(prompt_image_data, state.global_step, tracker)


class CallbackList:
    """Calls an event on every callback in order (a callback without the event is skipped, so plain
    ``TrainerCallback`` subclasses need not know ``on_samples``); a callback that returns a
    ``TrainerControl`` replaces the one passed on."""

    def __init__(self, callbacks: Sequence[TrainerCallback | type[TrainerCallback]] = ()):
        self.callbacks: list[TrainerCallback] = []
        for callback in callbacks:
            self.add(callback)

    def add(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        callback = callback() if isinstance(callback, type) else callback
        if not isinstance(callback, TrainerCallback):
            raise TypeError(f"callbacks must be transformers.TrainerCallback instances or classes, got "
                            f"{type(callback).__name__}; wrap a function hook in loop_trl.ImageSamplesCallback.")
        self.callbacks.append(callback)

    def __call__(self, event: str, args: LOOPConfig, state: TrainerState, control: TrainerControl,
                 **kwargs) -> TrainerControl:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                result = method(args, state, control, **kwargs)
                if result is not None:
                    control = result
        return control


def epoch_end_actions(epochs_done: int, last_epoch: int, config: LOOPConfig, control: TrainerControl,
                      can_evaluate: bool) -> tuple[bool, bool, bool]:
    """``(evaluate, save, stop)`` after epoch ``epochs_done - 1`` of a ``train()`` ending at ``last_epoch``:
    the config's schedule (``eval_freq``, ``save_freq``, and both after the last epoch) or what a callback
    asked for in ``control`` (whose ``should_evaluate`` and ``should_save`` are reset). A run told to stop
    saves a checkpoint first."""
    final = epochs_done == last_epoch
    stop = control.should_training_stop
    evaluate = can_evaluate and (bool(config.eval_freq) and (epochs_done % config.eval_freq == 0 or final)
                                 or control.should_evaluate)
    save = epochs_done % config.save_freq == 0 or final or control.should_save or stop
    control.should_evaluate = control.should_save = False
    return evaluate, save, stop


def init_trackers(accelerator: Accelerator, config: LOOPConfig, resume_state: dict) -> None:
    """Start the configured trackers on the main process with the config's scalars; a resumed run goes
    on in the same W&B run (its id is in the checkpoint)."""
    if not (accelerator.is_main_process and config.log_with):
        return
    scalars = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
    init_kwargs = {name: dict(kwargs) for name, kwargs in config.tracker_kwargs.items()}
    names = [config.log_with] if isinstance(config.log_with, str) else list(config.log_with)
    if "wandb" in names or "all" in names:
        wandb_kwargs = init_kwargs.setdefault("wandb", {})
        wandb_kwargs.setdefault("name", config.run_name or config.exp_name)
        run_id = resume_state.get("tracker_run_ids", {}).get("wandb")
        if run_id:
            wandb_kwargs.setdefault("id", run_id)
            wandb_kwargs.setdefault("resume", "allow")
    accelerator.init_trackers(config.tracker_project_name, config=scalars, init_kwargs=init_kwargs)


def tracker_run_ids(accelerator: Accelerator) -> dict[str, str]:
    """The W&B run id, for a resumed run to go on in the same run."""
    return {tracker.name: tracker.run.id for tracker in accelerator.trackers
            if tracker.name == "wandb" and getattr(tracker, "run", None) is not None}


def close_trackers(accelerator: Accelerator) -> None:
    """Finish every tracker (not ``accelerator.end_training()``: that also leaves the process group, and the
    trainer must still work afterwards, e.g. for ``evaluate()`` on several processes)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
