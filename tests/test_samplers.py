"""Samplers against the exact probability-flow map of Gaussian data, and their contracts."""

import functools
import math

import numpy as np
import pytest
import torch

from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.samplers import dpmpp_2m, edm_stochastic, euler, heun, teacher_ode
from dmdcopy.schedules import karras_sigmas
from dmdcopy.teachers import GaussianMixtureTeacher, GaussianTeacher

SOLVERS = [euler, heun, dpmpp_2m, edm_stochastic]


@pytest.fixture(scope="module")
def gauss() -> GaussianTeacher:
    """A 4-D non-isotropic Gaussian with a rotated covariance (eigenvalues 0.04 .. 1)."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    lam = torch.tensor([0.04, 0.1, 0.3, 1.0], dtype=torch.float64)
    return GaussianTeacher(torch.tensor([0.3, -0.2, 0.1, 0.5]), (Q * lam) @ Q.T)


def _z(n: int = 32, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(2), dtype=dtype)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).double().pow(2).sum(1).sqrt().max().item()


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda f: f.__name__)
def test_endpoint_converges_to_closed_form_map(gauss, solver):
    z = _z()
    exact = gauss.ode_map(z)  # from sigma_max = 80 to 0
    errs = [_err(teacher_ode(gauss, z, karras_sigmas(n), solver=solver), exact) for n in (16, 64, 256)]
    # 4x the steps: the error falls ~4x for a first-order solver, ~16x for a second-order one
    assert errs[1] / errs[2] > (3.0 if solver is euler else 10.0)
    assert errs[0] > errs[1] and errs[2] < (0.05 if solver is euler else 1e-3)


def _order(solver, gauss, ns, sigma_max=2.0, sigma_min=0.05) -> float:
    """Slope of log error vs log steps on a Karras grid from sigma_max to sigma_min (no step to 0)."""
    z = _z()
    x = sigma_max * z
    exact = gauss.ode_map_from(x, sigma_max, sigma_min)
    errs = [_err(solver(gauss, x, karras_sigmas(n, sigma_min, sigma_max)[:-1]), exact) for n in ns]
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


def test_convergence_order_euler_is_one(gauss):
    assert _order(euler, gauss, [16, 32, 64, 128]) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("solver", [heun, dpmpp_2m], ids=lambda f: f.__name__)
def test_convergence_order_second_order_solvers(gauss, solver):
    assert _order(solver, gauss, [16, 32, 64, 128]) == pytest.approx(2.0, abs=0.25)


def test_partial_grid_stops_at_its_last_sigma(gauss):
    x = 3.0 * _z()
    grid = karras_sigmas(200, 0.5, 3.0)[:-1]
    assert _err(heun(gauss, x, grid), gauss.ode_map_from(x, 3.0, 0.5)) < 1e-4
    assert _err(heun(gauss, x, grid), gauss.ode_map_from(x, 3.0, 0.0)) > 0.1


def test_stochastic_without_churn_equals_heun(gauss):
    x = 80 * _z()
    sig = karras_sigmas(12)
    assert torch.equal(edm_stochastic(gauss, x, sig, S_churn=0.0), heun(gauss, x, sig))
    # churn confined to a range the grid never visits is also no churn
    out = edm_stochastic(gauss, x, sig, S_churn=40.0, S_min=100.0, S_max=200.0)
    assert torch.equal(out, heun(gauss, x, sig))


def test_stochastic_churn_uses_per_sample_generators(gauss):
    x = 80 * _z(6)
    sig = karras_sigmas(10)
    seeds = [11, 12, 13, 14, 15, 16]

    def run(rows):
        gens = [torch.Generator().manual_seed(seeds[r]) for r in rows]
        return edm_stochastic(gauss, x[rows], sig, S_churn=20.0, generator=gens)

    full = run(list(range(6)))
    part = torch.cat([run([3, 4, 5]), run([0, 1, 2])])
    torch.testing.assert_close(part, torch.cat([full[3:], full[:3]]), rtol=0, atol=1e-12)
    assert not torch.allclose(full, heun(gauss, x, sig))  # churn did something
    # a single generator: reproducible
    a = edm_stochastic(gauss, x, sig, S_churn=20.0, generator=torch.Generator().manual_seed(0))
    b = edm_stochastic(gauss, x, sig, S_churn=20.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="one per sample"):
        edm_stochastic(gauss, x, sig, S_churn=1.0, generator=[torch.Generator()])


@pytest.mark.parametrize(
    "S_churn, S_min, S_max, S_noise, expected_gamma",
    [
        (0.3, 0.0, float("inf"), 1.0, 0.3),  # gamma = S_churn / N, one step here
        (5.0, 0.0, float("inf"), 1.007, math.sqrt(2) - 1),  # capped at sqrt(2) - 1
        (0.3, 0.0, 2.5, 1.0, 0.0),  # sigma_0 = 3 lies above S_max: no churn
        (0.3, 3.5, 10.0, 1.0, 0.0),  # ... or below S_min
    ],
)
def test_churn_step_is_edm_algorithm_2(S_churn, S_min, S_max, S_noise, expected_gamma):
    """Closed form of one churned step. With D = 0 (data at the origin) a Heun step from sigma_hat to
    sigma_1 > 0 is exact, x_1 = x_hat sigma_1 / sigma_hat, where x_hat = x + S_noise
    sqrt(sigma_hat^2 - sigma_0^2) eps (EDM Alg. 2, lines 4-5) and eps is the generator's draw."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s0, s1 = 3.0, 1.0
    seen = []
    out = edm_stochastic(lambda x, sigma: torch.zeros_like(x), x, [s0, s1], S_churn=S_churn,
                         S_min=S_min, S_max=S_max, S_noise=S_noise,
                         generator=torch.Generator().manual_seed(7), callback=seen.append)
    s_hat = s0 * (1 + expected_gamma)
    assert seen[0]["sigma_hat"] == pytest.approx(s_hat, rel=1e-15)
    eps = torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float32).double()
    x_hat = x + S_noise * math.sqrt(s_hat**2 - s0**2) * eps
    torch.testing.assert_close(seen[0]["x"], x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, x_hat * s1 / s_hat, rtol=1e-12, atol=1e-12)


