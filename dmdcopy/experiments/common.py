"""Pieces every experiment shares: sample quality against exact data, Delta E records, timing.

Nothing here trains; the experiment modules compose these with :mod:`dmdcopy.distill` and
:mod:`dmdcopy.experiments.teacher_training`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

from dmdcopy.distill import DistillConfig
from dmdcopy.errors import ShapeError
from dmdcopy.measure import DeltaEReport, TeacherSamples
from dmdcopy.metrics import PairingResult, transport_inefficiency

__all__ = [
    "DELTA_E_FIELDS",
    "Timer",
    "batched",
    "check_seeds",
    "delta_e_record",
    "gaussian_frechet",
    "map_error",
    "over_seeds",
    "seeded",
    "teacher_set",
    "toy_distill_config",
    "transport_summary",
]


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (m + m.T))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_frechet(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein) distance squared between a Gaussian fit of ``samples`` and
    ``N(mean, cov)``, per dimension.

    ``(||m_s - m||^2 + tr(S_s + S - 2 (S^{1/2} S_s S^{1/2})^{1/2})) / d``.

    Args:
        samples: ``(N, d)``; ``mean``: ``(d,)``; ``cov``: ``(d, d)``.

    A finite ``N`` gives a positive floor even for exact samples; compare with that floor.
    """
    x = samples.reshape(samples.shape[0], -1).double().cpu().numpy()
    m = mean.reshape(-1).double().cpu().numpy()
    S = cov.double().cpu().numpy()
    if x.shape[1] != m.shape[0] or S.shape != (m.shape[0], m.shape[0]):
        raise ShapeError(f"gaussian_frechet: samples (N, {x.shape[1]}) do not fit mean {m.shape} "
                         f"and cov {S.shape}")
    m_s = x.mean(0)
    S_s = np.cov(x, rowvar=False).reshape(m.shape[0], m.shape[0])
    root = _sqrtm_psd(S)
    cross = _sqrtm_psd(root @ S_s @ root)
    value = float(((m_s - m) ** 2).sum() + np.trace(S_s + S - 2 * cross))
    return max(value, 0.0) / m.shape[0]


# PairingResult fields an experiment's JSON keeps (not the bootstrap draws nor the per-block lists):
# the finite-N figure and its bootstrap interval, the bracket for the population Delta E (point
# estimates, then its bootstrap ends: the interval to report), the energies, the resolution
# figures, and the warnings.
DELTA_E_FIELDS = (
    "delta_e", "ci_low", "ci_high", "delta_e_lower", "delta_e_upper", "bracket_low", "bracket_high",
    "e_pair", "e_opt", "e_opt_lower", "e_ind", "n", "dim", "block_size", "n_blocks", "resolution",
    "own_pair_rate", "pair_ind_ratio", "warning", "warnings",
)


def delta_e_record(r: DeltaEReport | PairingResult) -> dict | None:
    """The JSON record of a Delta E measurement (:data:`DELTA_E_FIELDS`, NaN as ``None``); ``None``
    for a report without a result (the student's samples were not finite)."""
    if isinstance(r, DeltaEReport):
        if r.result is None:
            return None
        r = r.result
    d = r.to_dict()
    return {k: d[k] for k in DELTA_E_FIELDS}


def teacher_set(
    seeds: Sequence[int],
    z: torch.Tensor,
    x: torch.Tensor,
    *,
    sigmas: torch.Tensor,
    solver: str = "heun",
) -> TeacherSamples:
    """A teacher's map ``x = T(z)`` of the noises ``z`` of ``seeds`` (made by the caller) as the
    :class:`~dmdcopy.measure.TeacherSamples` that :func:`~dmdcopy.measure.measure_student` reads.

    Args:
        seeds: the seeds of the rows of ``z``; z, x: ``(N, ...)``.
        sigmas: the ODE grid ``x`` was integrated on; solver: its name.
    """
    if z.shape[0] != len(seeds) or x.shape[0] != z.shape[0]:
        raise ShapeError(f"teacher_set: {len(seeds)} seeds, z {tuple(z.shape)} and x {tuple(x.shape)} "
                         "need the same number of rows")
    return TeacherSamples(seeds=[int(s) for s in seeds], z=z, x=x, labels=None, sigmas=sigmas,
                          solver=solver, fingerprint=None)


