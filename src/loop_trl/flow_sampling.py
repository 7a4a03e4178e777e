"""The stochastic flow-matching step with its Gaussian log-probability (SD3, SD3.5, FLUX.1).

Rectified-flow models are trained on ``x_s = (1 - s) x_0 + s eps`` and predict the velocity
``v = eps - x_0``. Their samplers take deterministic Euler steps ``x + (s' - s) v`` (diffusers'
``FlowMatchEulerDiscreteScheduler``), which have no log-probability. For RL the step is made
stochastic with the reverse-time SDE that has the same marginals (Flow-GRPO, Liu et al. 2025):
with the score ``-(x + (1 - s) v) / s`` and a noise scale ``sigma_s = a * sqrt(s / (1 - s))``,

    mean = x + (s' - s) * [v + sigma_s^2 / (2 s) * (x + (1 - s) v)]
    std  = sigma_s * sqrt(s - s')

where ``a`` is the ``noise_level`` (0.7 in Flow-GRPO). At ``a -> 0`` the mean is the Euler step.
At ``s = 1`` the noise scale is infinite; like Flow-GRPO we evaluate ``1 - s`` at the next sigma
there, so the step stays a pure function of ``(s, s')``.

Everything here is a pure function of what a trajectory stores (the float sigmas), never of a
scheduler's mutable state, so a stored transition is re-scored exactly.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .sampling import gaussian_log_prob, standard_normal

__all__ = ["FlowStep", "flow_ode_step", "flow_sde_std", "flow_sde_step_with_logprob"]


class FlowStep(NamedTuple):
    """One SDE transition: the next sample, its log-probability (B,), and the Gaussian's mean and std."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or (B,) tensor as fp32 (B, 1, 1, ...) for broadcasting against ``like``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1)
    return value.expand(like.shape[0]).reshape(-1, *([1] * (like.ndim - 1)))


def flow_sde_std(sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, noise_level: float) -> torch.Tensor:
    """The standard deviation ``a * sqrt(s / (1 - s)) * sqrt(s - s')`` of a step from ``s`` to ``s'`` (floats or (B,))."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    one_minus = torch.where(sigma >= 1, 1 - sigma_next, 1 - sigma)
    return noise_level * (sigma / one_minus).sqrt() * (sigma - sigma_next).clamp(min=0).sqrt()


def flow_ode_step(model_output: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
                  sample: torch.Tensor) -> torch.Tensor:
    """The deterministic Euler step ``x + (s' - s) v`` of ``FlowMatchEulerDiscreteScheduler.step``, in fp32."""
    sample = sample.float()
    return sample + (_per_sample(sigma_next, sample) - _per_sample(sigma, sample)) * model_output.float()


def flow_sde_step_with_logprob(
    model_output: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
) -> FlowStep:
    """One stochastic step ``x_s -> x_{s'}`` of a rectified-flow model and its log-probability.

    Args:
        model_output: the (guided) velocity prediction at ``(sample, s)``, (B, ...).
        sigma: ``s``, a float or a (B,) tensor, one per sample.
        sigma_next: ``s'`` (``s' < s``), the same.
        sample: ``x_s``, (B, ...): image latents (B, C, H, W) or packed tokens (B, N, D).
        noise_level: ``a`` in ``sigma_s = a * sqrt(s / (1 - s))``; must be > 0 (use
            :func:`flow_ode_step` for a deterministic step).
        noise: standard normal noise shaped like ``sample`` to sample with.
        generator: a generator to draw the noise from, or one per sample (on the CPU, so results do not
            depend on device).
        prev_sample: a stored ``x_{s'}`` to score instead of sampling a new one.

    Returns:
        :class:`FlowStep` ``(prev_sample, log_prob, mean, std)``; the log-probability is averaged
        over all but the batch dimension, as for DDIM, and everything is computed in fp32.
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for a stochastic step with a log-probability, got {noise_level}; "
                         "use flow_ode_step for a deterministic step.")
    if sum(x is not None for x in (noise, generator, prev_sample)) > 1:
        raise ValueError("Pass at most one of noise, generator or prev_sample.")
    dtype = model_output.dtype
    x, v = sample.float(), model_output.float()
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std = _per_sample(flow_sde_std(s.flatten(), s_next.flatten(), noise_level), x)
    # the drift variance per unit time: sigma_s^2 = (std^2 / (s - s')), written without dividing by s - s'
    noise_var = noise_level**2 * s / torch.where(s >= 1, 1 - s_next, 1 - s)
    score_term = (x + (1 - s) * v) / s  # = -score
    mean = x + (s_next - s) * (v + noise_var / 2 * score_term)
    if prev_sample is None:
        if noise is None:
            noise = standard_normal(x.shape, generator)
        prev_sample = mean + std * noise.to(device=x.device, dtype=torch.float32)
    log_prob = gaussian_log_prob(prev_sample.float(), mean, std)
    return FlowStep(prev_sample.to(dtype), log_prob, mean, std)
