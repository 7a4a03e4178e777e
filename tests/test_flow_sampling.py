"""The flow-matching SDE step: Euler parity, log-density, re-scoring, and that it keeps the marginals."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from loop_trl.flow_sampling import flow_ode_step, flow_sde_std, flow_sde_step_with_logprob


def _scheduler_sigmas(num_steps=8, shift=3.0):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


def test_ode_step_is_diffusers_euler_step():
    scheduler = _scheduler_sigmas()
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn_like(x)
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        ours = flow_ode_step(v, scheduler.sigmas[i], scheduler.sigmas[i + 1], x)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        x = expected


@pytest.mark.parametrize("step", [0, 3, 7])
def test_sde_mean_tends_to_the_euler_step_as_the_noise_level_vanishes(step):
    scheduler = _scheduler_sigmas()
    s, s_next = scheduler.sigmas[step], scheduler.sigmas[step + 1]
    torch.manual_seed(1)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    euler = flow_ode_step(v, s, s_next, x)
    gaps = [(flow_sde_step_with_logprob(v, s, s_next, x, a, noise=torch.zeros_like(x)).mean - euler).abs().max().item()
            for a in (0.3, 0.03, 1e-3)]
    assert gaps[2] < 1e-5
    assert gaps[0] > 50 * gaps[1]  # the drift correction is O(a^2): 100x smaller at a tenth the noise level


def test_log_prob_is_the_gaussian_density_of_the_flow_grpo_form():
    torch.manual_seed(2)
    x, v, noise = torch.randn(4, 16, 8), torch.randn(4, 16, 8), torch.randn(4, 16, 8)  # packed tokens (B, N, D)
    s, s_next, a = torch.tensor([1.0, 0.9, 0.5, 0.2]), torch.tensor([0.9, 0.7, 0.4, 0.0]), 0.7
    out = flow_sde_step_with_logprob(v, s, s_next, x, a, noise=noise)
    # independent: Flow-GRPO's expansion of the same step, coefficient by coefficient
    for i in range(4):
        si, ni = s[i].item(), s_next[i].item()
        sigma_t = a * math.sqrt(si / (1 - (ni if si == 1 else si)))
        dt = ni - si
        mean = x[i] * (1 + sigma_t**2 / (2 * si) * dt) + v[i] * (1 + sigma_t**2 * (1 - si) / (2 * si)) * dt
        std = sigma_t * math.sqrt(-dt)
        torch.testing.assert_close(out.mean[i], mean, rtol=1e-5, atol=1e-6)
        assert out.std[i].item() == pytest.approx(std, rel=1e-6)
        expected = torch.distributions.Normal(mean, std).log_prob(out.prev_sample[i]).mean()
        assert out.log_prob[i].item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * noise)


def test_rescoring_a_stored_transition_reproduces_its_log_prob_and_rows_are_independent():
    scheduler = _scheduler_sigmas()
    sigmas = scheduler.sigmas
    torch.manual_seed(3)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    steps = torch.tensor([0, 4, 7])
    sampled = flow_sde_step_with_logprob(v, sigmas[steps], sigmas[steps + 1], x, 0.7,
                                         generator=torch.Generator().manual_seed(0))
    rescored = flow_sde_step_with_logprob(v, sigmas[steps], sigmas[steps + 1], x, 0.7, prev_sample=sampled.prev_sample)
    assert (rescored.log_prob - sampled.log_prob).abs().max() < 1e-5
    for i in range(3):  # one row at a time gives the same log-prob as the mixed batch
        row = flow_sde_step_with_logprob(v[i:i + 1], sigmas[steps[i]], sigmas[steps[i] + 1], x[i:i + 1], 0.7,
                                         prev_sample=sampled.prev_sample[i:i + 1])
        assert row.log_prob.item() == pytest.approx(sampled.log_prob[i].item(), abs=1e-6)


def test_sde_keeps_the_marginals_of_the_flow():
    """Gaussian data N(0, c^2): with the exact velocity the SDE must end at variance c^2, as the ODE does."""
    c2, num_steps, n = 0.25, 60, 200_000
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=generator)
    for i in range(num_steps):
        s = sigmas[i].item()
        v = x * (s - (1 - s) * c2) / ((1 - s) ** 2 * c2 + s**2)  # E[eps - x0 | x_s]
        x = flow_sde_step_with_logprob(v, sigmas[i], sigmas[i + 1], x, 0.7, generator=generator).prev_sample
    assert x.var().item() == pytest.approx(c2, rel=0.05)
    assert x.mean().item() == pytest.approx(0.0, abs=0.01)


def test_invalid_arguments_are_named():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        flow_sde_step_with_logprob(x, 0.5, 0.4, x, 0.0)
    with pytest.raises(ValueError, match="at most one"):
        flow_sde_step_with_logprob(x, 0.5, 0.4, x, 0.7, noise=x, prev_sample=x)
    assert flow_sde_std(1.0, 0.9, 0.7).item() == pytest.approx(0.7 * math.sqrt(1 / 0.1) * math.sqrt(0.1))
