"""A solvable model of copying: linear one-step students of a Gaussian teacher, distilled with DMD.

The teacher's data is ``N(0, Sigma)`` with ``Sigma = Q diag(k^-alpha) Q^T`` (a power-law spectrum in
a random basis). Its probability-flow map from ``sigma_max z`` to 0 is linear,
``T(z) = B z`` with ``B = U diag(S sqrt(lambda / (lambda + S^2))) U^T`` (``S = sigma_max``,
:meth:`dmdcopy.teachers.GaussianTeacher.ode_map`). A linear student ``G(z) = A z`` has the law
``N(0, A A^T)``, so its **population** Delta E against the teacher is known in closed form at every
step (:func:`dmdcopy.metrics.gaussian_delta_e`: ``1 - tr(A^T B) / |A^T B|_*``), with no sampling
bias at all: the model separates what DMD does to the pairing from what the finite-N estimate
does to the figure.

The generator step is DMD2's, from the library's pieces: ``x = A z``, a noise level from DMD2's
grid (indices 20..980 of 1000 Karras sigmas), ``g = (D_fake(x_t) - D_real(x_t)) / mean|x -
D_real(x_t)|`` (:func:`dmdcopy.losses.dmd_gradient`) and the surrogate loss
(:func:`dmdcopy.losses.dmd_surrogate_loss`). The fake score is **exact**: the denoiser of the
student's current law ``N(0, A A^T)``, rebuilt every step, i.e. the DMD gradient with a perfect
fake score (what DMD's two time-scale rule approximates). Two initialisations:

- ``"teacher"``: DMD2's, ``G(z) = D_teacher(S z, S)``, i.e. ``A_0 = S Sigma (Sigma + S^2)^-1``: tiny
  (``~ Sigma / 80``) and aligned with the teacher's eigenbasis;
- ``"scratch"``: ``A_0`` a random Gaussian matrix with the teacher map's scale.

What it predicts (see docs/results.md for the runs): a symmetric ``A_0`` that commutes with
``Sigma`` (the teacher initialisation) receives gradients that keep it in the algebra of
``Sigma``, so it can only converge to ``Sigma^1/2``-like maps in the same eigenbasis: the teacher's
own map, population Delta E 0, in any dimension. A scratch student reaches a map with the right
law but a rotation fixed by its initialisation: population Delta E stays well above 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from dmdcopy.errors import ConfigError
from dmdcopy.losses import dmd_gradient, dmd_surrogate_loss
from dmdcopy.schedules import dmd_sigma_grid
from dmdcopy.teachers import GaussianTeacher
from dmdcopy.w2 import gaussian_delta_e

__all__ = ["LinearRun", "linear_dmd", "power_law_teacher", "teacher_map"]

LINEAR_INITS = ("teacher", "scratch")


def power_law_teacher(
    d: int, *, alpha: float = 1.0, seed: int = 0, sigma_max: float = 80.0
) -> GaussianTeacher:
    """``N(0, Q diag(k^-alpha) Q^T)``, ``k = 1..d``, ``Q`` a random orthogonal matrix from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -alpha
    return GaussianTeacher(torch.zeros(d, dtype=torch.float64), (q * lam) @ q.T, sigma_max=sigma_max)


def teacher_map(teacher: GaussianTeacher) -> torch.Tensor:
    """``B: (d, d)`` with ``T(z) = B z``, the teacher's exact ODE map from ``sigma_max z`` to 0."""
    d = teacher.mean.shape[0]
    return teacher.ode_map(torch.eye(d, dtype=torch.float64)).T  # rows of the map of e_i -> columns


@dataclass
class LinearRun:
    """One linear student's trajectory: the population figures at every recorded step."""

    d: int
    init: str
    lr: float
    optimizer: str
    steps: list[int] = field(default_factory=list)
    delta_e: list[float] = field(default_factory=list)  # population Delta E (closed form)
    w2: list[float] = field(default_factory=list)  # Bures-Wasserstein^2 / d to the teacher's law
    e_pair: list[float] = field(default_factory=list)  # E|G(z) - T(z)|^2 / d

    def to_dict(self) -> dict:
        return asdict(self)


