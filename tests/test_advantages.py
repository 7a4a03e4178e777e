import pytest
import torch

from loop_trl.advantages import (
    PerPromptStatTracker,
    batch_normalized_advantages,
    compute_advantages,
    group_normalized_advantages,
    group_reward_std,
    leave_one_out_advantages,
)


def test_leave_one_out_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    groups = torch.zeros(4, dtype=torch.long)
    # baselines: (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])
    torch.testing.assert_close(leave_one_out_advantages(rewards, groups), expected)


def test_leave_one_out_k2_is_the_difference():
    rewards = torch.tensor([5.0, 2.0, -1.0, 4.0])
    groups = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(leave_one_out_advantages(rewards, groups), torch.tensor([3.0, -3.0, -5.0, 5.0]))


def test_leave_one_out_interleaved_groups_and_properties():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=g)
    groups = torch.tensor([3, 7, 3, 9, 7, 9, 3, 7, 9, 3, 7, 9])
    adv = leave_one_out_advantages(rewards, groups)
    for gid in groups.unique():
        mask = groups == gid
        assert adv[mask].sum().abs() < 1e-5  # a group's advantages sum to zero
        k = int(mask.sum())
        # A_i = K/(K-1) * (r_i - group mean)
        torch.testing.assert_close(adv[mask], k / (k - 1) * (rewards[mask] - rewards[mask].mean()))
    torch.testing.assert_close(leave_one_out_advantages(rewards + 123.0, groups), adv, atol=1e-4, rtol=0)


def test_equal_rewards_give_zero_advantages():
    rewards = torch.full((8,), 0.7)
    groups = torch.arange(8) // 4
    for estimator in ("loo", "group_norm", "batch_norm"):
        assert compute_advantages(estimator, rewards, groups).abs().max() == 0


def test_leave_one_out_rejects_singleton_groups():
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_group_norm_hand_computed():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv = group_normalized_advantages(rewards, groups, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_batch_norm_hand_computed():
    adv = batch_normalized_advantages(torch.tensor([0.0, 2.0]), eps=0.0 + 1e-12)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]))


def test_constant_shift_changes_nothing_for_every_estimator():
    rewards = torch.tensor([0.3, 1.2, -0.5, 2.0, 0.0, 0.9])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    for estimator in ("loo", "group_norm", "batch_norm"):
        torch.testing.assert_close(compute_advantages(estimator, rewards + 50, groups),
                                   compute_advantages(estimator, rewards, groups), atol=1e-4, rtol=0)


def test_per_prompt_tracker_uses_batch_stats_then_prompt_stats():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    prompts = ["a", "b"]
    # first call: each prompt has one reward, below min_count -> batch mean 2, std 1
    adv = tracker.update(prompts, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    assert tracker.last_tracked_fraction == 0.0  # not engaged: batch statistics
    # second call: buffers a=[1, 2], b=[3, 7] -> per-prompt stats
    adv = tracker.update(prompts, torch.tensor([2.0, 7.0]))
    torch.testing.assert_close(adv, torch.tensor([(2 - 1.5) / 0.5, (7 - 5) / 2.0]), atol=1e-4, rtol=0)
    assert tracker.last_tracked_fraction == 1.0
    tracker.update(["a", "c"], torch.tensor([1.0, 2.0]))  # "c" is new: half the rewards use per-prompt statistics
    assert tracker.last_tracked_fraction == 0.5
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()


def test_per_prompt_tracker_buffer_is_bounded():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    for value in range(10):
        tracker.update(["p"], torch.tensor([float(value)]))
    assert list(tracker.stats["p"]) == [7.0, 8.0, 9.0]


def test_unknown_estimator_and_missing_tracker():
    with pytest.raises(ValueError, match="Unknown advantage_estimator"):
        compute_advantages("nope", torch.ones(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="PerPromptStatTracker"):
        compute_advantages("per_prompt_tracker", torch.ones(2), torch.zeros(2, dtype=torch.long))


def test_group_reward_std_averages_groups_equally():
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 5.0, 5.0])  # stds: 1 (group of 2), 0 (group of 4)
    groups = torch.tensor([0, 0, 1, 1, 1, 1])
    torch.testing.assert_close(group_reward_std(rewards, groups), torch.tensor(0.5))
