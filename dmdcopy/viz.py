"""Pictures of a run: loss and Delta E curves from ``log.jsonl``, and image grids of samples.

matplotlib (the ``plot`` extra) is imported only when a picture is written.

- :func:`read_log` reads a distiller's ``log.jsonl`` (a truncated last line, as a killed run
  leaves, is skipped; any other bad line is one clear error).
- :func:`plot_run` writes ``losses.png``, ``grad_norms.png`` and, when the run measured it,
  ``delta_e.png``: the finite-N Delta E with its interval and the population bracket.
- :func:`image_grid` / :func:`save_image_grid` tile ``(N, C, H, W)`` images; with a second set
  (teacher samples from the same noise) the tiles alternate teacher / student: the picture of
  copying.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from dmdcopy._atomic import write_atomic
from dmdcopy.errors import ConfigError, ShapeError

__all__ = ["image_grid", "plot_run", "read_log", "save_figure", "save_image_grid"]

_LOSSES = ("generator_loss", "dmd_loss", "fake_score_loss", "dsm_loss", "gan_generator_loss",
           "gan_discriminator_loss", "regression_loss")
_GRADS = ("generator_grad_norm", "fake_score_grad_norm")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("pictures need matplotlib: pip install 'dmdcopy[plot]'") from None
    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically, in the format its suffix names (PNG without one): a
    killed run leaves the previous picture, never half of one."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` (one JSON object per line), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such log (a run directory holds log.jsonl)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable log ({type(e).__name__})") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # a write cut short by a kill: the run's records before it stand
                break
            raise ConfigError(f"{path}:{i + 1}: not a JSON record") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ConfigError(f"{path}:{i + 1}: a log record must be an object with a 'step'")
        records.append(rec)
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the run's curves as PNGs into ``out_dir`` (default: ``run_dir``); returns their paths."""
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    if not records:
        raise ConfigError(f"{run_dir}: the log has no records yet")
    out = Path(out_dir) if out_dir is not None else (run_dir if run_dir.is_dir() else run_dir.parent)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = []
    for name, keys, ylabel, log_y in (("losses", _LOSSES, "loss", False),
                                      ("grad_norms", _GRADS, "gradient norm", True)):
        present = [k for k in keys if _series(records, k)[0]]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in present:
            ax.plot(*_series(records, k), label=k)
        ax.set_xlabel("step (generator updates)")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, out / f"{name}.png"))
        plt.close(fig)
    prefixes = sorted({k[: -len("delta_e")] for r in records for k in r if k.endswith("delta_e")})
    if prefixes:
        fig, ax = plt.subplots(figsize=(7, 4))
        for p in prefixes:
            steps, de = _series(records, p + "delta_e")
            line = ax.plot(steps, de, "o-", label=f"{p}delta_e (finite N)")[0]
            bands = ((p + "bracket_low", p + "bracket_high", 0.12, "interval"),
                     (p + "delta_e_lower", p + "delta_e_upper", 0.3, "bracket"))
            for lo_key, hi_key, alpha, what in bands:
                s_lo, lo = _series(records, lo_key)
                s_hi, hi = _series(records, hi_key)
                if s_lo and s_lo == s_hi:
                    ax.fill_between(s_lo, lo, hi, color=line.get_color(), alpha=alpha,
                                    label=f"{p}population {what}")
        ax.set_xlabel("step (generator updates)")
        ax.set_ylabel("Delta E (0 = copies, 1 = random pairing)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, out / "delta_e.png"))
        plt.close(fig)
    return written


def image_grid(
    images: torch.Tensor,
    *,
    pair_with: torch.Tensor | None = None,
    ncol: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    pad: int = 1,
) -> np.ndarray:
    """Tile images into one ``(H', W', C)`` uint8 array.

    Args:
        images: ``(N, C, H, W)`` with ``C`` in {1, 3}, values in ``value_range`` (EDM's [-1, 1]).
        pair_with: ``(N, C, H, W)`` to interleave: tile ``2i`` is ``pair_with[i]`` (e.g. the teacher's
            sample), tile ``2i + 1`` is ``images[i]`` (the student's, from the same noise).
        ncol: tiles per row (default: about square; even when pairing).
        pad: pixels of black between tiles.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ShapeError(f"image_grid: expected images (N, C, H, W) with C in (1, 3), got {got}")
    x = images.detach().float().cpu()
    if pair_with is not None:
        if not isinstance(pair_with, torch.Tensor) or pair_with.shape != images.shape:
            raise ShapeError(f"image_grid: pair_with must have the images' shape {tuple(images.shape)}")
        pairs = torch.stack([pair_with.detach().float().cpu(), x], 1)  # (N, 2, C, H, W)
        x = rearrange(pairs, "n two c h w -> (n two) c h w")
    n = x.shape[0]
    if ncol is None:
        ncol = max(1, math.ceil(math.sqrt(n)))
        if pair_with is not None and ncol % 2:
            ncol += 1
    if not isinstance(ncol, int) or ncol < 1:
        raise ConfigError(f"image_grid: ncol must be a positive int, got {ncol!r}")
    nrow = math.ceil(n / ncol)
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # black frame around each tile
    x = torch.cat([x, x.new_zeros(nrow * ncol - n, *x.shape[1:])])  # fill the last row
    grid = rearrange(x, "(r k) c h w -> (r h) (k w) c", r=nrow, k=ncol)
    return (grid.numpy() * 255).round().astype(np.uint8)


def save_image_grid(path: str | os.PathLike, images: torch.Tensor, **kwargs) -> Path:
    """:func:`image_grid` written as a PNG at ``path`` (atomically: a reader never sees half)."""
    grid = image_grid(images, **kwargs)
    plt = _pyplot()
    if grid.shape[-1] == 1:
        return write_atomic(path, lambda tmp: plt.imsave(tmp, grid[..., 0], cmap="gray", vmin=0, vmax=255,
                                                         format="png"))
    return write_atomic(path, lambda tmp: plt.imsave(tmp, grid, format="png"))
