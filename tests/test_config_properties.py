"""Property-based checks of LOOPConfig's validation: invalid combinations raise ValueError naming a
field at fault; valid ones construct. The rules below restate the documented constraints."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from loop_trl import LOOPConfig

ESTIMATORS = ["loo", "group_norm", "per_prompt_tracker", "batch_norm"]

configs = st.fixed_dictionaries({
    "num_samples_per_prompt": st.integers(-1, 9),
    "sample_batch_size": st.integers(-1, 33),
    "sample_num_batches_per_epoch": st.integers(0, 4),
    "train_batch_size": st.integers(0, 33),
    "train_gradient_accumulation_steps": st.integers(0, 4),
    "train_num_inner_epochs": st.integers(0, 3),
    "sample_num_steps": st.integers(0, 60),
    "train_clip_range": st.one_of(st.floats(-1, 1, allow_nan=False), st.just(math.inf)),
    "sample_eta": st.floats(-0.5, 2, allow_nan=False),
    "train_timestep_fraction": st.floats(-0.5, 1.5, allow_nan=False),
    "train_learning_rate": st.floats(-1e-3, 1e-2, allow_nan=False),
    "sample_guidance_scale": st.floats(0, 10, allow_nan=False),
    "advantage_estimator": st.sampled_from(ESTIMATORS + ["mean", ""]),
    "mixed_precision": st.sampled_from(["no", "fp16", "bf16", "fp8"]),
    "reward_error": st.sampled_from(["raise", "skip_group", "ignore"]),
    "reward_max_skip_fraction": st.floats(-0.5, 1.5, allow_nan=False),
})


def faulty_fields(c: dict) -> set[str]:
    """The fields that break a documented rule (empty: the config is valid)."""
    bad = {name for name in ("num_samples_per_prompt", "sample_batch_size", "sample_num_batches_per_epoch",
                             "train_batch_size", "train_gradient_accumulation_steps", "train_num_inner_epochs",
                             "sample_num_steps") if c[name] < 1}
    bad |= {name for name in ("train_clip_range", "sample_eta", "train_learning_rate") if not c[name] > 0}
    if not 0 < c["train_timestep_fraction"] <= 1:
        bad.add("train_timestep_fraction")
    if c["sample_guidance_scale"] < 1:
        bad.add("sample_guidance_scale")
    if c["advantage_estimator"] not in ESTIMATORS:
        bad.add("advantage_estimator")
    if c["mixed_precision"] not in ("no", "fp16", "bf16"):
        bad.add("mixed_precision")
    if c["reward_error"] not in ("raise", "skip_group"):
        bad.add("reward_error")
    if not 0 <= c["reward_max_skip_fraction"] < 1:
        bad.add("reward_max_skip_fraction")
    if bad & {"num_samples_per_prompt", "sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size",
              "train_gradient_accumulation_steps", "advantage_estimator"}:
        return bad  # the divisibility rules below are only defined on positive sizes and a known estimator
    k = c["num_samples_per_prompt"]
    if c["advantage_estimator"] in ("loo", "group_norm") and k < 2:
        bad.add("num_samples_per_prompt")
    if c["sample_batch_size"] % k:
        bad.add("sample_batch_size")
    per_epoch = c["sample_batch_size"] * c["sample_num_batches_per_epoch"]
    if per_epoch % c["train_batch_size"]:
        bad.add("train_batch_size")
    elif (per_epoch // c["train_batch_size"]) % c["train_gradient_accumulation_steps"]:
        bad.add("train_gradient_accumulation_steps")
    return bad


@settings(max_examples=400, deadline=None)
@given(configs)
def test_validation_matches_the_rules(c):
    bad = faulty_fields(c)
    try:
        config = LOOPConfig(**c)
    except ValueError as error:
        assert bad, f"valid config rejected: {error}"
        assert any(field in str(error) for field in bad), f"{error!r} names none of {bad}"
        return
    assert not bad, f"invalid config accepted; faulty: {bad}"
    assert config.sample_batch_size % config.num_samples_per_prompt == 0
    assert 1 <= config.num_train_timesteps <= config.sample_num_steps


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.sampled_from(ESTIMATORS))
def test_whole_groups_always_construct(k, prompts_per_batch, batches, estimator):
    k = max(k, 2) if estimator in ("loo", "group_norm") else k
    size = k * prompts_per_batch
    config = LOOPConfig(num_samples_per_prompt=k, sample_batch_size=size, sample_num_batches_per_epoch=batches,
                        train_batch_size=size, advantage_estimator=estimator)
    assert config.sample_batch_size // config.num_samples_per_prompt == prompts_per_batch
