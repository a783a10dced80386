"""Students (one-step, multi-step with backward simulation) and the counter-based RNG."""

import math

import pytest
import torch

from dmdcopy import _rng
from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import MultiStepStudent, OneStepStudent, student_noise


def _denoiser(dim=3):
    return EDMPrecond(MLP(dim, hidden=16, depth=1))


def test_one_step_student_is_the_denoiser_at_sigma_max():
    D = _denoiser()
    G = OneStepStudent(D, sigma_max=80.0)
    z = torch.randn(4, 3)
    torch.testing.assert_close(G(z), D(80.0 * z, torch.full((4,), 80.0)), rtol=0, atol=0)
    assert G.sample_shape == (3,) and G.label_dim == 0
    assert OneStepStudent(D).sigma_max == 80.0  # EDMPrecond's sigma_max is inf -> EDM's 80
    D.sigma_max = 20.0
    assert OneStepStudent(D).sigma_max == 20.0
    with pytest.raises(ShapeError):
        G(torch.randn(4, 2))
    with pytest.raises(ConfigError):
        OneStepStudent(D, sigma_max=-1.0)


def test_multi_step_student_runs_the_documented_recursion():
    D = _denoiser()
    sigmas = (80.0, 2.0, 0.5)
    G = MultiStepStudent(D, sigmas)
    z, noise = torch.randn(5, 3), torch.randn(2, 5, 3)

    def s(v):
        return torch.full((5,), v)

    x0 = D(80.0 * z, s(80.0))
    x1 = D(x0 + 2.0 * noise[0], s(2.0))
    x2 = D(x1 + 0.5 * noise[1], s(0.5))
    torch.testing.assert_close(G(z, noise=noise), x2, rtol=0, atol=0)
    torch.testing.assert_close(G(z, noise=noise, train_step=1), x1, rtol=0, atol=0)
    with pytest.raises(ShapeError):
        G(z, noise=noise[:1])
    with pytest.raises(ConfigError):
        G(z, train_step=3)
    for bad in ([], [1.0, 2.0], [80.0, -1.0]):
        with pytest.raises(ConfigError):
            MultiStepStudent(D, bad)


def test_backward_simulation_differentiates_only_the_trained_step():
    D = _denoiser()
    G = MultiStepStudent(D, (80.0, 1.0))
    z, noise = torch.randn(4, 3), torch.randn(1, 4, 3)
    G(z, noise=noise, train_step=1).sum().backward()
    got = [p.grad.clone() for p in D.parameters()]
    D.zero_grad()
    with torch.no_grad():
        x_in = D(80.0 * z, torch.full((4,), 80.0)) + noise[0]
    D(x_in, torch.ones(4)).sum().backward()
    for a, p in zip(got, D.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_empty_batch():
    G = MultiStepStudent(_denoiser(), (80.0, 1.0))
    assert G(torch.zeros(0, 3)).shape == (0, 3)  # hash_rows used to fail on zero rows
    assert _rng.hash_rows(torch.zeros(0, 2)).shape == (0,)


def test_default_renoise_depends_on_the_sample_only():
    z = torch.randn(6, 2, 3)
    n = student_noise(z, 2)
    assert n.shape == (2, 6, 2, 3)
    assert torch.equal(student_noise(z[[4, 1]], 2), n[:, [4, 1]])  # any batch, any order
    assert not torch.equal(n[0], n[1])  # each step draws its own noise
    big = student_noise(torch.randn(4000, 1), 1).flatten()
    assert abs(big.mean()) < 5 / math.sqrt(4000) and abs(big.std() - 1) < 0.05


def test_counter_rng_matches_reference_and_is_slice_invariant():
    vals = [0, 1, 12345, 2**63 + 5, 2**64 - 1]
    t = torch.tensor([_rng._signed(v) for v in vals])
    assert [int(v) & _rng._MASK64 for v in _rng._mix(t)] == [_rng._mix_int(v) for v in vals]
    key = _rng.derive_key(7, 3, 1)
    assert key != _rng.derive_key(7, 1, 3)  # the order of the counters matters
    full = _rng.normal(key, torch.arange(10), (3, 2))
    assert torch.equal(full[6:9], _rng.normal(key, torch.arange(6, 9), (3, 2)))
    k = _rng.randint(key, torch.arange(20000), 20, 980)
    assert k.min() >= 20 and k.max() <= 980 and len(k.unique()) > 900
    u = _rng.uniform(key, torch.arange(20000), 2)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    z = _rng.normal(key, torch.arange(20000), (3,))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
