"""The memory options change where tensors live and what is recomputed, never the update."""

import pytest
import torch

from test_trainer import lora_weights, make_trainer


@pytest.mark.parametrize("option", ["gradient_checkpointing", "offload_trajectories"])
def test_memory_option_gives_the_same_update(tmp_path, tiny_sd_path, option):
    plain = make_trainer(tmp_path / "plain", tiny_sd_path)
    frugal = make_trainer(tmp_path / "frugal", tiny_sd_path, **{option: True})
    if option == "gradient_checkpointing":
        assert frugal.policy.unet.is_gradient_checkpointing and not plain.policy.unet.is_gradient_checkpointing
    before = lora_weights(plain)
    plain.step(0, 0)
    frugal.step(0, 0)
    moved = [n for n, p in lora_weights(plain).items() if not torch.equal(before[n], p)]
    assert moved  # the update is not trivially zero
    for name, weight in lora_weights(frugal).items():
        torch.testing.assert_close(weight, lora_weights(plain)[name], rtol=1e-5, atol=1e-6)


def test_epoch_reports_where_its_time_goes(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path)
    trainer.step(0, 0)
    metrics = trainer.last_metrics
    parts = [metrics[f"time/{name}_s"] for name in ("sampling", "reward", "training")]
    assert all(seconds > 0 for seconds in parts)
    assert sum(parts) <= metrics["time/epoch_s"]


def capture_gradients(trainer) -> list[dict]:
    """Record the accumulated gradients each time the trainer is about to take an optimizer step."""
    captured, step = [], trainer.update.optimizer_step

    def recording_step(*args, **kwargs):
        captured.append({n: p.grad.detach().clone() for n, p in trainer.policy.unet.named_parameters() if p.requires_grad})
        return step(*args, **kwargs)

    trainer.update.optimizer_step = recording_step
    return captured


def test_smaller_minibatches_with_accumulation_give_the_same_update(tmp_path, tiny_sd_path):
    """The chunking knob docs/benchmarks.md names: half the minibatch, twice the accumulation, same step.

    What is the same is the accumulated gradient the optimizer receives; it is compared directly.
    (Comparing weights after one AdamW step is not exact in intent: Adam's first step divides each
    element by its own gradient's magnitude, so a float-summation difference of 1e-9 in a tiny
    element can become a visible difference of the update.)

    Both trainers live in one process, so this also checks that the second one's accumulation count
    (accelerate keeps it in a process-wide singleton) does not leak into the first.
    """
    whole = make_trainer(tmp_path / "whole", tiny_sd_path, train_batch_size=8, train_gradient_accumulation_steps=1)
    halves = make_trainer(tmp_path / "halves", tiny_sd_path, train_batch_size=4, train_gradient_accumulation_steps=2)
    grads_whole, grads_halves = capture_gradients(whole), capture_gradients(halves)
    before = lora_weights(whole)
    steps = whole.step(0, 0), halves.step(0, 0)
    assert steps == (1, 1)  # one optimizer step each
    assert len(grads_whole) == len(grads_halves) == 1
    assert any(not torch.equal(before[n], p) for n, p in lora_weights(whole).items())
    (g_whole,), (g_halves,) = grads_whole, grads_halves
    assert any(bool(g.abs().max() > 0) for g in g_whole.values())  # a real gradient, not all zeros
    scale = max(float(g.abs().max()) for g in g_whole.values())
    # Equal up to float32 summation order, whose error scales with the largest terms summed, not with each
    # element (seen: 4e-10 on an element of 5e-7, with the largest gradient 3e-5). A lost or doubled
    # microbatch would be off by tens of percent of `scale`.
    for name, grad in g_halves.items():
        torch.testing.assert_close(grad, g_whole[name], rtol=1e-4, atol=1e-4 * scale)


def test_timesteps_per_forward_give_the_same_gradient(tmp_path, tiny_sd_path):
    """Scoring several trained steps of each trajectory in one forward pass is a speed knob only:
    the optimizer receives the same accumulated gradient as with one step per forward pass."""
    per_forward = 3  # every step of the 3-step trajectories in one pass
    one = make_trainer(tmp_path / "one", tiny_sd_path, train_batch_size=8)
    fused = make_trainer(tmp_path / "fused", tiny_sd_path, train_batch_size=8, train_timesteps_per_forward=per_forward)
    calls = []
    forward = fused.model.forward
    fused.model.forward = lambda *a, **k: calls.append(a[0].shape[0]) or forward(*a, **k)
    grads_one, grads_fused = capture_gradients(one), capture_gradients(fused)
    assert (one.step(0, 0), fused.step(0, 0)) == (1, 1)
    (g_one,), (g_fused,) = grads_one, grads_fused
    assert any(bool(g.abs().max() > 0) for g in g_one.values())
    # guidance 2 doubles each call's batch: 8 trajectories x 3 steps x 2 branches in one training call
    assert calls[-1] == 8 * per_forward * 2
    scale = max(float(g.abs().max()) for g in g_one.values())
    for name, grad in g_fused.items():
        torch.testing.assert_close(grad, g_one[name], rtol=1e-4, atol=1e-5 * scale)


def test_timesteps_per_forward_must_divide_the_trained_steps(tmp_path):
    from test_trainer import small_config

    with pytest.raises(ValueError, match="train_timesteps_per_forward .* divides the steps trained per trajectory"):
        small_config(tmp_path, sample_num_steps=4, train_timestep_fraction=0.75, train_timesteps_per_forward=2)
