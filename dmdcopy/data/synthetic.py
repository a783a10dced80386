"""Synthetic data in ``d`` dimensions whose exact denoiser is known.

Two families, both scaled so the average per-coordinate variance is ``sigma_data^2`` (the EDM
preconditioning's assumption), so one network recipe fits every dimension:

- :func:`power_law_gaussian`: ``N(0, Sigma)`` with eigenvalues ``lambda_k ∝ k^(-alpha)`` in a random
  orthonormal basis. Natural images have such a spectrum (their power falls off as a power of the
  frequency), so this is the simplest data with "image-like" high-dimensional structure. Its
  probability-flow map is linear and known in closed form.
- :func:`gaussian_mixture`: ``K`` isotropic components whose means are themselves drawn from the
  power-law Gaussian, so the clusters spread along the same decaying spectrum. Its denoiser is a
  posterior-weighted mean, exact; its probability-flow map is not closed-form and is integrated.

Each returns a frozen dataclass with ``sample(n, generator=)`` and ``teacher()`` (the exact
denoiser from :mod:`dmdcopy.teachers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmdcopy.errors import ConfigError

__all__ = [
    "GaussianMixtureData",
    "PowerLawGaussianData",
    "gaussian_mixture",
    "power_law_gaussian",
    "power_law_spectrum",
    "random_orthogonal",
]


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dim must be a positive int, got {dim!r}")


def power_law_spectrum(
    dim: int, alpha: float = 1.0, sigma_data: float = 0.5, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Eigenvalues ``lambda_k = c k^(-alpha)``, ``k = 1..dim``, with ``mean(lambda) = sigma_data^2``.

    Returns: ``(dim,)``, decreasing.

    >>> lam = power_law_spectrum(4, alpha=1.0, sigma_data=0.5)
    >>> round(float(lam.mean()), 12), bool((lam[:-1] > lam[1:]).all())
    (0.25, True)
    """
    _check_dim(dim)
    if alpha < 0:
        raise ConfigError(f"alpha must be >= 0 (a decaying spectrum), got {alpha}")
    if sigma_data <= 0:
        raise ConfigError(f"sigma_data must be > 0, got {sigma_data}")
    k = torch.arange(1, dim + 1, dtype=dtype)
    lam = k ** (-float(alpha))
    return lam * (sigma_data**2 / lam.mean())


