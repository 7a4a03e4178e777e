"""The stochastic DDIM step with its Gaussian log-probability.

One function, :func:`ddim_step_with_logprob`, does both things the algorithm needs:

* **sample** a transition ``x_t -> x_{t-1}`` (pass ``noise`` or a ``generator``), and
* **score** a stored transition (pass ``prev_sample``), returning ``log p(x_{t-1} | x_t)``.

The mean and standard deviation are those of diffusers' ``DDIMScheduler.step``
(DDIM paper, eqs. 12 and 16); given the same noise the two return the same ``x_{t-1}``.
Unlike ``DDIMScheduler.step`` it accepts one timestep per sample, so a training
minibatch can mix denoising steps.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers import DDIMScheduler

__all__ = ["ddim_step", "ddim_step_distribution", "ddim_step_std", "ddim_step_with_logprob", "gaussian_log_prob",
           "standard_normal"]


def standard_normal(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise (fp32, CPU) of ``shape``, batch first.

    ``generator`` is one generator for the whole batch, or a list with one per sample (as diffusers
    pipelines accept): then sample i's noise comes from ``generator[i]`` only, so an image does not
    depend on its batch size or position.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per sample or a single one.")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in generator])


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``N(mean, std^2)`` at ``x``, averaged over all but the batch dimension.

    Averaging (rather than summing) over the ``C*H*W`` latent entries follows DDPO; it keeps
    the importance ratio in a range where PPO's clipping is meaningful. Shapes: x, mean are
    (B, ...); std broadcasts against them. Returns (B,).
    """
    log_density = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def _per_sample(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``values[index]`` and reshape to (B, 1, 1, ...) for broadcasting."""
    return values.gather(0, index.cpu()).to(index.device).view(-1, *([1] * (ndim - 1)))


def _alphas(scheduler: DDIMScheduler, timestep: int | torch.Tensor, batch: int, ndim: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar at t and at the previous timestep, each (B, 1, 1, ...) for broadcasting."""
    t = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(batch)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.float()
    alpha_t = _per_sample(alphas, t, ndim)
    alpha_prev = torch.where(
        prev_t >= 0,
        alphas.gather(0, prev_t.clamp(min=0).cpu()).to(device),
        torch.as_tensor(float(scheduler.final_alpha_cumprod), device=device),
    ).view_as(alpha_t)
    return alpha_t, alpha_prev


def _std(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM's sigma_t (eq. 16 of the DDIM paper) times eta."""
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    return eta * variance.clamp(min=0).sqrt()


def ddim_step_std(scheduler: DDIMScheduler, timestep: int | torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """The standard deviation of the stochastic DDIM step at ``timestep`` (an int or (B,) tensor): (B,).

    Small values mark steps whose log-probability is very sensitive to the weights (see
    ``loop_trl.timesteps``); call ``scheduler.set_timesteps`` first.
    """
    batch = torch.as_tensor(timestep).reshape(-1).shape[0]
    alpha_t, alpha_prev = _alphas(scheduler, timestep, batch, 1, torch.device("cpu"))
    return _std(alpha_t, alpha_prev, eta)


def _ddim_mean_std(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor,
                   sample: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the DDIM step's Gaussian (std 0 at eta 0), fp32."""
    if scheduler.num_inference_steps is None:
        raise ValueError("Call scheduler.set_timesteps(num_steps) before a DDIM step.")
    if scheduler.config.thresholding:
        raise ValueError("Dynamic thresholding is not supported; set the scheduler's thresholding=False.")
    model_output, sample = model_output.float(), sample.float()
    alpha_t, alpha_prev = _alphas(scheduler, timestep, sample.shape[0], sample.ndim, sample.device)
    beta_t = 1 - alpha_t

    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        pred_eps = model_output
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        pred_eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    else:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}.")
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)

    std = _std(alpha_t, alpha_prev, eta)
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * pred_eps
    return mean, std


def ddim_step_distribution(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor,
                           sample: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of the stochastic DDIM step ``x_t -> x_{t-1}`` (``eta > 0``): its mean (B, C, H, W) and
    standard deviation (B, 1, 1, 1), fp32, as :func:`ddim_step_with_logprob` samples and scores it."""
    sample = sample.float()
    mean, std = _ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if not bool((std > 0).all()):
        zero = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])[(std.reshape(-1) <= 0).cpu()]
        raise ValueError(
            f"The DDIM step at timestep {int(zero[0])} has zero variance under this scheduler config (alpha_bar of "
            "the step's target equals its own: the last step of a schedule that reaches timestep 0, e.g. "
            "timestep_spacing='leading' with steps_offset=0). It is deterministic and has no log-probability: take "
            "it with ddim_step, and do not train it (train_timestep_stop=-1).")
    return mean, std


def ddim_step(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor,
              sample: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM step (eta 0) ``x_t -> x_{t-1}``, as ``DDIMScheduler.step(..., eta=0)``; fp32.

    Used outside an SDE window, where steps carry no noise and no log-probability.
    """
    return _ddim_mean_std(scheduler, model_output, timestep, sample, 0.0)[0]


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step ``x_t -> x_{t-1}`` and its log-probability.

    Args:
        scheduler: a ``DDIMScheduler`` on which ``set_timesteps`` has been called.
        model_output: the (guided) UNet output at ``(sample, timestep)``, shape (B, C, H, W).
        timestep: the current timestep, an int or a (B,) tensor with one per sample.
        sample: ``x_t``, shape (B, C, H, W).
        eta: DDIM's stochasticity; must be > 0 for the log-probability to exist.
        noise: standard normal noise (B, C, H, W) to sample with (as diffusers' ``variance_noise``).
        generator: a generator to draw the noise from, or one per sample (on the CPU, so results do
            not depend on device).
        prev_sample: a stored ``x_{t-1}`` to score instead of sampling a new one.

    Returns:
        ``(prev_sample, log_prob)``: ``x_{t-1}`` (B, C, H, W) and its log-probability (B,),
        computed in fp32.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a stochastic step with a log-probability, got {eta}; "
                         "ddim_step takes a deterministic one.")
    if sum(x is not None for x in (noise, generator, prev_sample)) > 1:
        raise ValueError("Pass at most one of noise, generator or prev_sample.")
    dtype = model_output.dtype
    sample = sample.float()
    mean, std = ddim_step_distribution(scheduler, model_output, timestep, sample, eta)

    if prev_sample is None:
        if noise is None:
            noise = standard_normal(sample.shape, generator)
        prev_sample = mean + std * noise.to(device=sample.device, dtype=torch.float32)
    log_prob = gaussian_log_prob(prev_sample.float(), mean, std)
    return prev_sample.to(dtype), log_prob
