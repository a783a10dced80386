"""The solvable linear model of copying: closed-form population Delta E along DMD training."""

from __future__ import annotations

import pytest
import torch

from dmdcopy.errors import ConfigError
from dmdcopy.experiments.linear import linear_dmd, power_law_teacher, teacher_map
from dmdcopy.metrics import gaussian_delta_e, pairing_inefficiency
from dmdcopy.noise import noise_for_seeds
from dmdcopy.samplers import heun, teacher_ode


def test_teacher_map_is_the_exact_ode_map_and_the_sampler_agrees():
    T = power_law_teacher(6, seed=1)
    B = teacher_map(T)
    z = noise_for_seeds(range(64), (6,)).double()
    torch.testing.assert_close(z @ B.T, T.ode_map(z))
    grid = torch.cat([torch.logspace(torch.log10(torch.tensor(80.0)), -3, 200, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(teacher_ode(T, z, grid, heun), z @ B.T, rtol=1e-3, atol=1e-3)
    assert torch.allclose(B, B.T)  # symmetric: Sigma^1/2 up to the sigma_max correction


def test_closed_form_along_training_agrees_with_the_sample_bracket():
    T = power_law_teacher(8, seed=2)
    B = teacher_map(T)
    for init in ("teacher", "scratch"):
        run, A = linear_dmd(T, init=init, steps=150, lr=1e-2, batch=256, record_every=50, seed=3,
                            return_matrix=True)
        assert run.steps == [0, 50, 100, 150] and len(run.delta_e) == 4
        population = gaussian_delta_e(A, B)
        assert run.delta_e[-1] == pytest.approx(population.delta_e)
        z = torch.randn(2000, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        r = pairing_inefficiency((z @ A.T).float(), (z @ B.T).float(), n_boot=200)
        assert r.bracket_low - 0.02 <= population.delta_e <= r.bracket_high + 0.02, (init, r.bracket)
        assert run.w2[-1] < 0.1 * run.w2[0] + 1e-3  # DMD matched the law


def test_an_exact_gradient_keeps_the_teacher_pairing_and_noise_does_not():
    # From DMD2's initialisation (A_0 = S Sigma (Sigma + S^2)^-1, aligned with the teacher), the
    # expected DMD gradient keeps A in the teacher's eigenbasis; only gradient noise rotates it, and
    # the distribution-matching objective has no force that rotates it back.
    T = power_law_teacher(8, seed=0)
    sgd = torch.optim.SGD
    exact = linear_dmd(T, steps=40, lr=3.0, optimizer=sgd, batch=65536, record_every=40)
    noisy = linear_dmd(T, steps=40, lr=3.0, optimizer=sgd, batch=1024, record_every=40)
    assert exact.delta_e[0] == pytest.approx(0.0, abs=1e-12)
    assert exact.delta_e[-1] < 0.02 < 0.2 < noisy.delta_e[-1]


def test_bad_settings_are_refused():
    T = power_law_teacher(2)
    with pytest.raises(ConfigError, match="init"):
        linear_dmd(T, init="random")
    with pytest.raises(ConfigError, match="lr"):
        linear_dmd(T, lr=-1.0)
    with pytest.raises(ConfigError, match="steps"):
        linear_dmd(T, steps=0)
