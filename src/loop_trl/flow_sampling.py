"""Stochastic flow-matching steps with their Gaussian log-probability (SD3, FLUX.1, FLUX.2, Qwen-Image, Z-Image).

Rectified-flow models are trained on ``x_s = (1 - s) x_0 + s eps`` and predict the velocity
``v = eps - x_0``. Their samplers take deterministic Euler steps ``x + (s' - s) v`` (diffusers'
``FlowMatchEulerDiscreteScheduler``), which have no log-probability. For RL each step is made a
Gaussian ``N(mean, std^2)``; the peers use three such samplers, all here (``sde_type``), each a pure
function of ``(v, s, s', x, a)`` where ``a`` is the noise level (the trainer's ``sample_eta``).
With ``x0 = x - s v`` and ``eps = x + (1 - s) v`` the model's predictions of data and noise:

- ``"flow_grpo"`` (Flow-GRPO, Liu et al. 2025): the reverse-time SDE with the flow's marginals and
  the noise scale ``sigma_s = a * sqrt(s / (1 - s))``; its score is ``-eps / s``::

      mean = x + (s' - s) * [v + sigma_s^2 / (2 s) * eps]        std = sigma_s * sqrt(s - s')

  At ``s = 1`` the noise scale is infinite; like Flow-GRPO, ``1 - s`` is taken at the next sigma
  there, so the step stays a pure function of ``(s, s')``. Flow-GRPO uses ``a = 0.7``.
- ``"dance_grpo"`` (DanceGRPO, Xue et al. 2025): the same SDE with a constant noise scale
  ``sigma_s = a`` (DanceGRPO uses ``a = 0.3``), so the noise added per step is ``a * sqrt(s - s')``
  at every noise level.
- ``"cps"`` (coefficient-preserving sampling, Wang and Yu 2025; in Flow-GRPO, MixGRPO and verl-omni):
  a DDIM-like step that keeps the coefficients of data and noise exactly those of ``x_{s'}``::

      std = s' * sin(a pi / 2)        mean = (1 - s') x0 + sqrt(s'^2 - std^2) eps

  ``a`` lies in (0, 1]: 1 replaces all the predicted noise by fresh noise. The last step (``s' = 0``)
  carries no noise: it is deterministic, has no log-probability and cannot be trained. The
  log-probability here is the exact Gaussian density; Flow-GRPO's CPS code drops its
  ``1 / (2 std^2)`` factor, which rescales every log-ratio by ``2 std^2`` (so its clip range means
  something else per step).

At ``a -> 0`` every mean is the Euler step. Everything here is a pure function of what a trajectory
stores (the float sigmas), never of a scheduler's mutable state, so a stored transition is re-scored
exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .sampling import gaussian_log_prob, standard_normal

__all__ = ["FLOW_SDE_TYPES", "FlowStep", "check_noise_level", "flow_ode_step", "flow_sde_mean_std", "flow_sde_std",
           "flow_sde_step_with_logprob"]

#: the stochastic flow samplers, by name (see the module's docstring)
FLOW_SDE_TYPES = ("flow_grpo", "dance_grpo", "cps")


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


def check_noise_level(noise_level: float, sde_type: str = "flow_grpo") -> None:
    """ValueError unless ``sde_type`` is a known sampler and ``noise_level`` one it can sample with."""
    if sde_type not in FLOW_SDE_TYPES:
        raise ValueError(f"sde_type must be one of {', '.join(FLOW_SDE_TYPES)}, got {sde_type!r}.")
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for a stochastic step with a log-probability, got {noise_level}; "
                         "use flow_ode_step for a deterministic step.")
    if sde_type == "cps" and noise_level > 1:
        raise ValueError(f"The cps sampler's noise level (sample_eta) is a in std = s' sin(a pi / 2) and must lie in "
                         f"(0, 1], got {noise_level}.")


def flow_sde_std(sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, noise_level: float,
                 sde_type: str = "flow_grpo") -> torch.Tensor:
    """The standard deviation of a step from ``s`` to ``s'`` (floats or (B,)) under ``sde_type``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    if sde_type == "cps":
        return sigma_next * math.sin(noise_level * math.pi / 2)
    gap = (sigma - sigma_next).clamp(min=0).sqrt()
    if sde_type == "dance_grpo":
        return noise_level * gap
    one_minus = torch.where(sigma >= 1, 1 - sigma_next, 1 - sigma)
    return noise_level * (sigma / one_minus).sqrt() * gap


