import math

import torch

from loop_trl.objective import clipped_surrogate


def _grad(log_prob_value: float, advantage: float, clip_range: float | None):
    log_prob = torch.tensor([log_prob_value], requires_grad=True)
    out = clipped_surrogate(log_prob, torch.tensor([0.0]), torch.tensor([advantage]), clip_range)
    out.loss.backward()
    return log_prob.grad.item(), out


def test_ratio_one_gives_policy_gradient():
    grad, out = _grad(0.0, 2.0, 0.2)
    assert math.isclose(grad, -2.0, rel_tol=1e-6)  # d(-A * exp(lp))/dlp at lp=0
    assert out.ratio.item() == 1.0 and out.clipfrac.item() == 0.0 and out.approx_kl.item() == 0.0


def test_gradient_vanishes_outside_clip_range_in_advantage_direction():
    eps = 0.2
    # positive advantage, ratio above 1 + eps: no incentive to push it further
    grad, out = _grad(math.log(1.5), 1.0, eps)
    assert grad == 0.0 and out.clipfrac.item() == 1.0
    # negative advantage, ratio below 1 - eps
    grad, _ = _grad(math.log(0.5), -1.0, eps)
    assert grad == 0.0


def test_gradient_survives_outside_clip_range_against_advantage_direction():
    eps = 0.2
    # positive advantage but ratio fell below 1 - eps: the unclipped term is the max, gradient flows
    grad, _ = _grad(math.log(0.5), 1.0, eps)
    assert math.isclose(grad, -0.5, rel_tol=1e-5)
    grad, _ = _grad(math.log(1.5), -1.0, eps)
    assert math.isclose(grad, 1.5, rel_tol=1e-5)


def test_infinite_clip_range_is_unclipped():
    grad, out = _grad(math.log(3.0), 1.0, float("inf"))
    assert math.isclose(grad, -3.0, rel_tol=1e-5) and out.clipfrac.item() == 0.0
    grad_none, _ = _grad(math.log(3.0), 1.0, None)
    assert grad == grad_none


def test_loss_value_matches_formula():
    log_prob = torch.log(torch.tensor([0.5, 1.1, 1.5, 0.95]))
    adv = torch.tensor([1.0, -2.0, 0.5, -1.0])
    out = clipped_surrogate(log_prob, torch.zeros(4), adv, 0.2)
    ratio = log_prob.exp()
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.clipfrac.item() == 0.5
