"""Distiller callbacks: measurements taken during training and written to the distiller's log.

A callback is called as ``callback(distiller, step)`` after every generator step and returns a
dict of floats for the log, or ``None`` when it has nothing to report at that step.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from dmdcopy import contracts
from dmdcopy.distill.dist import dist_info
from dmdcopy.errors import ConfigError
from dmdcopy.measure import DeltaEReport, TeacherSamples, measure_student, teacher_samples
from dmdcopy.pairs import PairStore
from dmdcopy.samplers import heun

__all__ = ["DELTA_E_LOG_KEYS", "DeltaECallback"]

# log key -> PairingResult field: the finite-N figure with its bootstrap interval, the energies,
# the bracket for the population Delta E (point estimates and its bootstrap ends), and the
# resolution figures. ``delta_e_nonfinite`` (not a PairingResult field) is added beside them.
_RESULT_FIELDS = {
    "delta_e": "delta_e", "delta_e_lo": "ci_low", "delta_e_hi": "ci_high",
    "delta_e_lower": "delta_e_lower", "delta_e_upper": "delta_e_upper",
    "bracket_low": "bracket_low", "bracket_high": "bracket_high",
    "e_pair": "e_pair", "e_opt": "e_opt", "e_opt_lower": "e_opt_lower", "e_ind": "e_ind",
    "resolution": "resolution", "own_pair_rate": "own_pair_rate",
}
DELTA_E_LOG_KEYS: tuple[str, ...] = (*_RESULT_FIELDS, "delta_e_nonfinite")


class DeltaECallback:
    """Delta E of the student on fixed seeds every ``every`` generator steps: a copying curve.

    The teacher's samples are made once by :func:`dmdcopy.measure.teacher_samples` (from
    ``pairs`` when given) and cached; at each measurement the student (its EMA when there is one
    and ``use_ema``) is measured against them by :func:`dmdcopy.measure.measure_student` (in eval
    mode without autograd, its mode restored after), the same path as :func:`dmdcopy.delta_e` and
    ``dmdcopy delta-e``.

    A student that emits non-finite samples at a measurement does not stop training: the step's
    record has every figure NaN and ``delta_e_nonfinite`` the number of non-finite samples.

    Under ``torch.distributed`` every process takes part in each measurement (each maps its share
    of the seeds and the metric gathers them, so a measurement made by one rank alone would wait
    for the others forever); every process gets the same figures, and only the main process
    returns them, so they are logged once.

    For image students (samples ``(C, H, W)`` with ``C`` 1 or 3) the main process also writes, at
    each measurement, the picture of copying: the teacher's and the student's images of the first
    ``grid`` seeds side by side (teacher left), in ``out_dir/grids/{prefix}delta_e-{step:09d}.png``.

    Args:
        every: measure when ``step % every == 0``.
        seeds: the fixed seeds (e.g. ``range(1000)``).
        pairs: a pair store holding the seeds; its teacher fingerprint is checked against
            ``distiller.teacher``. ``None`` integrates the teacher ODE in memory.
        teacher: the teacher's samples of ``seeds`` made by the caller
            (:class:`~dmdcopy.measure.TeacherSamples`, e.g. on a finer ODE grid); used as given,
            instead of ``pairs`` or the ODE.
        sigmas, solver: the teacher ODE grid and solver when ``pairs`` is None (default: those of
            :func:`dmdcopy.samplers.teacher_ode`, Heun on Karras-18).
        batch: samples per forward pass.
        use_ema: measure the EMA student when the distiller has one.
        block_size, n_boot: passed to :func:`~dmdcopy.measure.measure_student` (a few hundred
            resamples keep a measurement cheap).
        prefix: prefix of the log keys (and of the grid files).
        grid: image pairs per picture; ``None`` (default): 16 when the samples are images, the
            distiller has an ``out_dir`` and matplotlib is installed, else none; ``0``: none.
        grid_range: the sample values drawn as black and white (EDM's ``(-1, 1)``).

    Returns (when measuring, on the main process): ``{prefix + key: float}`` for every key of
    :data:`DELTA_E_LOG_KEYS`: ``delta_e`` (finite-N figure) with its bootstrap interval
    ``delta_e_lo`` / ``delta_e_hi``; ``delta_e_lower`` / ``delta_e_upper``, the bracket for the
    population Delta E, and ``bracket_low`` / ``bracket_high``, its bootstrap ends (the interval
    to report); ``e_pair``, ``e_opt``, ``e_opt_lower``, ``e_ind``, ``resolution``,
    ``own_pair_rate``; and ``delta_e_nonfinite`` (0 when every sample was finite).
    """

    def __init__(
        self,
        every: int,
        seeds: Iterable[int],
        *,
        pairs: PairStore | None = None,
        teacher: TeacherSamples | None = None,
        sigmas: torch.Tensor | Sequence[float] | None = None,
        solver: Callable[..., torch.Tensor] = heun,
        batch: int = 256,
        use_ema: bool = True,
        block_size: int = 10_000,
        n_boot: int = 200,
        prefix: str = "",
        grid: int | None = None,
        grid_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"DeltaECallback: every must be a positive int, got {every!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"DeltaECallback: batch must be a positive int, got {batch!r}")
        self.seeds = [int(s) for s in seeds]
        if len(self.seeds) < 2:
            raise ConfigError("DeltaECallback: need at least 2 seeds")
        self.every, self.pairs, self.sigmas, self.solver = every, pairs, sigmas, solver
        self.batch, self.use_ema, self.prefix = batch, use_ema, prefix
        self.block_size, self.n_boot = block_size, n_boot
        if grid is not None and (not isinstance(grid, int) or isinstance(grid, bool) or grid < 0):
            raise ConfigError(f"DeltaECallback: grid must be None or an int >= 0, got {grid!r}")
        self.grid, self.grid_range = grid, tuple(grid_range)
        if teacher is not None and [int(s) for s in teacher.seeds] != self.seeds:
            raise ConfigError("DeltaECallback: teacher= holds other seeds than seeds=")
        self._teacher: TeacherSamples | None = teacher

    def teacher_samples(self, distiller: Any) -> TeacherSamples:
        """The teacher's samples of the callback's seeds, made on first use and cached."""
        if self._teacher is None:
            teacher = distiller.teacher
            shape = contracts.sample_shape(distiller) or contracts.sample_shape(teacher)
            if shape is None and self.pairs is None:
                raise ConfigError("DeltaECallback: the sample shape is unknown; pass pairs=")
            device = torch.device(getattr(distiller, "device", "cpu"))
            self._teacher = teacher_samples(teacher, self.seeds, pairs=self.pairs, sample_shape=shape,
                                            sigmas=self.sigmas, solver=self.solver, batch=self.batch,
                                            device=device)
        return self._teacher

    def measure(self, distiller: Any) -> DeltaEReport:
        """Measure the student now (every process of a distributed run must call this together)."""
        ts = self.teacher_samples(distiller)
        ema = getattr(distiller, "ema_student", None)
        G = ema if (self.use_ema and ema is not None) else distiller.student
        # measure_student runs G in eval mode without autograd and restores its mode
        return measure_student(G, ts, batch=self.batch, block_size=self.block_size, n_boot=self.n_boot,
                               keep_samples=self._grid_size(distiller, ts))

    def _grid_size(self, distiller: Any, ts: TeacherSamples) -> int:
        """Image pairs to draw at each measurement (see ``grid``)."""
        shape = tuple(ts.x.shape[1:])
        images = len(shape) == 3 and shape[0] in (1, 3)
        if self.grid is None:
            auto = (images and getattr(distiller, "out_dir", None) is not None
                    and importlib.util.find_spec("matplotlib") is not None)
            return min(16, len(ts)) if auto else 0
        if self.grid and not images:
            raise ConfigError(f"DeltaECallback: grid={self.grid} needs image samples (C, H, W) with C 1 "
                              f"or 3, not {shape}; pass grid=0")
        return min(self.grid, len(ts))

    def write_grid(self, distiller: Any, step: int, report: DeltaEReport) -> Path | None:
        """Write the teacher/student picture of a measurement (main process; see the class doc)."""
        student = report.student_samples
        out_dir = getattr(distiller, "out_dir", None)
        if student is None or not len(student) or out_dir is None:
            return None
        from dmdcopy.viz import save_image_grid

        teacher = self.teacher_samples(distiller).x[: len(student)].detach().cpu()
        student = torch.nan_to_num(student)  # a non-finite sample draws as black, not as garbage
        path = Path(out_dir) / "grids" / f"{self.prefix}delta_e-{step:09d}.png"
        try:
            return save_image_grid(path, student, pair_with=teacher, value_range=self.grid_range)
        except OSError as e:  # a full disk must not stop the run; the figures are still logged
            print(f"dmdcopy: could not write {path}: {e}", file=sys.stderr)
            return None

    def __call__(self, distiller: Any, step: int) -> dict[str, float] | None:
        if step % self.every != 0:
            return None
        is_main = getattr(distiller, "is_main", True)
        if not is_main and not dist_info().distributed:
            return None  # a non-main process without a process group: nothing to join
        report = self.measure(distiller)
        if not is_main:
            return None
        self.write_grid(distiller, step, report)
        return {self.prefix + k: v for k, v in _log_values(report).items()}


def _log_values(report: DeltaEReport) -> dict[str, float]:
    """The log figures (:data:`DELTA_E_LOG_KEYS`) of a report; NaN where there is none (no result:
    non-finite student samples; no bootstrap: ``n_boot=0``)."""
    r = report.result
    values = {}
    for key, name in _RESULT_FIELDS.items():
        v = None if r is None else getattr(r, name)
        values[key] = math.nan if v is None else float(v)
    values["delta_e_nonfinite"] = float(report.n_nonfinite)
    return values
