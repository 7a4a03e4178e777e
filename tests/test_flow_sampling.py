"""The flow samplers (Flow-GRPO's SDE, DanceGRPO's, CPS): Euler parity, log-density, re-scoring, marginals."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from loop_trl.flow_sampling import FLOW_SDE_TYPES, flow_ode_step, flow_sde_std, flow_sde_step_with_logprob


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


@pytest.mark.parametrize("sde_type", FLOW_SDE_TYPES)
@pytest.mark.parametrize("step", [0, 3, 6])
def test_sde_mean_tends_to_the_euler_step_as_the_noise_level_vanishes(step, sde_type):
    scheduler = _scheduler_sigmas()
    s, s_next = scheduler.sigmas[step], scheduler.sigmas[step + 1]
    torch.manual_seed(1)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    euler = flow_ode_step(v, s, s_next, x)
    gaps = [(flow_sde_step_with_logprob(v, s, s_next, x, a, sde_type=sde_type, noise=torch.zeros_like(x)).mean - euler)
            .abs().max().item() for a in (0.3, 0.03, 1e-3)]
    assert gaps[2] < 1e-5
    assert gaps[0] > 50 * gaps[1]  # the mean's change is O(a^2): 100x smaller at a tenth the noise level


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


def test_dance_grpo_step_is_the_sde_with_a_constant_noise_scale():
    """Independent: DanceGRPO's paper form, the Euler step plus -eta^2/2 times the score estimated from the
    predicted image, and the noise eta * sqrt(s - s') at every noise level."""
    torch.manual_seed(4)
    x, v, noise = torch.randn(4, 4, 8, 6), torch.randn(4, 4, 8, 6), torch.randn(4, 4, 8, 6)  # non-square latents
    s, s_next, eta = torch.tensor([1.0, 0.8, 0.5, 0.1]), torch.tensor([0.8, 0.6, 0.3, 0.0]), 0.3
    out = flow_sde_step_with_logprob(v, s, s_next, x, eta, sde_type="dance_grpo", noise=noise)
    for i in range(4):
        si, ni = s[i].item(), s_next[i].item()
        x0 = x[i] - si * v[i]
        score = -(x[i] - (1 - si) * x0) / si**2
        mean = x[i] + (ni - si) * (v[i] - 0.5 * eta**2 * score)
        std = eta * math.sqrt(si - ni)
        torch.testing.assert_close(out.mean[i], mean, rtol=1e-5, atol=1e-5)
        assert out.std[i].item() == pytest.approx(std, rel=1e-6)
        expected = torch.distributions.Normal(mean, std).log_prob(out.prev_sample[i]).mean()
        assert out.log_prob[i].item() == pytest.approx(expected.item(), abs=1e-5)


def test_cps_step_keeps_the_coefficients_of_data_and_noise():
    """Independent: with the exact velocity of x_s = (1 - s) x0 + s eps, a CPS step lands exactly on
    (1 - s') x0 + s' (cos(a pi/2) eps + sin(a pi/2) z): the noise coefficient stays s'."""
    torch.manual_seed(5)
    x0, eps, z = torch.randn(3, 4, 6, 10), torch.randn(3, 4, 6, 10), torch.randn(3, 4, 6, 10)
    s, s_next, a = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.75, 0.4, 0.1]), 0.8
    x = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    out = flow_sde_step_with_logprob(eps - x0, s, s_next, x, a, sde_type="cps", noise=z)
    c, n = math.cos(a * math.pi / 2), math.sin(a * math.pi / 2)
    expected = (1 - s_next.view(-1, 1, 1, 1)) * x0 + s_next.view(-1, 1, 1, 1) * (c * eps + n * z)
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.flatten(), s_next * n)
    for i in range(3):
        density = torch.distributions.Normal(out.mean[i], s_next[i].item() * n).log_prob(out.prev_sample[i]).mean()
        assert out.log_prob[i].item() == pytest.approx(density.item(), abs=1e-5)
    assert flow_sde_std(0.2, 0.0, a, "cps").item() == 0  # the step onto the image carries no noise


@pytest.mark.parametrize("sde_type, noise_level", [("flow_grpo", 0.7), ("dance_grpo", 0.5)])
def test_the_sdes_keep_the_marginals_of_the_flow(sde_type, noise_level):
    """Gaussian data N(0, c^2): with the exact velocity each SDE must end at variance c^2, as the ODE does,
    and stay near the flow's variance (1 - s)^2 c^2 + s^2 on the way (within the 60-step discretisation's
    error: up to 7% early on for Flow-GRPO's first step, whose noise scale is taken at the next sigma).

    CPS is not in this test, by its nature: it re-noises a fixed share of each step's predicted noise,
    so with the posterior-mean predictions of this example its final variance is 0.61 c^2 at a = 0.8
    (0.80 at 0.5, 0.90 at 0.3), and more steps do not close the gap. What it keeps is the
    coefficients of each sample (the test above)."""
    c2, num_steps, n = 0.25, 60, 200_000
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=generator)
    for i in range(num_steps):
        s = sigmas[i].item()
        v = x * (s - (1 - s) * c2) / ((1 - s) ** 2 * c2 + s**2)  # E[eps - x0 | x_s]
        x = flow_sde_step_with_logprob(v, sigmas[i], sigmas[i + 1], x, noise_level, sde_type=sde_type,
                                       generator=generator).prev_sample
        if i + 1 in (15, 30, 45):
            s_next = sigmas[i + 1].item()
            assert x.var().item() == pytest.approx((1 - s_next) ** 2 * c2 + s_next**2, rel=0.08), i + 1
    assert x.var().item() == pytest.approx(c2, rel=0.05)
    assert x.mean().item() == pytest.approx(0.0, abs=0.01)


def test_invalid_arguments_are_named():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        flow_sde_step_with_logprob(x, 0.5, 0.4, x, 0.0)
    with pytest.raises(ValueError, match="at most one"):
        flow_sde_step_with_logprob(x, 0.5, 0.4, x, 0.7, noise=x, prev_sample=x)
    assert flow_sde_std(1.0, 0.9, 0.7).item() == pytest.approx(0.7 * math.sqrt(1 / 0.1) * math.sqrt(0.1))
    with pytest.raises(ValueError, match="sde_type must be one of flow_grpo, dance_grpo, cps, got 'ddim'"):
        flow_sde_step_with_logprob(x, 0.5, 0.4, x, 0.7, sde_type="ddim")
    with pytest.raises(ValueError, match=r"cps.*must lie in \(0, 1\], got 1.5"):
        flow_sde_step_with_logprob(x, 0.5, 0.4, x, 1.5, sde_type="cps")
    assert FLOW_SDE_TYPES == ("flow_grpo", "dance_grpo", "cps")
