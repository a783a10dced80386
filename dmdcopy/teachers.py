"""Exact denoisers that need no training: Gaussian, Gaussian mixture and empirical data.

Each teacher is an ``nn.Module`` that follows the denoiser contract
``D(x, sigma, class_labels=None) -> E[x0 | x0 + sigma n = x]`` (the exact posterior mean, which is
what a perfectly trained diffusion model's denoiser computes) and samples its own data with
``sample(n, generator=...)``. Attributes ``sample_shape``, ``label_dim``, ``sigma_min`` (0) and
``sigma_max`` (80) match those of :mod:`dmdcopy.precond` wrappers, so a teacher stands in for a
network-with-preconditioning anywhere. Parameters live in buffers, so ``.to(device)`` moves them.

Posterior quantities are computed in float64 (``compute_dtype`` for the empirical teacher) and
returned in the dtype of ``x``; mixture posteriors use log-sum-exp so they stay exact at tiny sigma.

(About 460 lines: three exact teachers, each a closed form with its own checks; they share the
base class and its input checks.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dmdcopy._checks import check_labels, check_sample_shape, check_x_sigma
from dmdcopy.errors import ConfigError, ShapeError

__all__ = ["EmpiricalTeacher", "GaussianMixtureTeacher", "GaussianTeacher"]

_F64 = torch.float64


def _as_f64(t: Tensor | Sequence[float] | float, name: str) -> Tensor:
    t = torch.as_tensor(t).detach()
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ConfigError(f"{name} must be a real tensor, got dtype {t.dtype}")
    t = t.to(_F64)
    if not torch.isfinite(t).all():
        raise ConfigError(f"{name} must be finite")
    return t


def _shape_for(d: int, sample_shape: Sequence[int] | None, name: str) -> tuple[int, ...]:
    if sample_shape is None:
        return (d,)
    shape = tuple(int(s) for s in sample_shape)
    if math.prod(shape) != d:
        raise ConfigError(f"{name}: sample_shape {shape} has {math.prod(shape)} elements, data has {d}")
    return shape


def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


class _Teacher(nn.Module):
    """Shared attributes and input checks of the exact teachers."""

    sample_shape: tuple[int, ...]
    label_dim: int

    def __init__(self, sigma_min: float, sigma_max: float) -> None:
        super().__init__()
        if not 0 <= sigma_min < sigma_max:
            raise ConfigError(f"need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def _inputs(
        self, x: Tensor, sigma: Tensor, class_labels: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Check the contract; return ``x: (B, d)`` and ``sigma: (B, 1)`` in float64, labels ``(B, K)``."""
        name = type(self).__name__
        check_x_sigma(x, sigma, name)
        check_sample_shape(x, self.sample_shape, name)
        labels = check_labels(class_labels, x.shape[0], self.label_dim, name)
        if labels is not None:
            labels = labels.to(device=x.device, dtype=_F64)
        return x.reshape(x.shape[0], -1).to(_F64), sigma.to(_F64).unsqueeze(1), labels

    def extra_repr(self) -> str:
        return (f"sample_shape={self.sample_shape}, label_dim={self.label_dim}, "
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")


class GaussianTeacher(_Teacher):
    """Data ``N(mu, Sigma)``: exact denoiser and exact probability-flow map.

    With ``Sigma = U diag(lambda) U^T`` and ``y = U^T (x - mu)`` the denoiser is
    ``D(x; sigma) = mu + U diag(lambda / (lambda + sigma^2)) y`` and the probability-flow ODE
    ``dx/dsigma = (x - D) / sigma`` decouples into ``dy_k/dsigma = sigma y_k / (lambda_k + sigma^2)``,
    so ``y_k(s) = y_k(S) sqrt((lambda_k + s^2) / (lambda_k + S^2))``. Singular ``Sigma`` is fine:
    the directions with ``lambda_k = 0`` shrink to 0 as ``s -> 0``.

    Args:
        mean: ``(d,)``.
        cov: ``(d, d)`` symmetric positive semi-definite.
        sample_shape: per-sample shape with ``d`` elements (default ``(d,)``).
        sigma_min, sigma_max: the range samplers default to.

    >>> T = GaussianTeacher(torch.zeros(2), torch.diag(torch.tensor([1.0, 4.0])))
    >>> T(torch.tensor([[2.0, 2.0]]), torch.tensor([1.0])).tolist()   # lambda / (lambda + 1) x
    [[1.0, 1.600000023841858]]
    """

    def __init__(
        self,
        mean: Tensor,
        cov: Tensor,
        *,
        sample_shape: Sequence[int] | None = None,
        sigma_min: float = 0.0,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__(sigma_min, sigma_max)
        mean, cov = _as_f64(mean, "mean"), _as_f64(cov, "cov")
        if mean.ndim != 1:
            raise ShapeError(f"GaussianTeacher: expected mean of shape (d,), got {tuple(mean.shape)}")
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ShapeError(f"GaussianTeacher: expected cov of shape ({d}, {d}), got {tuple(cov.shape)}")
        scale = max(cov.abs().max().item(), 1e-300)
        if not torch.allclose(cov, cov.T, rtol=0, atol=1e-10 * scale):
            raise ConfigError("GaussianTeacher: cov must be symmetric")
        eigvals, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        if eigvals.min() < -1e-10 * scale:
            raise ConfigError(f"GaussianTeacher: cov must be positive semi-definite, smallest eigenvalue "
                              f"{eigvals.min().item():.3g}")
        self.sample_shape = _shape_for(d, sample_shape, "GaussianTeacher")
        self.label_dim = 0
        self.register_buffer("mean", mean)
        self.register_buffer("eigvals", eigvals.clamp_min(0))  # (d,) lambda, ascending
        self.register_buffer("eigvecs", eigvecs)  # (d, d) U, columns are eigenvectors

    @property
    def cov(self) -> Tensor:
        """``(d, d)`` Sigma rebuilt from its eigendecomposition (float64)."""
        U, lam = self.eigvecs.to(_F64), self.eigvals.to(_F64)
        return (U * lam) @ U.T

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``x: (B, *sample_shape)``, ``sigma: (B,)`` -> ``E[x0 | x]``, same shape and dtype as ``x``."""
        x64, s, _ = self._inputs(x, sigma, class_labels)
        mu, U, lam = self.mean.to(_F64), self.eigvecs.to(_F64), self.eigvals.to(_F64)
        den = lam + s**2  # (B, d)
        shrink = torch.where(den > 0, lam / den.where(den > 0, 1.0), 1.0)  # D(x; 0) = x
        out = mu + ((x64 - mu) @ U * shrink) @ U.T
        return out.reshape(x.shape).to(x.dtype)

    def ode_map_from(self, x: Tensor, s_from: float, s_to: float) -> Tensor:
        """Exact probability-flow map of ``x: (B, *sample_shape)`` from level ``s_from`` to ``s_to``.

        Either direction; ``s_from = 0`` needs a non-singular ``Sigma``. Returns ``x``'s dtype.
        """
        if isinstance(x, Tensor) and x.ndim >= 1:
            check_sample_shape(x, self.sample_shape, "GaussianTeacher.ode_map_from")
        else:
            raise ShapeError(f"GaussianTeacher.ode_map_from: expected x of shape (B, {self.sample_shape})")
        s_from, s_to = float(s_from), float(s_to)
        if s_from < 0 or s_to < 0:
            raise ConfigError(f"noise levels must be >= 0, got s_from={s_from}, s_to={s_to}")
        mu, U, lam = self.mean.to(_F64), self.eigvecs.to(_F64), self.eigvals.to(_F64)
        den = lam + s_from**2
        if (den <= 0).any():
            raise ConfigError("GaussianTeacher.ode_map_from: from s_from = 0 the map of a singular "
                              "covariance is not defined")
        factor = ((lam + s_to**2) / den).sqrt()  # (d,)
        x64 = x.reshape(x.shape[0], -1).to(_F64)
        out = mu + ((x64 - mu) @ U * factor) @ U.T
        return out.reshape(x.shape).to(x.dtype)

    def ode_map(self, z: Tensor, sigma_max: float | None = None, sigma_end: float = 0.0) -> Tensor:
        """The exact teacher map ``z -> x(sigma_end)`` of the ODE started at ``x(S) = S z``.

        ``z: (B, *sample_shape)`` standard normal; ``S`` defaults to ``self.sigma_max``.
        """
        S = self.sigma_max if sigma_max is None else float(sigma_max)
        return self.ode_map_from(z * S, S, sigma_end)

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``n`` draws of ``N(mu, Sigma)``: ``(n, *sample_shape)`` on the teacher's device."""
        if class_labels is not None:
            raise ShapeError("GaussianTeacher.sample: the teacher is unconditional; got class_labels")
        device = self.mean.device
        eps = torch.randn(n, self.mean.shape[0], generator=generator,
                          device=_draw_device(generator, device), dtype=_F64).to(device)
        x = self.mean.to(_F64) + (eps * self.eigvals.to(_F64).sqrt()) @ self.eigvecs.to(_F64).T
        return x.reshape(n, *self.sample_shape).to(dtype)


class GaussianMixtureTeacher(_Teacher):
    """Data ``sum_k w_k N(m_k, diag(s_k^2))``: exact denoiser, optionally one class per component.

    With ``v_k = s_k^2 + sigma^2`` (per coordinate), the posterior over components is
    ``p(k | x) ∝ w_k N(x; m_k, diag(v_k))`` (computed as a log-sum-exp) and
    ``D(x; sigma) = sum_k p(k | x) (m_k + s_k^2 / v_k (x - m_k))``.

    Args:
        means: ``(K, d)``.
        stds: ``(K,)`` isotropic or ``(K, d)`` diagonal standard deviations, all > 0.
        weights: ``(K,)`` non-negative, normalised here; default uniform.
        conditional: if True, ``label_dim = K`` and the class label picks the component (soft
            labels ``(B, K)`` act as per-sample mixture weights).
        sample_shape: per-sample shape with ``d`` elements (default ``(d,)``).

    >>> T = GaussianMixtureTeacher(torch.tensor([[-1.0], [1.0]]), torch.tensor([0.1, 0.1]))
    >>> T.sample(4, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([4, 1])
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor,
        weights: Tensor | None = None,
        conditional: bool = False,
        *,
        sample_shape: Sequence[int] | None = None,
        sigma_min: float = 0.0,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__(sigma_min, sigma_max)
        means, stds = _as_f64(means, "means"), _as_f64(stds, "stds")
        if means.ndim != 2:
            raise ShapeError(
                f"GaussianMixtureTeacher: expected means of shape (K, d), got {tuple(means.shape)}"
            )
        K, d = means.shape
        if stds.shape == (K,):
            stds = stds.unsqueeze(1).expand(K, d)
        if stds.shape != (K, d):
            raise ShapeError(f"GaussianMixtureTeacher: expected stds of shape ({K},) or ({K}, {d}), "
                             f"got {tuple(stds.shape)}")
        if (stds <= 0).any():
            raise ConfigError("GaussianMixtureTeacher: stds must be > 0 (use EmpiricalTeacher for points)")
        weights = torch.full((K,), 1.0 / K, dtype=_F64) if weights is None else _as_f64(weights, "weights")
        if weights.shape != (K,):
            raise ShapeError(f"GaussianMixtureTeacher: expected weights of shape ({K},), "
                             f"got {tuple(weights.shape)}")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ConfigError("GaussianMixtureTeacher: weights must be non-negative with a positive sum")
        self.sample_shape = _shape_for(d, sample_shape, "GaussianMixtureTeacher")
        self.conditional = bool(conditional)
        self.label_dim = K if conditional else 0
        self.register_buffer("means", means)  # (K, d)
        self.register_buffer("stds", stds.contiguous())  # (K, d)
        self.register_buffer("weights", weights / weights.sum())  # (K,)

    def log_posterior(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``log p(k | x)`` at noise level ``sigma``: ``(B, K)`` float64."""
        x64, s, labels = self._inputs(x, sigma, class_labels)
        return self._log_posterior(x64, s, labels)

    def _log_posterior(self, x64: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        m, sd = self.means.to(_F64), self.stds.to(_F64)
        var = sd**2 + s.unsqueeze(2) ** 2  # (B, K, d): s (B, 1) -> (B, 1, 1)
        diff = x64.unsqueeze(1) - m  # (B, K, d)
        log_lik = -0.5 * ((diff**2 / var) + var.log()).sum(2)  # (B, K), up to a constant in k
        prior = labels if labels is not None else self.weights.to(_F64).expand_as(log_lik)
        logits = log_lik + prior.log()
        return logits - logits.logsumexp(1, keepdim=True)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``x: (B, *sample_shape)``, ``sigma: (B,)`` -> ``E[x0 | x]``, same shape and dtype as ``x``."""
        x64, s, labels = self._inputs(x, sigma, class_labels)
        post = self._log_posterior(x64, s, labels).exp()  # (B, K)
        m, sd = self.means.to(_F64), self.stds.to(_F64)
        var0 = sd**2
        shrink = var0 / (var0 + s.unsqueeze(2) ** 2)  # (B, K, d)
        comp_mean = m + shrink * (x64.unsqueeze(1) - m)  # (B, K, d): E[x0 | x, k]
        out = torch.einsum("bk,bkd->bd", post, comp_mean)
        return out.reshape(x.shape).to(x.dtype)

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``n`` draws: ``(n, *sample_shape)``. A conditional teacher needs ``class_labels: (n,)``."""
        device = self.means.device
        draw = _draw_device(generator, device)
        K, d = self.means.shape
        if self.conditional:
            if class_labels is None or class_labels.shape != (n,) or class_labels.is_floating_point():
                raise ShapeError(f"GaussianMixtureTeacher.sample: a conditional teacher needs integer "
                                 f"class_labels of shape ({n},)")
            if n and (int(class_labels.min()) < 0 or int(class_labels.max()) >= K):
                raise ShapeError(f"GaussianMixtureTeacher.sample: class indices must lie in [0, {K})")
            k = class_labels.to(device=device, dtype=torch.long)
        else:
            if class_labels is not None:
                raise ShapeError(
                    "GaussianMixtureTeacher.sample: the teacher is unconditional; got class_labels"
                )
            k = torch.multinomial(self.weights.to(device=draw, dtype=_F64), n, replacement=True,
                                  generator=generator).to(device)
        eps = torch.randn(n, d, generator=generator, device=draw, dtype=_F64).to(device)
        x = self.means.to(_F64)[k] + self.stds.to(_F64)[k] * eps
        return x.reshape(n, *self.sample_shape).to(dtype)


class EmpiricalTeacher(_Teacher):
    """The memorising denoiser of a finite data set ``{y_n}``: the exact ``E[x0 | x]`` under the
    empirical distribution, ``D(x; sigma) = sum_n softmax_n(-||x - y_n||^2 / (2 sigma^2)) y_n``.

    The softmax runs over ``N`` in chunks of ``chunk_size`` with an online log-sum-exp, so memory is
    ``O(B * chunk_size + B * dim)`` whatever ``N`` (50 000 x 3072 fits). As ``sigma -> 0`` it
    returns the nearest training point; at ``sigma = 0`` exactly, the nearest point too.

    Args:
        data: ``(N, ...)`` training set; ``sample_shape = data.shape[1:]`` (vectors or images).
        chunk_size: data rows per chunk.
        labels: optional ``(N,)`` integer classes; the teacher is then conditional
            (``label_dim = labels.max() + 1`` unless given) and a class label restricts the
            softmax to that class's points.
        compute_dtype: dtype of the distances and softmax (float64 by default; float32 is faster
            on accelerators and less exact at tiny sigma).

    >>> T = EmpiricalTeacher(torch.tensor([[0.0], [1.0]]))
    >>> T(torch.tensor([[0.9]]), torch.tensor([1e-3])).tolist()
    [[1.0]]
    """

    def __init__(
        self,
        data: Tensor,
        chunk_size: int = 4096,
        *,
        labels: Tensor | None = None,
        label_dim: int | None = None,
        compute_dtype: torch.dtype = torch.float64,
        sigma_min: float = 0.0,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__(sigma_min, sigma_max)
        if not isinstance(data, Tensor) or data.ndim < 2 or data.shape[0] < 1:
            shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ShapeError(f"EmpiricalTeacher: expected data of shape (N, ...) with N >= 1, got {shape}")
        if not data.is_floating_point():
            data = data.to(torch.float32)
        if not torch.isfinite(data).all():
            raise ConfigError("EmpiricalTeacher: data must be finite")
        if int(chunk_size) < 1:
            raise ConfigError(f"EmpiricalTeacher: chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.compute_dtype = compute_dtype
        self.sample_shape = tuple(data.shape[1:])
        flat = data.detach().reshape(data.shape[0], -1).contiguous()  # (N, dim)
        # Not in the state dict: a teacher is rebuilt from its data, and 50k images would bloat it.
        self.register_buffer("data", flat, persistent=False)
        self.register_buffer("half_sq_norms", 0.5 * (flat.to(_F64) ** 2).sum(1), persistent=False)
        if labels is None:
            if label_dim:
                raise ConfigError("EmpiricalTeacher: label_dim needs labels")
            self.label_dim = 0
            self.register_buffer("labels", None, persistent=False)
        else:
            labels = torch.as_tensor(labels, device=flat.device)
            if labels.shape != (flat.shape[0],) or labels.is_floating_point():
                raise ShapeError(f"EmpiricalTeacher: expected integer labels of shape ({flat.shape[0]},), "
                                 f"got {tuple(labels.shape)} {labels.dtype}")
            K = int(label_dim) if label_dim is not None else int(labels.max()) + 1
            if labels.min() < 0 or labels.max() >= K:
                raise ConfigError(f"EmpiricalTeacher: labels must lie in [0, {K})")
            counts = torch.bincount(labels.long().cpu(), minlength=K)
            if (counts == 0).any():
                empty = torch.nonzero(counts == 0).flatten().tolist()
                raise ConfigError(f"EmpiricalTeacher: classes {empty} have no data points")
            self.label_dim = K
            self.register_buffer("labels", labels.long(), persistent=False)
            # points sorted by class, and where each class starts: uniform draws within a class
            self.register_buffer("_by_class", torch.argsort(labels.long(), stable=True), persistent=False)
            starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
            self.register_buffer("_class_start", starts.to(flat.device), persistent=False)
            self.register_buffer("_class_count", counts.to(flat.device), persistent=False)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``x: (B, *sample_shape)``, ``sigma: (B,)`` -> ``E[x0 | x]``, same shape and dtype as ``x``."""
        name = type(self).__name__
        check_x_sigma(x, sigma, name)
        check_sample_shape(x, self.sample_shape, name)
        onehot = check_labels(class_labels, x.shape[0], self.label_dim, name)
        cd = self.compute_dtype
        xf = x.reshape(x.shape[0], -1).to(cd)  # (B, dim)
        # logit_n = -(||x - y_n||^2 - ||x||^2) / (2 sigma^2); sigma = 0 is the limit (a huge 1/sigma^2).
        inv_var = 1.0 / (sigma.to(_F64) ** 2).clamp_min(1e-200)
        inv_var = inv_var.clamp_max(torch.finfo(cd).max ** 0.5).to(cd).unsqueeze(1)  # (B, 1)
        log_w = onehot.to(device=x.device, dtype=cd).log() if onehot is not None else None  # (B, K)
        B = x.shape[0]
        m = torch.full((B, 1), -math.inf, device=x.device, dtype=cd)  # running max of logits
        total = torch.zeros((B, 1), device=x.device, dtype=cd)  # running sum of exp(logit - m)
        acc = torch.zeros_like(xf)  # running sum of exp(logit - m) y_n
        for start in range(0, self.data.shape[0], self.chunk_size):
            y = self.data[start:start + self.chunk_size].to(cd)  # (c, dim)
            half_sq = self.half_sq_norms[start:start + self.chunk_size].to(cd)
            logits = (xf @ y.T - half_sq) * inv_var  # (B, c)
            if log_w is not None:
                logits = logits + log_w[:, self.labels[start:start + self.chunk_size]]
            m_new = torch.maximum(m, logits.amax(1, keepdim=True))
            m_safe = m_new.where(torch.isfinite(m_new), 0.0)  # rows with no admissible point yet
            scale = (m - m_safe).exp()
            p = (logits - m_safe).exp()  # (B, c)
            total = total * scale + p.sum(1, keepdim=True)
            acc = acc * scale + p @ y
            m = m_new
        return (acc / total).reshape(x.shape).to(x.dtype)

    def nearest(self, x: Tensor) -> Tensor:
        """Index of the nearest training point to each row of ``x: (B, *sample_shape)``: ``(B,)``."""
        check_sample_shape(x, self.sample_shape, "EmpiricalTeacher.nearest")
        xf = x.reshape(x.shape[0], -1).to(self.compute_dtype)
        best = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=self.compute_dtype)
        idx = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
        for start in range(0, self.data.shape[0], self.chunk_size):
            y = self.data[start:start + self.chunk_size].to(self.compute_dtype)
            score = xf @ y.T - self.half_sq_norms[start:start + self.chunk_size].to(self.compute_dtype)
            val, arg = score.max(1)
            better = val > best
            best = torch.where(better, val, best)
            idx = torch.where(better, arg + start, idx)
        return idx

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``n`` training points drawn uniformly (within the class if ``class_labels: (n,)`` given):
        ``(n, *sample_shape)`` in ``dtype`` (default the data's)."""
        device = self.data.device
        draw = _draw_device(generator, device)
        N = self.data.shape[0]
        if self.label_dim:
            if class_labels is None or class_labels.shape != (n,) or class_labels.is_floating_point():
                raise ShapeError(f"EmpiricalTeacher.sample: a conditional teacher needs integer "
                                 f"class_labels of shape ({n},)")
            if n and (int(class_labels.min()) < 0 or int(class_labels.max()) >= self.label_dim):
                raise ShapeError(f"EmpiricalTeacher.sample: class indices must lie in [0, {self.label_dim})")
            c = class_labels.to(device).long()
            u = torch.rand(n, generator=generator, device=draw, dtype=_F64).to(device)
            count = self._class_count[c]
            offset = (u * count).long().clamp_max(count - 1)  # uniform within the class
            idx = self._by_class[self._class_start[c] + offset]
        else:
            if class_labels is not None:
                raise ShapeError("EmpiricalTeacher.sample: the teacher is unconditional; got class_labels")
            idx = torch.randint(N, (n,), generator=generator, device=draw).to(device)
        x = self.data[idx].reshape(n, *self.sample_shape)
        return x.to(dtype) if dtype is not None else x