def _record(run: LinearRun, step: int, A: torch.Tensor, B: torch.Tensor) -> None:
    r = gaussian_delta_e(A, B)
    run.steps.append(step)
    run.delta_e.append(r.delta_e)
    run.w2.append(r.e_opt)
    run.e_pair.append(r.e_pair)


def linear_dmd(
    teacher: GaussianTeacher,
    *,
    init: str = "teacher",
    steps: int = 500,
    lr: float = 1e-2,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
    batch: int = 256,
    record_every: int = 10,
    seed: int = 0,
    return_matrix: bool = False,
) -> LinearRun | tuple[LinearRun, torch.Tensor]:
    """Distil a linear student ``G(z) = A z`` from a Gaussian ``teacher`` with DMD and an exact
    fake score; record the closed-form population Delta E every ``record_every`` steps.

    Args:
        teacher: a zero-mean :class:`~dmdcopy.teachers.GaussianTeacher` (e.g.
            :func:`power_law_teacher`).
        init: ``"teacher"`` (DMD2's initialisation) or ``"scratch"``.
        steps: generator updates (``optimizer([A], lr=lr)``, batch ``batch``). Adam (the default,
            as DMD2) is not rotation-equivariant; ``torch.optim.SGD`` is.
        seed: seeds the initialisation and every draw (noise, sigma indices).
        return_matrix: also return the final ``A: (d, d)``.

    Returns: a :class:`LinearRun` (and ``A`` when asked).
    """
    if init not in LINEAR_INITS:
        raise ConfigError(f"linear_dmd: init must be one of {LINEAR_INITS}, got {init!r}")
    for name, v in (("steps", steps), ("batch", batch), ("record_every", record_every)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"linear_dmd: {name} must be a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"linear_dmd: lr must be a positive number, got {lr!r}")
    d = teacher.mean.shape[0]
    g = torch.Generator().manual_seed(seed)
    B = teacher_map(teacher)
    S = float(teacher.sigma_max)
    if init == "teacher":  # G(z) = D(S z, S) = S Sigma (Sigma + S^2)^-1 z
        A0 = S * teacher(torch.eye(d, dtype=torch.float64), torch.full((d,), S, dtype=torch.float64)).T
    else:
        A0 = torch.randn(d, d, generator=g, dtype=torch.float64) * (B.square().sum() / d**2).sqrt()
    A = torch.nn.Parameter(A0.clone())
    opt = optimizer([A], lr=lr)
    grid = dmd_sigma_grid(dtype=torch.float64)
    zero = torch.zeros(d, dtype=torch.float64)
    run = LinearRun(d=d, init=init, lr=lr, optimizer=getattr(optimizer, "__name__", repr(optimizer)))
    _record(run, 0, A.detach(), B)
    for step in range(1, steps + 1):
        z = torch.randn(batch, d, generator=g, dtype=torch.float64)
        x = z @ A.T
        k = torch.randint(20, 981, (batch,), generator=g)
        noise = torch.randn(batch, d, generator=g, dtype=torch.float64)
        with torch.no_grad():
            Ad = A.detach()
            # the exact fake score: the denoiser of N(0, A A^T), plus a tiny ridge for rank deficiency
            fake = GaussianTeacher(zero, Ad @ Ad.T + 1e-12 * torch.eye(d, dtype=torch.float64))
            grad_x = dmd_gradient(x.detach(), grid[k], teacher, fake, noise=noise)
        opt.zero_grad()
        dmd_surrogate_loss(x, grad_x).mean().backward()
        opt.step()
        if step % record_every == 0 or step == steps:
            _record(run, step, A.detach(), B)
    return (run, A.detach().clone()) if return_matrix else run
