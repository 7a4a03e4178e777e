"""What a :class:`LOOPTrainer` is given, checked and put in the form it trains with: TRL's keyword names
(``args``, ``reward_funcs``, ``train_dataset``, ``model``, ``eval_dataset``) or TRL DDPO's."""

from __future__ import annotations

import os
from typing import Any

from .config import LOOPConfig
from .pipelines.base import DiffusionPolicy
from .prompts import prompt_rows
from .rewards.base import MultiReward

__all__ = ["DDPO_NAMES", "check_sampler_settings", "resolve_inputs"]

#: TRL DDPO's keyword names (and loop-trl's earlier ``eval_prompts``), still accepted, and TRL's names for them
DDPO_NAMES = {"config": "args", "reward_function": "reward_funcs", "prompt_function": "train_dataset",
              "sd_pipeline": "model", "eval_prompts": "eval_dataset"}


def resolve_inputs(given: dict[str, Any], ddpo_names: dict[str, Any]) -> dict[str, Any]:
    """``given`` (TRL's names) with ``ddpo_names`` folded in, checked early with errors that name the argument.

    Returns ``args`` (a :class:`LOOPConfig`; default ``LOOPConfig()``), ``reward_funcs`` (one callable:
    several rewards become their :class:`~loop_trl.rewards.MultiReward`), ``train_dataset`` (as given:
    :class:`~loop_trl.prompts.PromptSource` reads it), ``model`` (a :class:`DiffusionPolicy`; a Hub id
    or folder is loaded with :func:`loop_trl.load_policy`) and ``eval_dataset`` as ``(prompt, metadata)`` rows.
    """
    given = dict(given)
    for old, value in ddpo_names.items():
        if old not in DDPO_NAMES:
            raise TypeError(f"LOOPTrainer got an unexpected keyword argument {old!r}.")
        if given[DDPO_NAMES[old]] is not None:
            raise TypeError(f"LOOPTrainer got both {old}= and {DDPO_NAMES[old]}=; pass one.")
        given[DDPO_NAMES[old]] = value
    for name in ("reward_funcs", "train_dataset", "model"):
        if given[name] is None:
            raise TypeError(f"LOOPTrainer needs {name}= (the reward, the training prompts and the policy).")
    config = given["args"] if given["args"] is not None else LOOPConfig()
    if not isinstance(config, LOOPConfig):
        raise TypeError(f"args must be a LOOPConfig, got {type(config).__name__}.")
    reward = given["reward_funcs"]
    if isinstance(reward, (list, tuple, dict)):  # several rewards: their weighted sum
        reward = MultiReward(reward, config.reward_weights)
    elif config.reward_weights is not None:
        raise ValueError("reward_weights is set but reward_funcs is a single reward; pass a list or dict of "
                         "rewards, or drop reward_weights.")
    if not callable(reward):
        raise TypeError("reward_funcs must be callable: reward(images, prompts, prompt_metadata).")
    model = given["model"]
    if isinstance(model, (str, os.PathLike)):
        from .pipelines.auto import load_policy
        model = load_policy(str(model))
    if not isinstance(model, DiffusionPolicy):
        raise TypeError(f"model must be a DiffusionPolicy such as LOOPStableDiffusionPipeline, or a base model's "
                        f"Hub id or folder; got {type(model).__name__}.")
    eval_rows = prompt_rows(given["eval_dataset"]) if given["eval_dataset"] is not None else []
    if given["eval_dataset"] is not None and not eval_rows:
        raise ValueError("eval_dataset is empty; pass at least one prompt or leave it out.")
    if config.eval_freq > 0 and not eval_rows:
        raise ValueError(f"eval_freq={config.eval_freq} needs evaluation prompts: pass "
                         "LOOPTrainer(..., eval_dataset=[...]) or set eval_freq=0.")
    return dict(given, args=config, reward_funcs=reward, model=model, eval_dataset=eval_rows)


def check_sampler_settings(policy: DiffusionPolicy, config: LOOPConfig) -> None:
    """Refuse at construction a stochasticity the policy's sampler cannot sample with: ``sample_eta``, and
    ``eval_eta`` when it is set and stochastic (0 is the deterministic sampler), naming the field."""
    for name in ("sample_eta", "eval_eta"):
        eta = getattr(config, name)
        if name == "sample_eta" or eta:
            try:
                policy.check_sampling(eta)
            except ValueError as error:
                raise ValueError(f"{name}={eta}: {error}") from None