def test_stochastic_sampler_samples_the_data_distribution(gauss):
    """With churn the path is random, but the endpoint law is still N(mu, Sigma)."""
    n = 4000
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = edm_stochastic(gauss, 80 * z, karras_sigmas(64), S_churn=30.0, S_min=0.05, S_max=50.0,
                       generator=torch.Generator().manual_seed(6))
    cov = torch.cov(x.T)
    # 4000 samples: entries of the sample covariance have std <= sqrt(2/n) * max eig ~ 0.02
    assert (cov - gauss.cov).abs().max().item() < 0.1
    assert (x.mean(0) - gauss.mean).abs().max().item() < 0.1


def test_teacher_ode_default_grid_uses_35_evaluations(gauss):
    calls = []

    def D(x, sigma):
        calls.append(sigma[0].item())
        return gauss(x, sigma)

    teacher_ode(D, _z(2))
    assert len(calls) == 35
    assert calls[0] == pytest.approx(80.0) and min(calls) == pytest.approx(0.002)
    calls.clear()
    teacher_ode(D, _z(2), solver=euler)
    assert len(calls) == 18


def test_teacher_ode_clamps_default_grid_to_denoiser_range(gauss):
    T = GaussianTeacher(gauss.mean, gauss.cov, sigma_max=10.0)
    seen = []
    teacher_ode(T, _z(2), callback=lambda d: seen.append(d["sigma"]))
    assert seen[0] == pytest.approx(10.0)


def test_teacher_ode_is_deterministic_and_starts_at_sigma_max_z(gauss):
    z = _z(4)
    first = []
    out1 = teacher_ode(gauss, z, karras_sigmas(8), callback=lambda d: first.append(d["x"]))
    out2 = teacher_ode(gauss, z, karras_sigmas(8))
    assert torch.equal(out1, out2)
    torch.testing.assert_close(first[0], 80 * z)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda f: f.__name__)
def test_callback_reports_every_step(gauss, solver):
    steps = []
    solver(gauss, 80 * _z(3), karras_sigmas(5), callback=steps.append)
    assert [s["i"] for s in steps] == list(range(5))
    grid = karras_sigmas(5).tolist()
    for s in steps:
        assert {"i", "x", "sigma", "sigma_next", "denoised"} <= set(s)
        assert s["sigma_next"] == grid[s["i"] + 1]
        assert s["denoised"].shape == (3, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda f: f.__name__)
def test_dtype_and_device_follow_input(gauss, solver, dtype):
    seen = []

    def D(x, sigma):
        seen.append((x.dtype, sigma.dtype, sigma.device, sigma.shape))
        return gauss(x, sigma)

    z = _z(8, dtype)
    out = teacher_ode(D, z, karras_sigmas(6, dtype=torch.float32), solver=solver)
    assert out.dtype == dtype and out.device == z.device and out.shape == z.shape
    assert set(seen) == {(dtype, dtype, z.device, (8,))}
    # same solver and grid in float64: only the rounding of the input dtype differs
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 0.2}[dtype]
    reference = teacher_ode(gauss, z.double(), karras_sigmas(6, dtype=torch.float32).double(), solver=solver)
    assert _err(out, reference) < tol


def test_float32_endpoint_matches_float64(gauss):
    z = _z(16)
    a = teacher_ode(gauss, z.float(), karras_sigmas(32))
    b = teacher_ode(gauss, z, karras_sigmas(32))
    assert _err(a, b) < 1e-4