def transport_summary(noise: torch.Tensor, samples: torch.Tensor, *, n_boot: int = 500,
                      generator: torch.Generator | None = None) -> dict:
    """Teacher-free transport inefficiency of the coupling ``(noise_i, samples_i)`` as a dict."""
    r = transport_inefficiency(noise, samples, n_boot=n_boot, generator=generator)
    return dict(value=r.value, ci_low=r.ci_low, ci_high=r.ci_high, e_model=r.e_model, e_opt=r.e_opt)


def map_error(learned: torch.Tensor, exact: torch.Tensor, scale: float) -> dict:
    """How far a learned map's outputs are from the exact map's on the same noises.

    Args:
        learned, exact: ``(N, ...)``, ``T(z)`` and ``T_exact(z)`` of the same ``z``.
        scale: the data scale (``sigma_data``) the error is divided by.

    Returns: ``dict(rmse, relative_rmse)`` with ``rmse = sqrt(mean_i ||T(z_i) - T_exact(z_i)||^2 / d)``
    (float64) and ``relative_rmse = rmse / scale``.
    """
    if learned.shape != exact.shape:
        raise ShapeError(f"map_error: learned {tuple(learned.shape)} and exact {tuple(exact.shape)} differ")
    diff = learned.double() - exact.double().to(learned.device)
    rmse = float(diff.pow(2).flatten(1).mean(1).mean().sqrt())
    return dict(rmse=rmse, relative_rmse=rmse / scale)


T = TypeVar("T")


def seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` with the CPU generator seeded by ``seed`` (a network's initial weights), leaving
    the caller's generator state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """``fn`` applied to ``x: (N, ...)`` in slices of ``batch`` rows, concatenated."""
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


class Timer:
    """Named wall-clock sections: ``with timer("teacher"): ...``; ``timer.seconds`` is a dict."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def toy_distill_config(num_steps: int) -> DistillConfig:
    """The DMD settings every CPU-sized experiment starts from (sweep, digits, ablations): the
    ``"toy"`` preset with batch 128, no EMA, and no log or checkpoint files (the experiments write
    their own JSON).

    lr 1e-3, not DMD2's 2e-6 (which is for networks 10^4 times larger): in a probe at d = 2 and 32
    with 200 steps, 1e-4 and 3e-4 left the students' sliced Wasserstein 2-3x the teacher's.
    """
    return DistillConfig.preset(
        "toy", num_steps=num_steps, batch_size=128, ema_halflife_steps=None, progress_bar=False,
        log_every=10**9, checkpoint_every=10**9,
    )


def over_seeds(values: Sequence[float | None]) -> dict:
    """Per-seed figures and their spread over seeds.

    Args:
        values: one figure per seed, in seed order (``None`` where a run gave none, e.g. a student
            with non-finite samples; such seeds are left out of the statistics).

    Returns: ``dict(values, n, mean, sd, t_low, t_high, min, max)``: ``n`` finite values, their
    mean, sample standard deviation, the 95 % Student-t interval of the mean
    ``mean -/+ t_{0.975, n-1} sd / sqrt(n)`` (``None`` for ``n < 2``) and the range.
    """
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    n = len(finite)
    out = dict(values=list(values), n=n, mean=None, sd=None, t_low=None, t_high=None, min=None, max=None)
    if n == 0:
        return out
    arr = np.asarray(finite, dtype=np.float64)
    out.update(mean=float(arr.mean()), min=float(arr.min()), max=float(arr.max()))
    if n >= 2:
        from scipy.stats import t as student_t

        sd = float(arr.std(ddof=1))
        half = float(student_t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
        out.update(sd=sd, t_low=out["mean"] - half, t_high=out["mean"] + half)
    return out


# The Delta E figures summarised over seeds in every experiment's ``over_seeds``.
SEED_FIELDS = ("delta_e", "delta_e_lower", "delta_e_upper", "bracket_low", "bracket_high")


def seed_summary(records: Sequence[dict | None]) -> dict:
    """:func:`over_seeds` of each :data:`SEED_FIELDS` figure of per-seed student records (the
    ``evaluate_student`` summaries, one per seed in seed order)."""
    des = [(r or {}).get("delta_e") or {} for r in records]
    return {k: over_seeds([de.get(k) for de in des]) for k in SEED_FIELDS}


def check_seeds(seed: int, seeds: Sequence[int], where: str) -> None:
    """A config's ``seed`` and ``seeds``: non-negative ints, ``seeds`` distinct."""
    from dmdcopy.errors import ConfigError

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{where}.seed must be a non-negative int, got {seed!r}")
    if any(isinstance(s, bool) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}.seeds must be distinct non-negative ints, got {seeds}")
