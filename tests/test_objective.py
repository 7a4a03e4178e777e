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


def test_weights_scale_each_samples_term():
    log_prob = torch.zeros(2, requires_grad=True)
    out = clipped_surrogate(log_prob, torch.zeros(2), torch.tensor([1.0, 1.0]), 0.2, weights=torch.tensor([2.0, 0.0]))
    out.loss.backward()
    assert out.loss.item() == -1.0  # mean of (-1 * 2, -1 * 0)
    assert log_prob.grad.tolist() == [-1.0, 0.0]  # the zero-weight sample gets no gradient


def test_clip_range_scales_with_the_square_root_of_the_latent_size():
    from loop_trl.objective import scaled_clip_range

    assert scaled_clip_range(1e-4, (4, 64, 64)) == 1e-4
    assert math.isclose(scaled_clip_range(1e-4, (4, 16, 16)), 4e-4)  # 16x fewer entries: 4x the range
    assert math.isclose(scaled_clip_range(1e-4, (16, 128, 128)), 2.5e-5)  # SD3-size latents: a quarter
    # the rule holds for the log-prob as computed: the same per-entry shift of the mean moves the
    # mean log-ratio sqrt(D_ref / D) times more on D entries than on D_ref
    from loop_trl.sampling import gaussian_log_prob

    def log_ratio_size(shape):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((256, *shape), generator=generator)
        shift = 0.01 * torch.randn((256, *shape), generator=generator)
        std = torch.ones(())
        return (gaussian_log_prob(x, shift, std) - gaussian_log_prob(x, torch.zeros(()), std)).abs().mean().item()

    measured = log_ratio_size((4, 16, 16)) / log_ratio_size((4, 64, 64))
    assert 3.4 < measured < 4.6, measured