def test_samplers_do_not_disable_autograd(gauss):
    z = _z(3).requires_grad_()
    out = teacher_ode(gauss, z, karras_sigmas(4))
    out.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_class_labels_reach_the_denoiser():
    T = GaussianMixtureTeacher(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.1, 0.1]),
                               conditional=True)
    z = torch.zeros(4, 2, dtype=torch.float64)  # the symmetric point: only the label decides
    labels = torch.tensor([0, 1, 1, 0])
    m = torch.tensor([-2.0, 2.0, 2.0, -2.0], dtype=torch.float64)
    # within component k the map is Gaussian: x(0) = m_k + sqrt(v / (v + S^2)) (S z - m_k)
    expected = m - m * math.sqrt(0.01 / (0.01 + 80.0**2))
    for solver in SOLVERS:
        out = teacher_ode(T, z, karras_sigmas(32), solver=solver, class_labels=labels)
        torch.testing.assert_close(out[:, 0], expected, atol=1e-3, rtol=0)


def test_solver_as_partial_with_options(gauss):
    solver = functools.partial(edm_stochastic, S_churn=0.0)
    torch.testing.assert_close(teacher_ode(gauss, _z(2), solver=solver), teacher_ode(gauss, _z(2)))


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda f: f.__name__)
def test_bad_inputs_raise_with_what_was_expected(gauss, solver):
    x = torch.zeros(2, 4)
    with pytest.raises(ShapeError, match=r"\(B, \.\.\.\)"):
        solver(gauss, torch.zeros(4), [1.0, 0.0])
    with pytest.raises(ShapeError, match="1-D"):
        solver(gauss, x, torch.ones(2, 2))
    with pytest.raises(ShapeError, match="at least 2 entries"):
        solver(gauss, x, [1.0])
    with pytest.raises(ConfigError, match="strictly decreasing"):
        solver(gauss, x, [1.0, 2.0, 0.0])
    with pytest.raises(ConfigError, match="strictly decreasing"):
        solver(gauss, x, [1.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="finite"):
        solver(gauss, x, [math.inf, 1.0, 0.0])
    with pytest.raises(ConfigError, match=">= 0"):
        solver(gauss, x, [1.0, -1.0])
    with pytest.raises(ShapeError, match=r"expected x of shape \(B, 4\)"):
        solver(gauss, torch.zeros(2, 3), [1.0, 0.0])  # wrong channel count, caught by the teacher
    with pytest.raises(ShapeError, match="denoiser returned shape"):
        solver(lambda x, s: x[:, :2], x, [1.0, 0.5, 0.0])
    assert issubclass(ShapeError, ValueError) and issubclass(ConfigError, ValueError)


def test_bad_churn_parameters(gauss):
    with pytest.raises(ConfigError, match="S_churn"):
        edm_stochastic(gauss, torch.zeros(2, 4), [1.0, 0.0], S_churn=-1.0)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda f: f.__name__)
def test_device_follows_input_on_the_meta_device(solver):
    """The meta device has no data: any step that read a value back to the host would fail here."""
    seen = []

    def D(x, sigma):
        seen.append((sigma.device, sigma.dtype, x.device))
        return x * 0.5

    x = torch.empty(5, 3, device="meta")
    out = solver(D, x, karras_sigmas(4), S_churn=10.0) if solver is edm_stochastic else solver(
        D, x, karras_sigmas(4))
    assert out.device.type == "meta" and out.shape == (5, 3)
    assert {(s.type, dt, xd.type) for s, dt, xd in seen} == {("meta", torch.float32, "meta")}


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda f: f.__name__)
def test_conditional_steps_read_nothing_back_on_the_meta_device(solver):
    """Integer class labels on an accelerator: the wrapper's label check must not read values back."""
    from dmdcopy.nets.mlp import MLP
    from dmdcopy.precond import EDMPrecond

    D = EDMPrecond(MLP(3, hidden=8, depth=1, emb_dim=4, label_dim=4)).to("meta")
    x = torch.empty(5, 3, device="meta")
    labels = torch.empty(5, dtype=torch.long, device="meta")
    kw = dict(S_churn=10.0) if solver is edm_stochastic else {}
    out = solver(D, x, karras_sigmas(4), class_labels=labels, **kw)
    assert out.device.type == "meta" and out.shape == (5, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_make_no_host_device_sync():
    T = GaussianMixtureTeacher(torch.randn(4, 3), torch.full((4,), 0.3)).cuda()
    z = torch.randn(8, 3, device="cuda")
    sigmas = karras_sigmas(6)  # on the CPU, as the samplers ask
    C = GaussianMixtureTeacher(torch.randn(4, 3), torch.full((4,), 0.3), conditional=True).cuda()
    labels = torch.arange(8, device="cuda") % 4
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for solver in (euler, heun, dpmpp_2m):
            out = teacher_ode(T, z, sigmas, solver=solver)
        gens = [torch.Generator(device="cuda").manual_seed(i) for i in range(8)]
        edm_stochastic(T, 80 * z, sigmas, S_churn=5.0, generator=gens)
        # class-conditional, with integer labels on the device (the paper's ImageNet setting)
        for solver in (euler, heun, dpmpp_2m):
            teacher_ode(C, z, sigmas, solver=solver, class_labels=labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and out.dtype == torch.float32
