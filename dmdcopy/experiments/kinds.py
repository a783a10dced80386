"""The synthetic data kinds the dimension sweep and the ablations run on, as objects.

A kind at one dimension holds its data (:mod:`dmdcopy.data.synthetic`) and its exact denoiser, and
answers what the experiments ask of it: fresh samples (:meth:`DataKind.sample`), the exact
teacher's map of given noises (:meth:`DataKind.exact_map`, :meth:`DataKind.exact_set`), and the
quality of a sample set against exact samples (:meth:`DataKind.quality`). A new kind is one subclass
and one entry in :data:`DATA_KINDS` (the names the configs and the CLI use).

>>> kind = DATA_KINDS["power_law_gaussian"](4, generator=torch.Generator().manual_seed(0))
>>> kind.exact_map(torch.randn(3, 4)).shape
torch.Size([3, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from dmdcopy.data.synthetic import (
    GaussianMixtureData,
    PowerLawGaussianData,
    gaussian_mixture,
    power_law_gaussian,
)
from dmdcopy.experiments.common import batched, gaussian_frechet, teacher_set
from dmdcopy.measure import TeacherSamples
from dmdcopy.samplers import teacher_ode
from dmdcopy.schedules import karras_sigmas
from dmdcopy.w2 import sliced_wasserstein

__all__ = ["DATA_KINDS", "DataKind", "GaussianMixtureKind", "PowerLawGaussianKind"]


class DataKind:
    """One data kind at one dimension.

    Subclasses set :attr:`name`, build :attr:`data` in ``__init__(dim, *, alpha, num_components,
    generator)`` and implement :meth:`exact_set`; :meth:`quality` may add kind-specific figures.

    Attributes:
        data: the distribution (``sample(n, generator=)``, ``teacher()``, ``describe()``).
        teacher: its exact denoiser (:mod:`dmdcopy.teachers`), on the CPU until a map moves it.
    """

    name: ClassVar[str]

    def __init__(self, data: PowerLawGaussianData | GaussianMixtureData) -> None:
        self.data = data
        self.teacher = data.teacher()

    @property
    def dim(self) -> int:
        return self.data.dim

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples ``(n, d)``."""
        return self.data.sample(n, generator=generator)

    def describe(self) -> dict:
        return self.data.describe()

    def exact_set(
        self,
        seeds: Sequence[int],
        z: torch.Tensor,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        num_steps: int = 128,
    ) -> TeacherSamples:
        """The exact teacher's map ``x = T_exact(z)`` of the noises ``z: (N, d)`` of ``seeds``, with
        the grid and solver it was computed with (``num_steps`` Heun steps where it is integrated)."""
        raise NotImplementedError

    def exact_map(self, z: torch.Tensor, **grid) -> torch.Tensor:
        """``T_exact(z)``: ``z: (N, d)`` standard normal -> ``(N, d)`` (``grid`` as :meth:`exact_set`)."""
        return self.exact_set(range(z.shape[0]), z, **grid).x

    def quality(self, samples: torch.Tensor, reference: torch.Tensor, *, seed: int) -> dict:
        """Distribution quality of ``samples: (N, d)`` against exact ``reference: (N, d)``: the sliced
        Wasserstein distance (projections drawn from ``seed``), plus kind-specific figures."""
        g = torch.Generator().manual_seed(seed)
        return dict(sliced_wasserstein=sliced_wasserstein(samples.cpu(), reference, generator=g))


class PowerLawGaussianKind(DataKind):
    """:func:`dmdcopy.data.power_law_gaussian`: closed-form exact map, Fréchet distance known."""

    name = "power_law_gaussian"

    def __init__(self, dim: int, *, alpha: float = 1.0, num_components: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        del num_components  # one component
        super().__init__(power_law_gaussian(dim, alpha=alpha, generator=generator))

    def exact_set(self, seeds, z, *, sigma_min=0.002, sigma_max=80.0, num_steps=128) -> TeacherSamples:
        del sigma_min, num_steps  # the map is linear, in closed form
        x = self.teacher.to(z.device).ode_map(z.double(), sigma_max).float()
        return teacher_set(seeds, z, x, sigmas=torch.tensor([sigma_max, 0.0]), solver="closed_form")

    def quality(self, samples: torch.Tensor, reference: torch.Tensor, *, seed: int) -> dict:
        out = super().quality(samples, reference, seed=seed)
        out["frechet_per_dim"] = gaussian_frechet(samples.cpu(), self.data.mean, self.data.cov)
        return out


class GaussianMixtureKind(DataKind):
    """:func:`dmdcopy.data.gaussian_mixture`: exact denoiser, map integrated with Heun."""

    name = "gaussian_mixture"

    def __init__(self, dim: int, *, alpha: float = 1.0, num_components: int = 8,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(gaussian_mixture(dim, num_components, alpha=alpha, generator=generator))

    def exact_set(self, seeds, z, *, sigma_min=0.002, sigma_max=80.0, num_steps=128) -> TeacherSamples:
        exact = self.teacher.to(z.device)
        sigmas = karras_sigmas(num_steps, sigma_min, sigma_max)
        x = batched(lambda zz: teacher_ode(exact, zz.double(), sigmas).float(), z)
        return teacher_set(seeds, z, x, sigmas=sigmas)


# The data kinds by name (the configs and the CLI's --kinds name them).
DATA_KINDS: dict[str, type[DataKind]] = {k.name: k for k in (PowerLawGaussianKind, GaussianMixtureKind)}