def flow_sde_mean_std(model_output: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, sample: torch.Tensor,
                      noise_level: float, sde_type: str = "flow_grpo") -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian (mean, std) of the step ``x_s -> x_{s'}``, in fp32; ``sigma``, ``sigma_next`` broadcast
    against ``sample`` ((B, 1, ...) tensors or floats)."""
    x, v = sample.float(), model_output.float()
    s, s_next = torch.as_tensor(sigma, dtype=torch.float32), torch.as_tensor(sigma_next, dtype=torch.float32)
    std = flow_sde_std(s, s_next, noise_level, sde_type)
    noise_estimate = x + (1 - s) * v
    if sde_type == "cps":
        data_estimate = x - s * v
        return data_estimate * (1 - s_next) + noise_estimate * (s_next**2 - std**2).clamp(min=0).sqrt(), std
    # sigma_s^2, the drift's noise scale squared: std^2 / (s - s'), written without dividing by s - s'
    if sde_type == "dance_grpo":
        noise_var = torch.full_like(s, noise_level**2)
    else:
        noise_var = noise_level**2 * s / torch.where(s >= 1, 1 - s_next, 1 - s)
    score_term = noise_estimate / s  # = -score
    return x + (s_next - s) * (v + noise_var / 2 * score_term), std


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
    sde_type: str = "flow_grpo",
    noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
) -> FlowStep:
    """One stochastic step ``x_s -> x_{s'}`` of a rectified-flow model and its log-probability.

    A step with zero standard deviation (the last step of ``"cps"``) has no density: sample it with
    :func:`flow_ode_step` instead.

    Args:
        model_output: the (guided) velocity prediction at ``(sample, s)``, (B, ...).
        sigma: ``s``, a float or a (B,) tensor, one per sample.
        sigma_next: ``s'`` (``s' < s``), the same.
        sample: ``x_s``, (B, ...): image latents (B, C, H, W) or packed tokens (B, N, D).
        noise_level: ``a``, the sampler's noise level; must be > 0 (use :func:`flow_ode_step` for a
            deterministic step), and at most 1 for ``"cps"``.
        sde_type: which sampler: ``"flow_grpo"``, ``"dance_grpo"`` or ``"cps"`` (the module's docstring).
        noise: standard normal noise shaped like ``sample`` to sample with.
        generator: a generator to draw the noise from, or one per sample (on the CPU, so results do not
            depend on device).
        prev_sample: a stored ``x_{s'}`` to score instead of sampling a new one.

    Returns:
        :class:`FlowStep` ``(prev_sample, log_prob, mean, std)``; the log-probability is averaged
        over all but the batch dimension, as for DDIM, and everything is computed in fp32.
    """
    check_noise_level(noise_level, sde_type)
    if sum(x is not None for x in (noise, generator, prev_sample)) > 1:
        raise ValueError("Pass at most one of noise, generator or prev_sample.")
    dtype = model_output.dtype
    x = sample.float()
    mean, std = flow_sde_mean_std(model_output, _per_sample(sigma, x), _per_sample(sigma_next, x), x, noise_level, sde_type)
    if prev_sample is None:
        if noise is None:
            noise = standard_normal(x.shape, generator)
        prev_sample = mean + std * noise.to(device=x.device, dtype=torch.float32)
    log_prob = gaussian_log_prob(prev_sample.float(), mean, std)
    return FlowStep(prev_sample.to(dtype), log_prob, mean, std)
