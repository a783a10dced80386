"""Exact teachers against brute-force posterior means and closed forms."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.teachers import EmpiricalTeacher, GaussianMixtureTeacher, GaussianTeacher

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cov(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    A = torch.randn(d, rank or d, generator=_gen(seed), dtype=F64)
    return A @ A.T / d


# --- Gaussian -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [None, 2])  # full rank, and a singular 4x4 covariance of rank 2
def test_gaussian_denoiser_matches_linear_algebra(rank):
    mu, cov = torch.randn(4, generator=_gen(0), dtype=F64), _cov(4, 1, rank)
    T = GaussianTeacher(mu, cov)
    x = torch.randn(6, 4, generator=_gen(2), dtype=F64)
    sigma = torch.tensor([1e-3, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=F64)
    eye = torch.eye(4, dtype=F64)
    # E[x0 | x] = mu + Sigma (Sigma + sigma^2 I)^{-1} (x - mu)
    expected = torch.stack(
        [mu + cov @ torch.linalg.solve(cov + s**2 * eye, xi - mu) for xi, s in zip(x, sigma)]
    )
    torch.testing.assert_close(T(x, sigma), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(T.cov, cov, rtol=0, atol=1e-12)


def test_gaussian_denoiser_at_sigma_zero_is_identity_even_if_singular():
    T = GaussianTeacher(torch.zeros(3), torch.diag(torch.tensor([1.0, 0.0, 2.0])))
    x = torch.randn(5, 3, dtype=F64)
    torch.testing.assert_close(T(x, torch.zeros(5, dtype=F64)), x)


def test_gaussian_ode_map_solves_the_probability_flow_ode():
    """d x(s) / ds == (x(s) - D(x(s); s)) / s, checked by central differences of the closed form."""
    T = GaussianTeacher(torch.tensor([0.5, -1.0, 0.2]), _cov(3, 3))
    x1 = torch.randn(8, 3, generator=_gen(4), dtype=F64)
    for s in (0.05, 0.7, 3.0):
        h = 1e-5 * s
        xs = T.ode_map_from(x1, 1.0, s)
        deriv = (T.ode_map_from(x1, 1.0, s + h) - T.ode_map_from(x1, 1.0, s - h)) / (2 * h)
        slope = (xs - T(xs, torch.full((8,), s, dtype=F64))) / s
        torch.testing.assert_close(deriv, slope, rtol=1e-6, atol=1e-7)


def test_gaussian_ode_map_composes_inverts_and_pushes_forward():
    T = GaussianTeacher(torch.tensor([1.0, 0.0]), _cov(2, 5))
    x = torch.randn(4, 2, generator=_gen(6), dtype=F64)
    two_legs = T.ode_map_from(T.ode_map_from(x, 5.0, 1.0), 1.0, 0.1)
    torch.testing.assert_close(two_legs, T.ode_map_from(x, 5.0, 0.1))
    torch.testing.assert_close(T.ode_map_from(T.ode_map_from(x, 5.0, 0.0), 0.0, 5.0), x)
    # the map is affine, x(0) = mu + A (S z); its pushforward of N(0, I) has cov
    # S^2 A A^T = Sigma (Sigma + S^2 I)^{-1} S^2 -> Sigma, the data covariance, as S grows
    S = 7.0
    A = T.ode_map_from(torch.eye(2, dtype=F64), S, 0.0) - T.ode_map_from(torch.zeros(1, 2, dtype=F64), S, 0.0)
    pushed = S**2 * A.T @ A
    eye = torch.eye(2, dtype=F64)
    expected = T.cov @ torch.linalg.solve(T.cov + S**2 * eye, eye) * S**2
    torch.testing.assert_close(pushed, expected)


def test_gaussian_ode_map_singular_covariance():
    T = GaussianTeacher(torch.zeros(2), torch.diag(torch.tensor([1.0, 0.0])))
    out = T.ode_map(torch.randn(10, 2, dtype=F64))
    assert out[:, 1].abs().max() == 0  # the degenerate direction lands on the support
    with pytest.raises(ConfigError, match="singular"):
        T.ode_map_from(out, 0.0, 1.0)


def test_gaussian_sampling_statistics_and_reproducibility():
    mu, cov = torch.tensor([1.0, -2.0, 0.5]), _cov(3, 7)
    T = GaussianTeacher(mu, cov)
    x = T.sample(20000, generator=_gen(8), dtype=F64)
    assert x.shape == (20000, 3) and x.dtype == F64
    # sample mean has std sqrt(diag(Sigma) / n) <~ 0.01
    assert (x.mean(0) - mu.double()).abs().max() < 0.05
    assert (torch.cov(x.T) - cov).abs().max() < 0.05
    assert torch.equal(T.sample(5, generator=_gen(9)), T.sample(5, generator=_gen(9)))


def test_gaussian_bad_arguments():
    with pytest.raises(ShapeError, match=r"\(2, 2\)"):
        GaussianTeacher(torch.zeros(2), torch.eye(3))
    with pytest.raises(ConfigError, match="symmetric"):
        GaussianTeacher(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ConfigError, match="positive semi-definite"):
        GaussianTeacher(torch.zeros(2), torch.diag(torch.tensor([1.0, -1.0])))
    T = GaussianTeacher(torch.zeros(2), torch.eye(2))
    with pytest.raises(ShapeError, match=r"sigma of shape \(B,\)"):
        T(torch.zeros(3, 2), torch.ones(3, 1))
    with pytest.raises(ShapeError, match=r"expected x of shape \(B, 2\)"):
        T(torch.zeros(3, 5), torch.ones(3))
    with pytest.raises(ShapeError, match="unconditional"):
        T(torch.zeros(3, 2), torch.ones(3), class_labels=torch.zeros(3, dtype=torch.long))


def test_gaussian_image_shaped():
    T = GaussianTeacher(torch.zeros(12), torch.eye(12), sample_shape=(3, 2, 2))
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(T(x, torch.ones(2)), x / 2)  # lambda / (lambda + 1) = 1/2
    assert T.sample(4).shape == (4, 3, 2, 2)


# --- Gaussian mixture ---------------------------------------------------------------------------


def _brute_force_gmm(x, sigma, means, stds, weights):
    """Posterior mean via full-covariance Gaussians and Bayes' rule, term by term, in float64."""
    out = []
    for xb, s in zip(x.double(), sigma.double()):
        log_p, cond_means = [], []
        for m, sd, w in zip(means.double(), stds.double(), weights.double()):
            C0 = torch.diag(sd**2)
            C = C0 + s**2 * torch.eye(len(m), dtype=F64)
            log_p.append(math.log(w) + MultivariateNormal(m, C).log_prob(xb))
            cond_means.append(m + C0 @ torch.linalg.solve(C, xb - m))
        p = torch.softmax(torch.stack(log_p), 0)
        out.append((p[:, None] * torch.stack(cond_means)).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("diagonal", [False, True])
def test_gmm_denoiser_equals_brute_force_posterior_mean(diagonal):
    K, d = 4, 3
    means = torch.randn(K, d, generator=_gen(10), dtype=F64) * 2
    stds = torch.rand(K, d, generator=_gen(11), dtype=F64) + 0.1
    if not diagonal:
        stds = stds[:, 0].contiguous()
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    T = GaussianMixtureTeacher(means, stds, weights)
    x = torch.randn(7, d, generator=_gen(12), dtype=F64) * 2
    sigma = torch.tensor([1e-3, 0.01, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=F64)
    full_stds = stds if diagonal else stds[:, None].expand(K, d)
    torch.testing.assert_close(T(x, sigma), _brute_force_gmm(x, sigma, means, full_stds, weights),
                               rtol=1e-9, atol=1e-9)


def test_gmm_is_stable_at_tiny_sigma_far_from_data():
    T = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.tensor([1e-3, 1e-3]))
    x = torch.tensor([[0.3, 50.0], [-40.0, 3.0]], dtype=F64)
    out = T(x, torch.full((2,), 1e-6, dtype=F64))
    assert torch.isfinite(out).all()
    # the posterior is all on the nearer mean m (log-odds ~ 1e12); then E = m + v0 / (v0 + s^2) (x - m)
    m = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(out, m + (1e-6 / (1e-6 + 1e-12)) * (x - m), rtol=1e-12, atol=1e-12)


def test_gmm_float32_in_float32_out_with_float64_accuracy():
    T = GaussianMixtureTeacher(torch.randn(3, 2, generator=_gen(13)), torch.tensor([0.2, 0.3, 0.4]))
    x = torch.randn(5, 2, generator=_gen(14))
    s = torch.full((5,), 0.05)
    out = T(x, s)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), T(x.double(), s.double()), rtol=0, atol=1e-6)


