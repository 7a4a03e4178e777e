"""The trainer's parts on their own, without a trainer: the reward's fault policy, the advantages over
processes, the checkpoint folder."""

import json
import os

import pytest
import torch
from accelerate import Accelerator, PartialState

from loop_trl import LOOPConfig
from loop_trl.advantages import PerPromptStatTracker, leave_one_out_advantages
from loop_trl.scoring import RewardScorer, advantages_across_processes
from loop_trl.state import CheckpointFolder, forwarded, write_json_atomically

PROMPTS = ["a"] * 4 + ["b"] * 4


def test_the_scorer_drops_whole_groups_or_raises_naming_the_sample():
    def one_nan(images, prompts, metadata):
        return torch.tensor([0.0, 1.0, float("nan"), 3.0, 4.0, 5.0, 6.0, 7.0]), {"seen": len(prompts)}

    images = torch.zeros(8, 3, 4, 4)
    rewards, metadata, valid = RewardScorer(one_nan, LOOPConfig(reward_error="skip_group"))(images, PROMPTS, [{}] * 8, 3, 1)
    assert valid.tolist() == [False] * 4 + [True] * 4 and metadata == {"seen": 8}
    assert rewards.tolist() == [0.0] * 4 + [4.0, 5.0, 6.0, 7.0]
    with pytest.raises(ValueError, match=r"returned nan for sample 2 of sampling batch 1 \(epoch 3, prompt 'a'\)"):
        RewardScorer(one_nan, LOOPConfig())(images, PROMPTS, [{}] * 8, 3, 1)

    def broken(images, prompts, metadata):
        raise OSError("server down")

    rewards, metadata, valid = RewardScorer(broken, LOOPConfig(reward_error="skip_group"))(images, PROMPTS, [{}] * 8, 0, 0)
    assert not valid.any() and metadata is None
    with pytest.raises(RuntimeError, match=r"reward_function raised OSError: server down \[epoch 0, sampling batch 0"):
        RewardScorer(broken, LOOPConfig())(images, PROMPTS, [{}] * 8, 0, 0)


def test_advantages_over_the_kept_groups_weigh_the_kept_samples_up():
    accelerator = Accelerator(cpu=True)
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 9.0, 9.0, 9.0, 9.0, 5.0, 1.0, 0.0, 2.0])
    groups = torch.arange(12) // 4
    valid = torch.tensor([True] * 4 + [False] * 4 + [True] * 4)
    config = LOOPConfig(sample_batch_size=12, train_batch_size=4)
    out = advantages_across_processes(accelerator, config, rewards, groups, ["p"] * 12, valid, PerPromptStatTracker())
    kept = torch.cat([rewards[:4], rewards[8:]])
    expected = leave_one_out_advantages(kept, torch.cat([groups[:4], groups[8:]]))
    torch.testing.assert_close(out.advantages[valid], expected)
    assert out.advantages[~valid].abs().sum() == 0
    assert out.sample_weights.tolist() == [1.5] * 4 + [0.0] * 4 + [1.5] * 4  # 12 samples, 8 kept
    assert out.metrics["train/skipped_groups"] == 1 and out.metrics["train/reward_mean"] == pytest.approx(kept.mean())
    assert out.metrics["train/frac_reward_zero_std"] == 0.0
    with pytest.raises(RuntimeError, match="reward_max_skip_fraction=0.2"):
        advantages_across_processes(accelerator, LOOPConfig(reward_max_skip_fraction=0.2), rewards, groups, ["p"] * 12,
                                    valid, PerPromptStatTracker())


def test_the_checkpoint_folder_lists_only_completed_checkpoints(tmp_path):
    PartialState()  # its messages go through accelerate's logger
    folder = CheckpointFolder(str(tmp_path / "checkpoints"), limit=2)
    assert folder.completed() == [] and folder.find("latest") == (None, {})
    for name in ("checkpoint_10", "checkpoint_9", "checkpoint_11.partial", "other"):
        os.makedirs(tmp_path / "checkpoints" / name)
    write_json_atomically(str(tmp_path / "checkpoints" / "checkpoint_10" / "trainer_state.json"), {"epoch": 10})
    assert [os.path.basename(p) for p in folder.completed()] == ["checkpoint_9", "checkpoint_10"]  # by number
    assert folder.find("latest") == (folder.path(10), {"epoch": 10})
    with pytest.raises(ValueError, match="not a LOOP checkpoint"):
        folder.find(folder.path(9))
    assert json.loads((tmp_path / "checkpoints" / "checkpoint_10" / "trainer_state.json").read_text()) == {"epoch": 10}
    assert not [n for n in os.listdir(tmp_path / "checkpoints" / "checkpoint_10") if n.endswith(".tmp")]


def test_a_forwarded_attribute_reads_and_writes_its_owner():
    class Owner:
        value = forwarded("inner.x")

        def __init__(self):
            self.inner = type("Inner", (), {"x": 1})()

    owner = Owner()
    owner.value = 5
    assert owner.inner.x == 5 and owner.value == 5
