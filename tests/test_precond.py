"""Preconditioning coefficients against EDM Table 1, and the MLP behind them."""

import math

import pytest
import torch
from torch import nn

from dmdcopy.errors import ShapeError
from dmdcopy.nets.mlp import MLP
from dmdcopy.precond import EDMPrecond, VEPrecond, VPPrecond
from dmdcopy.schedules import vp_sigma

F64 = torch.float64


class Probe(nn.Module):
    """A raw network that records its inputs and returns ``a * x_in + b`` (elementwise)."""

    def __init__(self, a: float = 0.0, b: float = 0.0, sample_shape=(3,), label_dim=0):
        super().__init__()
        self.a, self.b, self.sample_shape, self.label_dim = a, b, sample_shape, label_dim
        self.seen = {}

    def forward(self, x_in, c_noise, class_labels=None):
        self.seen = dict(x_in=x_in, c_noise=c_noise, class_labels=class_labels)
        return self.a * x_in + self.b


def _sigma():
    return torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0], dtype=F64)


def test_edm_coefficients_match_table_1():
    sd = 0.5
    net = Probe(a=1.0, b=0.25)
    D = EDMPrecond(net, sigma_data=sd)
    x = torch.randn(5, 3, dtype=F64)
    sigma = _sigma()
    out = D(x, sigma)
    s = sigma[:, None]
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(net.seen["x_in"], c_in * x)
    torch.testing.assert_close(net.seen["c_noise"], sigma.log() / 4)
    torch.testing.assert_close(out, c_skip * x + c_out * (c_in * x + 0.25))


def test_edm_input_and_target_have_unit_variance():
    """EDM's design: Var(c_in x) = 1 and Var of the effective training target = 1 for x0 ~ sigma_data."""
    sd, sigma = 0.5, _sigma()
    D = EDMPrecond(Probe(), sigma_data=sd)
    c_skip, c_out, c_in, _ = D.coefficients(sigma)
    torch.testing.assert_close(c_in**2 * (sd**2 + sigma**2), torch.ones_like(sigma))
    # target (x0 - c_skip (x0 + sigma n)) / c_out;
    # its variance is ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2
    var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2
    torch.testing.assert_close(var, torch.ones_like(sigma))


def test_zero_network_gives_the_exact_denoiser_of_isotropic_gaussian_data():
    """For x0 ~ N(0, sd^2 I) the posterior mean is sd^2 / (sd^2 + sigma^2) x = c_skip x, i.e. F = 0."""
    sd = 0.5
    D = EDMPrecond(Probe(a=0.0), sigma_data=sd)
    x = torch.randn(5, 3, dtype=F64)
    sigma = _sigma()
    torch.testing.assert_close(D(x, sigma), sd**2 / (sd**2 + sigma[:, None] ** 2) * x)


@pytest.mark.parametrize("precond", [EDMPrecond, VEPrecond, VPPrecond])
def test_denoiser_tends_to_identity_as_sigma_goes_to_zero(precond):
    D = precond(Probe(a=1.0, b=1.0))
    x = torch.randn(3, 3, dtype=F64)
    for s in (1e-4, 1e-7):
        out = D(x, torch.full((3,), s, dtype=F64))
        assert (out - x).abs().max().item() < 10 * s


def test_ve_coefficients_match_table_1():
    net = Probe(a=2.0)
    D = VEPrecond(net)
    assert (D.sigma_min, D.sigma_max) == (0.02, 100.0)
    x, sigma = torch.randn(5, 3, dtype=F64), _sigma()
    out = D(x, sigma)
    torch.testing.assert_close(net.seen["x_in"], x)  # c_in = 1
    torch.testing.assert_close(net.seen["c_noise"], torch.log(0.5 * sigma))
    torch.testing.assert_close(out, x + sigma[:, None] * 2 * x)  # c_skip = 1, c_out = sigma


def test_vp_coefficients_match_table_1():
    net = Probe(a=1.0)
    D = VPPrecond(net)
    x, sigma = torch.randn(5, 3, dtype=F64), _sigma()
    out = D(x, sigma)
    c_in = 1 / (sigma[:, None] ** 2 + 1).sqrt()
    torch.testing.assert_close(net.seen["x_in"], c_in * x)
    # c_noise = (M - 1) t(sigma), with t the inverse of sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
    t = net.seen["c_noise"] / 999
    torch.testing.assert_close(vp_sigma(t), sigma)
    torch.testing.assert_close(out, x - sigma[:, None] * c_in * x)  # c_skip = 1, c_out = -sigma
    assert D.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)))
    assert D.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)))