def test_conditional_gmm_label_picks_the_component():
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=F64)
    stds = torch.tensor([0.3, 0.5, 0.2], dtype=F64)
    T = GaussianMixtureTeacher(means, stds, conditional=True)
    assert T.label_dim == 3
    x = torch.randn(6, 2, generator=_gen(15), dtype=F64)
    sigma = torch.full((6,), 0.7, dtype=F64)
    k = torch.tensor([0, 1, 2, 2, 1, 0])
    single = torch.stack([GaussianTeacher(means[i], stds[i] ** 2 * torch.eye(2, dtype=F64))(
        x[j:j + 1], sigma[j:j + 1])[0] for j, i in enumerate(k.tolist())])
    torch.testing.assert_close(T(x, sigma, class_labels=k), single)
    # soft labels act as per-sample mixture weights: uniform soft labels = the unconditional mixture
    uncond = GaussianMixtureTeacher(means, stds)
    soft = torch.full((6, 3), 1 / 3, dtype=F64)
    torch.testing.assert_close(T(x, sigma, class_labels=soft), uncond(x, sigma))
    with pytest.raises(ShapeError, match="conditional"):
        T(x, sigma)
    with pytest.raises(ShapeError, match=r"\[0, 3\)"):
        T(x, sigma, class_labels=torch.full((6,), 3))
    xs = T.sample(600, class_labels=torch.full((600,), 2), generator=_gen(16))
    assert (xs.mean(0) - torch.tensor([0.0, 3.0])).abs().max() < 0.05  # std of the mean 0.2/sqrt(600)


