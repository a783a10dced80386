"""dmdcopy.losses against closed forms."""

import math

import pytest
import torch
from torch import nn

from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.losses import (
    ClassifierHead,
    FeatureHook,
    dmd_direction,
    dmd_gradient,
    dmd_surrogate_loss,
    dsm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    l2_regression_loss,
    pseudo_huber_loss,
)
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond
from dmdcopy.schedules import edm_weight


def test_dmd_gradient_is_exactly_zero_when_fake_equals_real():
    D = EDMPrecond(MLP(3, hidden=16, depth=1))
    x, noise = torch.randn(5, 3), torch.randn(5, 3)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    with torch.no_grad():
        g = dmd_gradient(x, sigma, D, D, noise=noise)
    assert torch.equal(g, torch.zeros_like(g))


def test_dmd_direction_closed_form_and_per_sample_normaliser():
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    real = torch.randn(4, 2, 3, dtype=torch.float64)
    fake = torch.randn(4, 2, 3, dtype=torch.float64)
    g = dmd_direction(x, real, fake)
    w = (x - real).abs().mean(dim=(1, 2), keepdim=True)  # one normaliser per sample
    torch.testing.assert_close(g, (fake - real) / w)
    # Scaling one sample's distance to the teacher scales only that sample's gradient.
    x2 = x.clone()
    x2[1] = real[1] + 10 * (x[1] - real[1])
    g2 = dmd_direction(x2, real, fake)
    torch.testing.assert_close(g2[1], g[1] / 10)
    torch.testing.assert_close(g2[[0, 2, 3]], g[[0, 2, 3]])


def test_dmd_direction_clamps_and_is_nan_safe():
    x = torch.zeros(2, 3)
    g = dmd_direction(x, x, torch.ones(2, 3), min_normaliser=1e-3)  # w = 0 -> clamped
    torch.testing.assert_close(g, torch.full((2, 3), 1e3))
    fake = torch.ones(2, 3)
    fake[0, 1] = float("nan")
    fake[1, 2] = float("inf")
    g = dmd_direction(torch.ones(2, 3), torch.zeros(2, 3), fake)
    assert torch.isfinite(g).all() and g[0, 1] == 0 and g[1, 2] == 0


def test_surrogate_gradient_is_g_over_numel():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    loss = dmd_surrogate_loss(x, g)
    assert loss.shape == (3,)
    loss.mean().backward()
    torch.testing.assert_close(x.grad, g / x.numel())
    # The value is half the mean square of g per sample.
    torch.testing.assert_close(loss.detach(), 0.5 * (g**2).mean(dim=(1, 2)))


def test_dsm_loss_closed_form():
    x0 = torch.zeros(3, 2)
    denoised = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    sigma = torch.tensor([0.5, 1.0, 2.0])
    loss = dsm_loss(denoised, x0, sigma, weighting=edm_weight, sigma_data=0.5)
    expected = (sigma**-2 + 0.5**-2) * torch.tensor([1.0, 2.0, 0.0])
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ShapeError, match="sigma"):
        dsm_loss(denoised, x0, sigma[:2])


def test_gan_losses_closed_form():
    zeros = torch.zeros(4)
    torch.testing.assert_close(gan_discriminator_loss(zeros, zeros), torch.full((4,), 2 * math.log(2)))
    torch.testing.assert_close(gan_generator_loss(zeros.unsqueeze(1)), torch.full((4,), math.log(2)))
    # Confident, correct discriminator: loss near 0; the generator's loss is then large.
    big = torch.full((4,), 20.0)
    assert gan_discriminator_loss(big, -big).max() < 1e-8
    torch.testing.assert_close(gan_generator_loss(-big), torch.full((4,), 20.0), atol=1e-6, rtol=0)
    with pytest.raises(ShapeError):
        gan_discriminator_loss(torch.zeros(3), torch.zeros(4))


def test_feature_hook_and_classifier_head_on_mlp():
    D = EDMPrecond(MLP(2, hidden=24, depth=2))
    hook = FeatureHook(D, "model.blocks.1.fc2")
    D(torch.randn(6, 2), torch.ones(6))
    feats = hook.pop()
    assert feats.shape == (6, 24)
    with pytest.raises(RuntimeError, match="no forward"):
        hook.pop()
    head = ClassifierHead(tuple(feats.shape[1:]))
    logits = head(feats)
    assert logits.shape == (6,)
    # Gradients reach the fake score's parameters through the hooked features.
    gan_generator_loss(logits).mean().backward()
    assert D.model.blocks[0].fc1.weight.grad is not None
    hook.remove()
    D(torch.randn(2, 2), torch.ones(2))
    assert hook.features is None
    with pytest.raises(ConfigError, match="no submodule"):
        FeatureHook(D, "model.nope")


def test_classifier_head_on_image_features():
    class TinyUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.mid = nn.Conv2d(8, 8, 3, padding=1)
            self.dec = nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)

        def forward(self, x):
            return self.dec(self.mid(self.enc(x)))

    net = TinyUNet()
    hook = FeatureHook(net, "mid")
    net(torch.randn(2, 3, 8, 8))
    feats = hook.pop()
    head = ClassifierHead(tuple(feats.shape[1:]))
    assert head(feats).shape == (2,)
    with pytest.raises(ShapeError):
        head(torch.randn(2, 4, 4, 4))


def test_regression_losses():
    x = torch.zeros(2, 4)
    y = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    torch.testing.assert_close(l2_regression_loss(x, y), torch.tensor([1.0, 1.0]))
    # Pseudo-Huber: sqrt(|d|^2 + c^2) - c; quadratic for small errors, linear for large ones.
    c = 0.5
    torch.testing.assert_close(pseudo_huber_loss(x, y, c=c), torch.full((2,), math.sqrt(4.25) - 0.5))
    small = torch.full((1, 4), 1e-4, dtype=torch.float64)
    expected_small = (small**2).sum() / (2 * c)
    torch.testing.assert_close(pseudo_huber_loss(small, 0 * small, c=c)[0].double(), expected_small,
                               rtol=1e-4, atol=0)
    large = torch.full((1, 4), 1e4)
    torch.testing.assert_close(pseudo_huber_loss(large, 0 * large, c=c)[0], torch.tensor(2e4 - c))
    with pytest.raises(ConfigError):
        pseudo_huber_loss(x, y, c=0.0)
    with pytest.raises(ShapeError):
        l2_regression_loss(x, y[:1])