def random_orthogonal(
    dim: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A Haar-random orthogonal matrix ``(dim, dim)`` (QR of a Gaussian matrix, signs fixed)."""
    _check_dim(dim)
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.to(dtype)


@dataclass(frozen=True, eq=False)
class PowerLawGaussianData:
    """``N(mean, cov)`` with ``cov = basis diag(eigenvalues) basis^T``.

    Attributes:
        mean: ``(d,)``.
        eigenvalues: ``(d,)`` decreasing, mean ``sigma_data^2``.
        basis: ``(d, d)`` orthogonal; column ``k`` is the direction of ``eigenvalues[k]``.
    """

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    basis: torch.Tensor
    alpha: float
    sigma_data: float

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def cov(self) -> torch.Tensor:
        """``(d, d)`` covariance, float64 and exactly symmetric."""
        U, lam = self.basis.double(), self.eigenvalues.double()
        cov = (U * lam) @ U.T
        return 0.5 * (cov + cov.T)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples, ``(n, d)`` in the dtype of ``mean``."""
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (e * self.eigenvalues.sqrt().to(torch.float64)) @ self.basis.to(torch.float64).T
        return (x + self.mean.to(torch.float64)).to(self.mean.dtype)

    def teacher(self):
        """The exact denoiser :class:`dmdcopy.teachers.GaussianTeacher` of this distribution."""
        from dmdcopy.teachers import GaussianTeacher

        return GaussianTeacher(self.mean, self.cov)

    def describe(self) -> dict:
        return dict(kind="power_law_gaussian", dim=self.dim, alpha=self.alpha, sigma_data=self.sigma_data)


def power_law_gaussian(
    dim: int,
    *,
    alpha: float = 1.0,
    sigma_data: float = 0.5,
    rotate: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> PowerLawGaussianData:
    """A zero-mean Gaussian with a power-law spectrum (see :func:`power_law_spectrum`).

    Args:
        dim: dimension ``d``.
        alpha: spectral decay; 0 gives an isotropic Gaussian, 1-2 is typical of natural images.
        sigma_data: root of the mean per-coordinate variance.
        rotate: put the eigenvectors in a random orthonormal basis (else the standard basis).
        generator: randomness of the basis.

    >>> data = power_law_gaussian(8, generator=torch.Generator().manual_seed(0))
    >>> data.sample(5).shape
    torch.Size([5, 8])
    """
    lam = power_law_spectrum(dim, alpha, sigma_data)
    basis = random_orthogonal(dim, generator=generator) if rotate else torch.eye(dim, dtype=torch.float64)
    return PowerLawGaussianData(
        mean=torch.zeros(dim, dtype=dtype),
        eigenvalues=lam.to(dtype),
        basis=basis.to(dtype),
        alpha=float(alpha),
        sigma_data=float(sigma_data),
    )


@dataclass(frozen=True, eq=False)
class GaussianMixtureData:
    """Mixture of isotropic Gaussians ``sum_k w_k N(means[k], stds[k]^2 I)``.

    Attributes:
        means: ``(K, d)``.
        stds: ``(K,)``.
        weights: ``(K,)``, summing to 1.
    """

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    alpha: float
    sigma_data: float

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples ``(n, d)``; with ``return_labels`` also their components ``(n,)``."""
        k = torch.multinomial(self.weights.to(torch.float64), n, replacement=True, generator=generator)
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means.to(torch.float64)[k] + self.stds.to(torch.float64)[k, None] * e
        x = x.to(self.means.dtype)
        return (x, k) if return_labels else x

    def teacher(self):
        """The exact denoiser :class:`dmdcopy.teachers.GaussianMixtureTeacher` of this mixture."""
        from dmdcopy.teachers import GaussianMixtureTeacher

        return GaussianMixtureTeacher(self.means, self.stds, self.weights)

    def describe(self) -> dict:
        return dict(
            kind="gaussian_mixture", dim=self.dim, num_components=self.num_components,
            alpha=self.alpha, sigma_data=self.sigma_data,
        )


def gaussian_mixture(
    dim: int,
    num_components: int = 8,
    *,
    between_fraction: float = 0.8,
    alpha: float = 1.0,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> GaussianMixtureData:
    """Equal-weight isotropic mixture whose means follow a power-law Gaussian.

    The means are drawn from ``N(0, Sigma_between)`` with the power-law spectrum scaled to carry
    ``between_fraction`` of the variance, then centred and rescaled so their mean per-coordinate
    second moment is exactly ``between_fraction sigma_data^2``; each component has variance
    ``(1 - between_fraction) sigma_data^2`` per coordinate. The whole mixture then has mean 0 and
    average per-coordinate variance ``sigma_data^2``.

    >>> gm = gaussian_mixture(4, 3, generator=torch.Generator().manual_seed(0))
    >>> gm.means.shape, gm.sample(6).shape
    (torch.Size([3, 4]), torch.Size([6, 4]))
    """
    _check_dim(dim)
    if not isinstance(num_components, int) or num_components < 1:
        raise ConfigError(f"num_components must be a positive int, got {num_components!r}")
    if not 0 <= between_fraction < 1:
        raise ConfigError(f"between_fraction must lie in [0, 1), got {between_fraction}")
    base = power_law_gaussian(dim, alpha=alpha, sigma_data=1.0, generator=generator, dtype=torch.float64)
    means = base.sample(num_components, generator=generator)
    if num_components > 1:
        means = means - means.mean(0)
        second = means.pow(2).mean()
        means = means * math.sqrt(between_fraction * sigma_data**2 / float(second))
    else:
        means = torch.zeros_like(means)
        between_fraction = 0.0
    std = math.sqrt((1 - between_fraction) * sigma_data**2)
    return GaussianMixtureData(
        means=means.to(dtype),
        stds=torch.full((num_components,), std, dtype=dtype),
        weights=torch.full((num_components,), 1 / num_components, dtype=dtype),
        alpha=float(alpha),
        sigma_data=float(sigma_data),
    )
