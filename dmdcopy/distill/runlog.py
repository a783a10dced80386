"""The run's log: ``log.jsonl`` (one strict-JSON record per logged step) and optional TensorBoard.

Only the main process writes; on other processes every method is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmdcopy.distill.method import FakeScoreRecord, GeneratorRecord
from dmdcopy.errors import ConfigError

__all__ = ["RunLog", "Window"]


def _mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


@dataclass
class Window:
    """The update records since the last log line."""

    fake: list[FakeScoreRecord] = field(default_factory=list)
    gen: list[GeneratorRecord] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def means(self, *, gan: bool, regression: bool) -> dict[str, float]:
        """This process's means over the window's completed (not skipped) updates; NaN if none."""
        fg = [r for r in self.gen if not r.skipped]
        ff = [r for r in self.fake if not r.skipped]
        out = {"generator_loss": _mean([r.loss for r in fg]), "dmd_loss": _mean([r.dmd_loss for r in fg]),
               "generator_grad_norm": _mean([r.grad_norm for r in fg]),
               "fake_score_loss": _mean([r.loss for r in ff]), "dsm_loss": _mean([r.dsm_loss for r in ff]),
               "fake_score_grad_norm": _mean([r.grad_norm for r in ff])}
        if gan:
            out["gan_generator_loss"] = _mean([r.gan_loss for r in fg])
            out["gan_discriminator_loss"] = _mean([r.gan_loss for r in ff])
        if regression:
            out["regression_loss"] = _mean([r.regression_loss for r in fg])
        return out

    def seconds(self) -> float:
        return time.perf_counter() - self.start


class RunLog:
    """``out_dir/log.jsonl`` and, with ``tensorboard``, ``out_dir/tensorboard``.

    Args:
        out_dir: ``None`` writes nothing.
        is_main: whether this process writes.
        tensorboard: also write the scalars with TensorBoard's ``SummaryWriter`` (needs the package).
    """

    def __init__(self, out_dir: Path | None, *, is_main: bool, tensorboard: bool = False) -> None:
        self.path = out_dir / "log.jsonl" if (out_dir is not None and is_main) else None
        self._tb = None
        if tensorboard and self.path is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("tensorboard=True needs the tensorboard package: pip install tensorboard"
                                  ) from e
            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (it holds ``"step"``)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # strict JSON: a NaN or inf figure (e.g. a non-finite Delta E measurement) is written as null
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def trim(self, step: int) -> None:
        """Drop records written after ``step`` (a resumed run writes them again)."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
        tmp = self.path.with_name(".log.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (``log.jsonl`` is opened per record)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
