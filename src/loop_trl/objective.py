"""PPO's clipped surrogate and its diagnostics, as pure tensor functions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SurrogateOutput", "clipped_surrogate", "gaussian_kl", "scaled_clip_range"]


@dataclass
class SurrogateOutput:
    """The loss to minimise and detached diagnostics (scalars)."""

    loss: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    ratio: torch.Tensor


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float | None,
    weights: torch.Tensor | None = None,
) -> SurrogateOutput:
    """PPO's clipped objective, as a loss.

    ``ratio = exp(log_prob - old_log_prob)`` and
    ``loss = mean(max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range)))``.
    With ``clip_range=None`` it is the unclipped importance-weighted policy gradient
    (REINFORCE when the ratio is 1). All inputs are (B,). Optional ``weights`` (B,) scale each
    sample's term of the mean (per-step loss weights).

    ``approx_kl`` is ``0.5 * mean((log_prob - old_log_prob)^2)`` as in DDPO, and ``clipfrac``
    the fraction of samples whose ratio lies outside the clip range.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    if clip_range is None:
        per_sample = unclipped
        clipfrac = torch.zeros((), device=ratio.device)
    else:
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        per_sample = torch.maximum(unclipped, clipped)
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean().detach()
    loss = (per_sample if weights is None else weights * per_sample).mean()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean().detach()
    return SurrogateOutput(loss=loss, approx_kl=approx_kl, clipfrac=clipfrac, ratio=ratio.mean().detach())


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(reference_mean, std^2)) of one sampler step, averaged over all but the batch
    dimension as the step's log-probability is (``sampling.gaussian_log_prob``): (B,).

    The policy's and the reference's step share their standard deviation (it comes from the schedule
    and eta, not the model), so the KL is ``(mean - reference_mean)^2 / (2 std^2)`` per entry, as
    Flow-GRPO's ``beta`` term computes it. ``mean`` and ``reference_mean`` are (B, ...); ``std``
    broadcasts against them.
    """
    per_entry = (mean.float() - reference_mean.float()) ** 2 / (2 * std.float() ** 2)
    return per_entry.mean(dim=tuple(range(1, per_entry.ndim)))


def scaled_clip_range(clip_range: float, latent_shape: tuple[int, ...], reference_shape: tuple[int, ...] = (4, 64, 64)) -> float:
    """The clip range that allows the same per-entry change of the policy on ``latent_shape`` latents
    as ``clip_range`` does on ``reference_shape`` ones.

    The log-probability is a *mean* over the C*H*W latent entries (see ``sampling.gaussian_log_prob``).
    A change of the predicted mean by ``delta`` (in units of the step's std) moves each entry's
    log-density by a zero-mean term of size about ``delta``; their mean over D entries has size
    ``delta / sqrt(D)``. So the same change of the policy moves the log-ratio ``sqrt(D_ref / D)``
    times more on smaller latents, and the clip range should grow by that factor. DDPO's
    ``clip_range=1e-4`` was set for Stable Diffusion 1.x at 512 px, whose latents are 4x64x64.

    >>> round(scaled_clip_range(1e-4, (4, 16, 16)), 6)   # 16x fewer entries: 4x the range
    0.0004
    """
    size, reference = math.prod(latent_shape), math.prod(reference_shape)
    if size <= 0 or reference <= 0:
        raise ValueError(f"latent shapes must be non-empty, got {latent_shape} and {reference_shape}.")
    return clip_range * math.sqrt(reference / size)