def test_shape_and_label_errors_say_what_was_expected():
    D = EDMPrecond(Probe())
    with pytest.raises(ShapeError, match=r"sigma of shape \(B,\) = \(2,\)"):
        D(torch.zeros(2, 3), torch.ones(2, 1))
    with pytest.raises(ShapeError, match=r"sigma of shape \(B,\) = \(2,\)"):
        D(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ShapeError, match=r"expected x of shape \(B, 3\)"):
        D(torch.zeros(2, 4), torch.ones(2))  # wrong channel count
    with pytest.raises(ShapeError, match="unconditional"):
        D(torch.zeros(2, 3), torch.ones(2), class_labels=torch.zeros(2, dtype=torch.long))
    C = EDMPrecond(Probe(label_dim=4))
    with pytest.raises(ShapeError, match="conditional"):
        C(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ShapeError, match=r"\(2,\) or \(2, 4\)"):
        C(torch.zeros(2, 3), torch.ones(2), class_labels=torch.zeros(2, 3))
    C(torch.zeros(2, 3), torch.ones(2), class_labels=torch.tensor([1, 3]))
    torch.testing.assert_close(C.model.seen["class_labels"], torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]]))


def test_net_dtype_runs_the_network_in_low_precision():
    net = Probe(a=1.0)
    D = EDMPrecond(net, net_dtype=torch.bfloat16)
    x = torch.randn(2, 3)
    out = D(x, torch.ones(2))
    assert net.seen["x_in"].dtype == torch.bfloat16 and out.dtype == torch.float32


# --- MLP -----------------------------------------------------------------------------------------


def test_mlp_unconditional_behind_precond():
    D = EDMPrecond(MLP(5, hidden=16, depth=2, emb_dim=8))
    assert D.sample_shape == (5,) and D.label_dim == 0
    x = torch.randn(4, 5)
    out = D(x, torch.full((4,), 2.0))
    assert out.shape == (4, 5) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None for p in D.parameters())
    # the output depends on sigma through the embedding, not only through the c_* factors
    F1 = D.model(x, torch.zeros(4))
    F2 = D.model(x, torch.ones(4))
    assert not torch.allclose(F1, F2)
    with pytest.raises(ShapeError, match=r"\(B, 5\)"):
        D(torch.randn(4, 6), torch.ones(4))


def test_mlp_conditional_uses_labels():
    net = MLP(3, hidden=16, depth=1, emb_dim=8, label_dim=4)
    D = EDMPrecond(net)
    assert D.label_dim == 4
    x = torch.randn(1, 3).expand(4, 3)  # one point, four labels
    out = D(x, torch.ones(4), class_labels=torch.tensor([0, 1, 2, 3]))
    assert not torch.allclose(out[0], out[1])
    # integer labels and their one-hot rows give the same output
    onehot = torch.eye(4)[[0, 1, 2, 3]]
    torch.testing.assert_close(out, D(x, torch.ones(4), class_labels=onehot))
    with pytest.raises(ValueError, match="conditional"):
        net(x, torch.ones(4))


def test_mlp_init_kwargs_rebuild_the_same_network():
    net = MLP(3, hidden=8, depth=2, emb_dim=4, label_dim=2)
    clone = MLP(**net.init_kwargs)
    clone.load_state_dict(net.state_dict())
    x, c = torch.randn(3, 3), torch.randn(3)
    labels = torch.eye(2)[[0, 1, 1]]
    torch.testing.assert_close(clone(x, c, labels), net(x, c, labels))


def test_mlp_float64():
    D = EDMPrecond(MLP(2, hidden=8, depth=1, emb_dim=4)).double()
    out = D(torch.randn(3, 2, dtype=F64), torch.ones(3, dtype=F64))
    assert out.dtype == F64


def test_inputs_of_another_precision_run_in_the_networks_precision():
    from dmdcopy.nets import MLP
    from dmdcopy.precond import EDMPrecond

    torch.manual_seed(0)
    D = EDMPrecond(MLP(3, hidden=16, depth=1))  # float32 weights
    x, sigma = torch.randn(4, 3, dtype=torch.float64), torch.full((4,), 0.7, dtype=torch.float64)
    out = D(x, sigma)  # used to fail inside the MLP: float64 input, float32 weights
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, D(x.float(), sigma.float()).double(), rtol=1e-6, atol=1e-6)
