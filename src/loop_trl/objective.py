"""PPO's clipped surrogate and its diagnostics, as pure tensor functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SurrogateOutput", "clipped_surrogate"]


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
) -> SurrogateOutput:
    """PPO's clipped objective, as a loss.

    ``ratio = exp(log_prob - old_log_prob)`` and
    ``loss = mean(max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range)))``.
    With ``clip_range=None`` it is the unclipped importance-weighted policy gradient
    (REINFORCE when the ratio is 1). All inputs are (B,).

    ``approx_kl`` is ``0.5 * mean((log_prob - old_log_prob)^2)`` as in DDPO, and ``clipfrac``
    the fraction of samples whose ratio lies outside the clip range.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    if clip_range is None:
        loss = unclipped.mean()
        clipfrac = torch.zeros((), device=ratio.device)
    else:
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean().detach()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean().detach()
    return SurrogateOutput(loss=loss, approx_kl=approx_kl, clipfrac=clipfrac, ratio=ratio.mean().detach())