def test_gmm_sampling_weights_and_reproducibility():
    T = GaussianMixtureTeacher(
        torch.tensor([[-5.0], [5.0]]), torch.tensor([0.1, 0.1]), torch.tensor([1.0, 3.0])
    )
    x = T.sample(8000, generator=_gen(17))
    frac = (x > 0).double().mean().item()
    assert abs(frac - 0.75) < 0.03  # binomial std 0.005
    assert torch.equal(T.sample(9, generator=_gen(3)), T.sample(9, generator=_gen(3)))


def test_gmm_bad_arguments():
    with pytest.raises(ShapeError, match=r"\(K, d\)"):
        GaussianMixtureTeacher(torch.zeros(3), torch.ones(3))
    with pytest.raises(ShapeError, match=r"\(2,\) or \(2, 3\)"):
        GaussianMixtureTeacher(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ConfigError, match="> 0"):
        GaussianMixtureTeacher(torch.zeros(2, 3), torch.tensor([1.0, 0.0]))
    with pytest.raises(ConfigError, match="non-negative"):
        GaussianMixtureTeacher(torch.zeros(2, 3), torch.ones(2), torch.tensor([1.0, -1.0]))


# --- empirical ----------------------------------------------------------------------------------


def test_empirical_equals_softmax_posterior_mean_whatever_the_chunking():
    data = torch.randn(50, 3, generator=_gen(20))
    x = torch.randn(4, 3, generator=_gen(21))
    sigma = torch.tensor([0.05, 0.3, 1.0, 20.0])
    d2 = ((x.double()[:, None] - data.double()[None]) ** 2).sum(2)  # (B, N)
    w = torch.softmax(-d2 / (2 * sigma.double()[:, None] ** 2), 1)
    expected = (w @ data.double()).float()
    for chunk in (1, 7, 50, 4096):
        torch.testing.assert_close(EmpiricalTeacher(data, chunk)(x, sigma), expected, rtol=1e-6, atol=1e-6)


def test_empirical_returns_nearest_training_point_as_sigma_goes_to_zero():
    data = torch.randn(200, 3, 4, 4, generator=_gen(22))  # image-shaped data
    T = EmpiricalTeacher(data, chunk_size=64)
    x = torch.randn(8, 3, 4, 4, generator=_gen(23))
    nearest = data[((x.flatten(1)[:, None] - data.flatten(1)[None]) ** 2).sum(2).argmin(1)]
    assert torch.equal(T.nearest(x), ((x.flatten(1)[:, None] - data.flatten(1)[None]) ** 2).sum(2).argmin(1))
    for s in (1e-3, 1e-8, 0.0):
        assert torch.equal(T(x, torch.full((8,), s)), nearest)


def test_empirical_large_sigma_gives_data_mean():
    data = torch.randn(30, 2, generator=_gen(24), dtype=F64)
    T = EmpiricalTeacher(data)
    out = T(torch.zeros(1, 2, dtype=F64), torch.tensor([1e6], dtype=F64))
    torch.testing.assert_close(out[0], data.mean(0), rtol=0, atol=1e-6)


