"""Distiller callbacks: measurements taken during training and written to the distiller's log.

A callback is called as ``callback(distiller, step)`` after every generator step and returns a
dict of floats for the log, or ``None`` when it has nothing to report at that step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from dmdcopy.errors import ConfigError
from dmdcopy.metrics import pairing_inefficiency
from dmdcopy.noise import labels_for_seeds, noise_for_seeds
from dmdcopy.pairs import PairStore, default_sigmas
from dmdcopy.samplers import heun, teacher_ode

__all__ = ["DeltaECallback"]


class DeltaECallback:
    """Delta E of the student on fixed seeds every ``every`` generator steps: a copying curve.

    The teacher's pairs are computed once (or read from a :class:`~dmdcopy.pairs.PairStore`) and
    cached; at each measurement the student (its EMA when there is one and ``use_ema``) maps the
    same noises, under ``torch.no_grad()`` in eval mode (the training mode is restored after), and
    :func:`dmdcopy.metrics.pairing_inefficiency` compares the two sets. Only the main process
    measures; other ranks return ``None``.

    Args:
        every: measure when ``step % every == 0``.
        seeds: the fixed seeds (e.g. ``range(1000)``).
        pairs: a pair store holding the seeds; its teacher fingerprint is checked against
            ``distiller.teacher`` on first use. ``None`` computes the pairs with ``teacher_ode``.
        sigmas, solver: the teacher ODE grid and solver when ``pairs`` is None (default: those of
            :func:`dmdcopy.samplers.teacher_ode`, Heun on Karras-18).
        batch: samples per forward pass.
        use_ema: measure the EMA student when the distiller has one.
        block_size, n_boot: passed to :func:`~dmdcopy.metrics.pairing_inefficiency` (a few
            hundred resamples keep a measurement cheap).
        prefix: prefix of the log keys.

    Returns (when measuring): ``{prefix + key: value}`` for ``delta_e``, ``delta_e_lo``,
    ``delta_e_hi``, ``e_pair``, ``e_opt``, ``e_ind``, ``resolution``, ``own_pair_rate``.
    """

    def __init__(
        self,
        every: int,
        seeds: Iterable[int],
        *,
        pairs: PairStore | None = None,
        sigmas: torch.Tensor | Sequence[float] | None = None,
        solver: Callable[..., torch.Tensor] = heun,
        batch: int = 256,
        use_ema: bool = True,
        block_size: int = 10_000,
        n_boot: int = 200,
        prefix: str = "",
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
        self.metric_kwargs: dict[str, Any] = dict(block_size=block_size, n_boot=n_boot)
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # z, x, labels

    def _teacher_pairs(self, distiller, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(z, x, labels)`` on ``device``, computed or loaded once."""
        teacher = distiller.teacher
        if self._cache is None:
            if self.pairs is not None:
                if isinstance(teacher, torch.nn.Module):
                    self.pairs.check_teacher(teacher)
                _, x, labels = self.pairs.load(self.seeds, device=device)
                z = self.pairs.load_noise(self.seeds, device=device).to(x.dtype)
            else:
                shape = getattr(distiller, "sample_shape", None) or getattr(teacher, "sample_shape", None)
                if shape is None:
                    raise ConfigError("DeltaECallback: the sample shape is unknown; pass pairs=")
                label_dim = int(getattr(distiller, "label_dim", getattr(teacher, "label_dim", 0)))
                grid = default_sigmas(teacher) if self.sigmas is None else self.sigmas
                z = noise_for_seeds(self.seeds, shape, device=device)
                labels = labels_for_seeds(self.seeds, label_dim, device=device) if label_dim else None
                xs = []
                with torch.no_grad():
                    for lo in range(0, len(self.seeds), self.batch):
                        y = labels[lo : lo + self.batch] if labels is not None else None
                        xs.append(teacher_ode(teacher, z[lo : lo + self.batch], grid, self.solver,
                                              class_labels=y))
                x = torch.cat(xs)
            self._cache = (z, x, labels)
        return self._cache

    def __call__(self, distiller: Any, step: int) -> dict[str, float] | None:
        if step % self.every != 0 or not getattr(distiller, "is_main", True):
            return None
        device = torch.device(getattr(distiller, "device", "cpu"))
        z, x_teacher, labels = self._teacher_pairs(distiller, device)
        ema = getattr(distiller, "ema_student", None)
        G = ema if (self.use_ema and ema is not None) else distiller.student
        was_training = G.training
        G.eval()
        try:
            with torch.no_grad():
                xs = []
                for lo in range(0, len(self.seeds), self.batch):
                    zb = z[lo : lo + self.batch]
                    if labels is None:
                        xs.append(G(zb))
                    else:
                        xs.append(G(zb, class_labels=labels[lo : lo + self.batch]))
                x_student = torch.cat(xs)
        finally:
            G.train(was_training)
        r = pairing_inefficiency(x_student, x_teacher.to(x_student.dtype), **self.metric_kwargs)
        values = dict(delta_e=r.delta_e, delta_e_lo=r.ci_low, delta_e_hi=r.ci_high, e_pair=r.e_pair,
                      e_opt=r.e_opt, e_ind=r.e_ind, resolution=r.resolution, own_pair_rate=r.own_pair_rate)
        return {self.prefix + k: float(v) for k, v in values.items()}
