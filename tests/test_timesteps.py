"""Timestep selection and per-step weights: which denoising steps are trained, and how much each counts."""

import pytest
import torch

from loop_trl import LOOPConfig
from loop_trl.timesteps import eligible_steps, normalized_step_weights, select_timesteps


def test_eligible_steps_follow_slice_rules():
    assert eligible_steps(10) == list(range(10))
    assert eligible_steps(10, stop=-2) == list(range(8))  # the final two are never trained
    assert eligible_steps(10, start=3, stop=7) == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="leave no step"):
        eligible_steps(10, start=8, stop=-2)


def test_selection_draws_distinct_eligible_steps_per_sample():
    steps = [0, 1, 2, 3, 4, 5, 6, 7]
    drawn = select_timesteps(200, steps, 4, torch.Generator().manual_seed(0))
    assert drawn.shape == (200, 4)
    assert set(drawn.unique().tolist()) == set(steps)  # every eligible step gets drawn, nothing else
    assert all(len(set(row)) == 4 for row in drawn.tolist())  # without replacement within a sample
    counts = torch.bincount(drawn.flatten(), minlength=8).float()
    assert counts.min() > 0.8 * counts.mean()  # roughly uniform: 100 draws per step expected
    again = select_timesteps(200, steps, 4, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)  # seeded
    with pytest.raises(ValueError):
        select_timesteps(2, steps, 9, torch.Generator())


def test_weights_are_normalised_over_the_trained_steps():
    uniform = normalized_step_weights(None, 5, [0, 1, 2])
    assert uniform.tolist() == [1, 1, 1, 0, 0]
    weights = normalized_step_weights([2.0, 1.0, 1.0, 7.0, 7.0], 5, [0, 1, 2])
    assert weights[:3].mean().item() == pytest.approx(1.0) and weights[3:].abs().sum() == 0
    assert weights[0].item() == pytest.approx(2 * weights[1].item())
    for bad, message in (([1.0, 1.0], "one weight per sampling step"), ([1, -1, 1, 1, 1], ">= 0"),
                         ([0, 0, 0, 1, 1], "0 on every trained step")):
        with pytest.raises(ValueError, match=message):
            normalized_step_weights(bad, 5, [0, 1, 2])


def test_config_counts_the_fraction_among_eligible_steps_and_checks_early():
    config = LOOPConfig(sample_num_steps=10, train_timestep_stop=-2, train_timestep_fraction=0.5)
    assert config.train_timesteps == list(range(8)) and config.num_train_timesteps == 4
    assert LOOPConfig(sample_num_steps=10, train_timestep_weights="[1,1,1,1,1,1,1,1,0.5,0.5]").train_timestep_weights[-1] == 0.5
    for bad, field in (({"train_timestep_start": 10}, "train_timestep_start"),
                       ({"train_timestep_weights": [1.0] * 3}, "train_timestep_weights"),
                       ({"train_timestep_weights": "[1, 2"}, "train_timestep_weights"),
                       ({"train_timestep_stop": 2.5}, "train_timestep_stop")):
        with pytest.raises(ValueError, match=field):
            LOOPConfig(sample_num_steps=10, **bad)