def test_empirical_is_the_limit_of_a_gmm_with_vanishing_stds():
    data = torch.randn(10, 2, generator=_gen(25), dtype=F64)
    x = torch.randn(5, 2, generator=_gen(26), dtype=F64)
    sigma = torch.tensor([0.1, 0.3, 1.0, 3.0, 0.05], dtype=F64)
    gmm = GaussianMixtureTeacher(data, torch.full((10,), 1e-7, dtype=F64))
    torch.testing.assert_close(EmpiricalTeacher(data)(x, sigma), gmm(x, sigma), rtol=1e-8, atol=1e-8)


def test_empirical_conditional_restricts_to_class():
    data = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    T = EmpiricalTeacher(data, labels=torch.tensor([0, 0, 1, 1]))
    assert T.label_dim == 2
    x = torch.tensor([[0.9], [0.9]])
    out = T(x, torch.full((2,), 1e-3), class_labels=torch.tensor([0, 1]))
    torch.testing.assert_close(out, torch.tensor([[1.0], [10.0]]))
    drawn = T.sample(100, class_labels=torch.ones(100, dtype=torch.long), generator=_gen(27))
    assert set(drawn.flatten().tolist()) == {10.0, 11.0}
    with pytest.raises(ConfigError, match="no data points"):
        EmpiricalTeacher(data, labels=torch.tensor([0, 0, 2, 2]))


def test_empirical_sampling_draws_training_points():
    data = torch.arange(12.0).reshape(6, 2)
    T = EmpiricalTeacher(data)
    x = T.sample(50, generator=_gen(28))
    assert x.shape == (50, 2)
    assert all(row in data.tolist() for row in x.tolist())
    assert torch.equal(T.sample(5, generator=_gen(1)), T.sample(5, generator=_gen(1)))


def test_empirical_bad_arguments():
    with pytest.raises(ShapeError, match=r"\(N, \.\.\.\)"):
        EmpiricalTeacher(torch.zeros(5))
    T = EmpiricalTeacher(torch.zeros(5, 3, 2, 2))
    with pytest.raises(ShapeError, match=r"expected x of shape \(B, 3, 2, 2\)"):
        T(torch.zeros(2, 4, 2, 2), torch.ones(2))
    with pytest.raises(ConfigError, match="chunk_size"):
        EmpiricalTeacher(torch.zeros(5, 3), chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_teachers_return_the_input_dtype(dtype):
    teachers = [
        GaussianTeacher(torch.zeros(2), torch.eye(2)),
        GaussianMixtureTeacher(torch.randn(3, 2), torch.ones(3)),
        EmpiricalTeacher(torch.randn(5, 2)),
    ]
    x = torch.randn(4, 2).to(dtype)
    for T in teachers:
        out = T(x, torch.ones(4, dtype=dtype))
        assert out.dtype == dtype and out.shape == x.shape


def test_teachers_move_with_to():
    T = GaussianMixtureTeacher(torch.randn(3, 2), torch.ones(3))
    names = {n for n, _ in T.named_buffers()}
    assert {"means", "stds", "weights"} <= names
    E = EmpiricalTeacher(torch.randn(5, 2))
    assert "data" in {n for n, _ in E.named_buffers()}
    assert "data" not in E.state_dict()  # rebuilt from the data, not saved


def test_mixture_log_posterior_is_bayes_rule_in_closed_form():
    # p(k | x) at noise sigma is w_k N(x; m_k, s_k^2 + sigma^2) normalised over k (per coordinate).
    from dmdcopy.teachers import GaussianMixtureTeacher

    means = torch.tensor([[-1.0, 0.0], [2.0, 1.0], [0.5, -2.0]])
    stds = torch.tensor([0.3, 0.8, 0.5])
    weights = torch.tensor([0.2, 0.5, 0.3])
    T = GaussianMixtureTeacher(means, stds, weights)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    sigma = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 80.0], dtype=torch.float64)
    var = stds.double()[None, :] ** 2 + sigma[:, None] ** 2  # (B, K)
    sq = (x[:, None, :] - means.double()[None]).square().sum(2)  # (B, K)
    log_joint = weights.double().log() - 0.5 * sq / var - var.log()  # d = 2: -d/2 log var
    expected = log_joint - log_joint.logsumexp(1, keepdim=True)
    got = T.log_posterior(x.float(), sigma.float())
    assert got.shape == (7, 3) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.exp().sum(1), torch.ones(7, dtype=torch.float64))
