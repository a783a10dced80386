"""Writing experiment results: JSON (atomic, NaN-free), text tables, and matplotlib figures.

matplotlib is imported only when a figure is drawn, through the object API (``Figure`` with the
Agg canvas), so no global pyplot state or display backend is touched. Without matplotlib the
figure functions raise :class:`~dmdcopy.errors.ConfigError` saying what to install.

(About 500 lines: one table and one figure per experiment, kept together so that the three
experiments' outputs read alike; none of them is used anywhere else.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from dmdcopy._atomic import write_atomic
from dmdcopy._json import json_safe
from dmdcopy.errors import ConfigError
from dmdcopy.viz import image_grid, save_figure

__all__ = [
    "format_ablation_table",
    "format_digits_table",
    "format_seed_table",
    "format_sweep_table",
    "machine_info",
    "plot_ablations",
    "plot_bars",
    "plot_curves",
    "plot_digits",
    "plot_sweep",
    "require_matplotlib",
    "to_jsonable",
    "write_json",
]

# Student variants in the order tables and figures show them.
STUDENT_ORDER = ("teacher_init", "scratch")


def _plain(obj: Any) -> Any:
    """Tensors to lists, dataclasses to dicts, numpy scalars to Python numbers, keys to strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _plain(obj.detach().cpu().tolist())
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return _plain(obj.item())
    return str(obj)


def to_jsonable(obj: Any) -> Any:
    """Tensors to lists, dataclasses to dicts, non-finite floats to ``None`` (JSON has no NaN;
    :func:`dmdcopy._json.json_safe`, the library's one rule for it)."""
    return json_safe(_plain(obj))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``to_jsonable(obj)`` to ``path`` atomically (temp file + rename); returns the path."""
    text = json.dumps(to_jsonable(obj), indent=1, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be shared

    return write_atomic(path, write)


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on."""
    device = torch.device(device)
    info = dict(
        python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
        processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), device=str(device),
    )
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def require_matplotlib():
    """Import matplotlib's object API; raise a clear :class:`ConfigError` if it is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ConfigError(
            "figures need matplotlib: pip install 'dmdcopy[plot]' (or pass --no-plot)"
        ) from e
    return Figure, FigureCanvasAgg


def _fmt(v: float | None, digits: int = 3) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _pair(lo: float | None, hi: float | None) -> str:
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


# The figures beside each finite-N Delta E, in every table: its bootstrap interval, the bracket for
# the population Delta E (point estimates of its two ends) and the bracket's bootstrap ends.
_DE_HEAD = f"{'Delta E':>8} {'95% interval':>16} {'bracket':>16} {'bracket 95%':>16}"
_DE_NOTE = ("Delta E: the finite-N figure (exact assignment among N samples), biased towards 0 in high d.\n"
            "bracket: [delta_e_lower, delta_e_upper], the ends of an interval for the population Delta E.\n"
            "bracket 95%: the bracket's bootstrap ends, the interval to report (docs/delta_e.md).")


def _de_cells(de: dict) -> str:
    """The Delta E cells of a table row (:data:`_DE_HEAD`); results written before the bracket
    existed show ``n/a`` there."""
    return (f"{_fmt(de.get('delta_e')):>8} {_pair(de.get('ci_low'), de.get('ci_high')):>16} "
            f"{_pair(de.get('delta_e_lower'), de.get('delta_e_upper')):>16} "
            f"{_pair(de.get('bracket_low'), de.get('bracket_high')):>16}")


class _Warnings:
    """Footnotes for a table: each distinct warning text gets a number, rows list their numbers."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def mark(self, de: dict) -> str:
        texts = de.get("warnings")
        if texts is None:  # results written before ``warnings`` existed
            texts = [de["warning"]] if de.get("warning") else []
        return ",".join(str(self.numbers.setdefault(t, len(self.numbers) + 1)) for t in texts)

    def lines(self) -> list[str]:
        if not self.numbers:
            return ["warnings: none"]
        return ["warnings:"] + [f"  [{n}] {t}" for t, n in self.numbers.items()]


def _finish(lines: list[str], notes: _Warnings) -> str:
    return "\n".join([*(line.rstrip() for line in lines), "", _DE_NOTE, *notes.lines()])


def format_sweep_table(results: dict) -> str:
    """A plain-text table of a dimension sweep: one row per (data kind, d, student), with the
    finite-N Delta E, its bootstrap interval, the population bracket and the metric's warnings
    (numbered below the table)."""
    several = len(results.get("seeds") or [0]) > 1  # then a seed column after d
    seed_col = f"{'seed':>5} " if several else ""
    head = (f"{'data':<18} {'d':>5} {seed_col}{'student':<13} "
            f"{_DE_HEAD} {'res.':>5} {'own%':>5} "
            f"{'teacher ODE err':>15} {'SW student':>10} {'SW teacher':>10}  warn")
    lines = [head, "-" * len(head)]
    notes = _Warnings()
    for point in results["points"]:
        teacher = point["teacher"]
        where = f"{point['kind']:<18} {point['dim']:>5} "
        if several:
            where += f"{point.get('seed', ''):>5} "
        for name in STUDENT_ORDER:
            if name not in point["students"]:
                continue
            st = point["students"][name]
            de = st["delta_e"]
            if not st["finite"] or de is None:
                lines.append(f"{where}{name:<13} {_non_finite(st)}")
                continue
            lines.append(
                f"{where}{name:<13} {_de_cells(de)} "
                f"{_fmt(de['resolution'], 2):>5} {100 * (de['own_pair_rate'] or 0):>5.1f} "
                f"{_fmt(teacher['ode_error']['relative_rmse']):>15} "
                f"{_fmt(st['quality']['sliced_wasserstein']):>10} "
                f"{_fmt(teacher['quality']['sliced_wasserstein']):>10}  {notes.mark(de)}"
            )
    return _finish(lines, notes)


def _seed_label(row: dict) -> str:
    if "kind" in row:
        return f"{row['kind']} d={row['dim']} {row['student']}"
    if "variant" in row:
        return row["variant"]
    return f"{row['teacher']}/{row['student']}"


def format_seed_table(results: dict) -> str:
    """A plain-text table of the spread over seeds (``results["over_seeds"]``, any experiment): per
    point, the number of seeds, the mean and 95 % Student-t interval over seeds of the finite-N
    Delta E and of the two bracket ends, and the per-seed finite-N figures."""
    rows = results.get("over_seeds") or []
    labels = [_seed_label(r) for r in rows]
    width = max([len("point"), *map(len, labels)])
    head = (f"{'point':<{width}} {'n':>2} {'Delta E mean':>12} {'t 95% over seeds':>16} "
            f"{'lower mean':>10} {'t 95%':>16} {'upper mean':>10} {'t 95%':>16}  per seed")
    lines = [head, "-" * len(head)]
    for label, r in zip(labels, rows):
        de, lo, hi = r["delta_e"], r["delta_e_lower"], r["delta_e_upper"]
        per = " ".join(_fmt(v) for v in de["values"])
        lines.append(f"{label:<{width}} {de['n']:>2} {_fmt(de['mean']):>12} "
                     f"{_pair(de['t_low'], de['t_high']):>16} "
                     f"{_fmt(lo['mean']):>10} {_pair(lo['t_low'], lo['t_high']):>16} "
                     f"{_fmt(hi['mean']):>10} {_pair(hi['t_low'], hi['t_high']):>16}  {per}")
    lines += ["", "over seeds: mean and 95 % Student-t interval of the mean (mean -/+ t sd / sqrt(n)) of the",
              "finite-N Delta E and of the bracket ends (delta_e_lower, delta_e_upper); n/a with one seed."]
    return "\n".join(line.rstrip() for line in lines)


def _curve_mean(curves: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and the mean over seeds of ``key`` of curves measured at the same steps (NaN where a
    seed has no figure)."""
    steps = curves[0]["step"]
    same = [c for c in curves if c["step"] == steps]
    vals = [[_num(c[key][i]) for c in same] for i in range(len(steps))]
    return steps, [sum(v) / len(v) for v in vals]


def plot_curves(results: dict, path: str | os.PathLike) -> Path:
    """Delta E over training for a dimension sweep, saved as PNG at ``path``.

    One column per (data kind, student); top row: Delta E against generator steps, one colour per d,
    the finite-N figure as a line and the bracket ``[delta_e_lower, delta_e_upper]`` as a band of
    the same colour (means over seeds, when there are several); bottom row: the student's sliced
    Wasserstein distance to exact data over its floor (two exact sample sets), at the same steps:
    1 is as close as N samples can tell, so a Delta E read off a curve still far above 1 there is
    that of a student that has not yet matched the data.
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    points = results["points"]
    cols = list(dict.fromkeys((p["kind"], name) for p in points for name in STUDENT_ORDER
                              if "curve" in p["students"].get(name, {})))
    fig = Figure(figsize=(4.5 * max(1, len(cols)), 7.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, max(1, len(cols)), squeeze=False)
    for j, (kind, name) in enumerate(cols):
        ax, ax2 = axes[0][j], axes[1][j]
        dims = list(dict.fromkeys(p["dim"] for p in points if p["kind"] == kind))
        for dim in dims:
            curves = [p["students"][name]["curve"] for p in points
                      if p["kind"] == kind and p["dim"] == dim and "curve" in p["students"].get(name, {})]
            if not curves:
                continue
            steps, de = _curve_mean(curves, "delta_e")
            _, lo = _curve_mean(curves, "delta_e_lower")
            _, hi = _curve_mean(curves, "delta_e_upper")
            line = ax.plot(steps, de, marker=".", label=f"d = {dim}")[0]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
            _, q = _curve_mean(curves, "quality")
            floor = sum(_num(c.get("quality_floor")) for c in curves) / len(curves)
            ax2.plot(steps, [v / floor if floor > 0 else float("nan") for v in q], marker=".",
                     color=line.get_color(), label=f"d = {dim}")
        n_seeds = len(results.get("seeds") or [0])
        ax.set_title(f"{kind}, {name}" + (f" (mean of {n_seeds} seeds)" if n_seeds > 1 else ""))
        ax.axhline(0, color="grey", lw=0.5)
        ax.axhline(1, color="grey", lw=0.5, ls=":")
        ax.set_xlabel("generator steps")
        ax.set_ylabel("Delta E: line finite-N, band bracket")
        ax.legend(fontsize=8)
        ax2.axhline(1, color="grey", lw=0.5, ls=":")
        ax2.set_yscale("log")
        ax2.set_xlabel("generator steps")
        ax2.set_ylabel("sliced Wasserstein / floor")
    return save_figure(fig, path)


def _num(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _series(points: list[dict], kind: str, name: str) -> dict[str, list]:
    """Per d, a student's finite-N Delta E with its interval's distances below and above, and the
    population bracket's bootstrap ends (its point estimates where there was no bootstrap; NaN,
    a gap in the band, where the results have no bracket)."""
    out: dict[str, list] = dict(dims=[], ys=[], lo=[], hi=[], band_lo=[], band_hi=[])
    for p in points:
        if p["kind"] != kind or name not in p["students"]:
            continue
        de = p["students"][name]["delta_e"]
        if de is None or de["delta_e"] is None:  # None: the student's samples were not finite
            continue
        y = de["delta_e"]
        out["dims"].append(p["dim"])
        out["ys"].append(y)
        out["lo"].append(y - (de["ci_low"] if de["ci_low"] is not None else y))
        out["hi"].append((de["ci_high"] if de["ci_high"] is not None else y) - y)
        low, high = _bracket(de)
        out["band_lo"].append(_num(low))
        out["band_hi"].append(_num(high))
    return out


def plot_sweep(results: dict, path: str | os.PathLike, *, max_lines: int = 150) -> Path:
    """Figure of a dimension sweep, saved as PNG at ``path``.

    Top row: Delta E against d (log axis) per data kind, one line per student variant: the
    finite-N figure with bars for its bootstrap interval, and a shaded band of the same colour for
    the bracket that should contain the population Delta E (its bootstrap ends); the
    teacher-initialised student's finite-N Delta E before training (dotted), and the teacher's own
    finite-N Delta E against the exact ODE as a dashed reference.
    Bottom row (when the sweep has d = 2): for each data kind, the teacher's sample ``T(z)`` (blue)
    and the teacher-initialised student's ``G(z)`` (orange; without that student, the one from
    scratch) of the same noise ``z``, joined by a grey
    segment: short segments mean the student sends each noise where the teacher does (copying),
    long crossing ones that it remaps the noise.
    With several seeds the figure shows the first seed's points (the spread over seeds is in
    ``results["over_seeds"]`` and :func:`format_seed_table`; :func:`plot_curves` averages seeds).
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    first = (results.get("seeds") or [None])[0]
    points = [p for p in results["points"] if p.get("seed", first) == first]  # the first seed's
    kinds = list(dict.fromkeys(p["kind"] for p in points))
    pairs_2d = results.get("pairs_2d") or {}
    rows = 2 if pairs_2d else 1
    fig = Figure(figsize=(4.5 * max(1, len(kinds)), 4.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, max(1, len(kinds)), squeeze=False)
    for j, kind in enumerate(kinds):
        ax = axes[0][j]
        for name, marker in zip(STUDENT_ORDER, ("o", "s")):
            sr = _series(points, kind, name)
            if sr["dims"]:
                line = ax.errorbar(sr["dims"], sr["ys"], yerr=[sr["lo"], sr["hi"]], marker=marker, capsize=3,
                                   label=f"student: {name}, finite-N")
                ax.fill_between(sr["dims"], sr["band_lo"], sr["band_hi"], color=line[0].get_color(),
                                alpha=0.18, lw=0, label=f"student: {name}, population bracket")
        init = [(p["dim"], p["students"]["teacher_init"].get("delta_e_at_init")) for p in points
                if p["kind"] == kind and "teacher_init" in p["students"]]
        init = [(d, v) for d, v in init if v is not None]
        if init:
            ax.plot(*zip(*init), ls=":", marker="x", color="tab:blue", alpha=0.6,
                    label="teacher_init before DMD")
        ref = [(p["dim"], p["teacher"]["delta_e_vs_exact"]["delta_e"]) for p in points
               if p["kind"] == kind and p["teacher"].get("delta_e_vs_exact", {}).get("delta_e") is not None]
        if ref:
            ax.plot(*zip(*ref), "k--", lw=1, label="trained vs exact teacher")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axhline(1, color="grey", lw=0.5, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dimension d")
        ax.set_ylabel("Delta E (0 = copies, 1 = random pairing)")
        ax.set_title(kind)
        ax.legend(fontsize=8)
        if rows == 2:
            ax2 = axes[1][j]
            pic = pairs_2d.get(kind)
            if pic is None:
                ax2.set_axis_off()
                continue
            # the teacher-initialised student when there is one, else the first student drawn
            who = next((k for k in ("student_teacher_init", "student_scratch") if k in pic),
                       next((k for k in pic if k.startswith("student_")), None))
            t = pic["teacher"][:max_lines]
            s = pic[who][:max_lines] if who is not None else []
            for (tx, ty), (sx, sy) in zip(t, s):
                ax2.plot([tx, sx], [ty, sy], color="0.75", lw=0.6)
            ax2.scatter([p[0] for p in t], [p[1] for p in t], s=6, label="teacher T(z)")
            if who is not None:
                ax2.scatter([p[0] for p in s], [p[1] for p in s], s=6,
                            label=f"student G(z) ({who.removeprefix('student_')})")
            ax2.set_aspect("equal", adjustable="datalim")
            ax2.set_title(f"{kind}, d = 2: same noise z")
            ax2.legend(fontsize=8)
    return save_figure(fig, path)


def _non_finite(rec: dict) -> str:
    k = rec.get("n_nonfinite")
    return "non-finite samples" + (f" ({k} of {rec['n']})" if k and rec.get("n") else "")


def format_ablation_table(results: dict) -> str:
    """A plain-text table of an ablation run: one row per variant, with the finite-N Delta E, its
    interval, the population bracket and the metric's warnings (numbered below the table)."""
    head = (f"{'variant':<22} {_DE_HEAD} {'vs exact':>8} {'transport':>9} "
            f"{'SW student':>10} {'SW teacher':>10} {'T transport':>11}  warn")
    lines = [head, "-" * len(head)]
    notes = _Warnings()
    for name, rec in results["variants"].items():
        if not rec["finite"]:
            lines.append(f"{name:<22} {_non_finite(rec)}")
            continue
        de = rec["delta_e"]
        lines.append(
            f"{name:<22} {_de_cells(de)} "
            f"{_fmt(rec['delta_e_vs_exact']['delta_e']):>8} {_fmt(rec['transport']['value']):>9} "
            f"{_fmt(rec['quality']['sliced_wasserstein']):>10} "
            f"{_fmt(rec['teacher_quality']['sliced_wasserstein']):>10} "
            f"{_fmt(rec.get('teacher_transport')):>11}  {notes.mark(de)}"
        )
    return _finish(lines, notes)


def format_digits_table(results: dict) -> str:
    """A plain-text table of the digits experiment: one row per (teacher, student), with the
    finite-N Delta E, its interval, the population bracket and the metric's warnings."""
    head = (f"{'teacher':<14} {'student':<13} {_DE_HEAD} {'SW held-out':>11} "
            f"{'memorised':>9} {'teacher SW':>10} {'teacher mem.':>12}  warn")
    lines = [head, "-" * len(head)]
    notes = _Warnings()
    for name, rec in results["teachers"].items():
        tq = rec["quality"]
        for init, st in rec["students"].items():
            if not st["finite"]:
                lines.append(f"{name:<14} {init:<13} {_non_finite(st)}")
                continue
            de = st["delta_e"]
            lines.append(
                f"{name:<14} {init:<13} {_de_cells(de)} "
                f"{_fmt(st['quality']['sliced_wasserstein_held_out']):>11} "
                f"{_fmt(st['quality']['memorised_rate'], 2):>9} "
                f"{_fmt(tq['sliced_wasserstein_held_out']):>10} {_fmt(tq['memorised_rate'], 2):>12}  "
                f"{notes.mark(de)}"
            )
    return _finish(lines, notes)


def plot_bars(rows: list[tuple[str, float | None, float | None, float | None]], path: str | os.PathLike,
              *, title: str, brackets: list[tuple[float | None, float | None]] | None = None) -> Path:
    """A bar chart of Delta E with interval bars: ``rows`` of ``(label, value, low, high)``; with
    ``brackets`` (one ``(low, high)`` per row), an orange bar beside each for the bracket of the
    population Delta E."""
    Figure, FigureCanvasAgg = require_matplotlib()
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = [r[0] for r in rows]
    vals = [r[1] if r[1] is not None else float("nan") for r in rows]
    lo = [(r[1] - r[2]) if None not in (r[1], r[2]) else 0.0 for r in rows]
    hi = [(r[3] - r[1]) if None not in (r[1], r[3]) else 0.0 for r in rows]
    ax.bar(range(len(rows)), vals, yerr=[lo, hi], capsize=3, color="tab:blue", ecolor="0.25",
           label="finite-N, bootstrap interval")
    if brackets is not None:
        b_lo, b_hi = [_num(b[0]) for b in brackets], [_num(b[1]) for b in brackets]
        mid = [(a + b) / 2 for a, b in zip(b_lo, b_hi)]
        half = [(b - a) / 2 for a, b in zip(b_lo, b_hi)]
        ax.errorbar([i + 0.3 for i in range(len(rows))], mid, yerr=half, fmt="none", ecolor="tab:orange",
                    elinewidth=2.5, capsize=3, label="population bracket (95%)")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.axhline(1, color="grey", lw=0.5, ls=":")
    ax.set_ylabel("Delta E (0 = copies, 1 = random pairing)")
    ax.set_title(title)
    return save_figure(fig, path)


def _bracket(de: dict) -> tuple[float | None, float | None]:
    """The bracket's bootstrap ends, or its point estimates where there was no bootstrap."""
    low, high = de.get("bracket_low"), de.get("bracket_high")
    return (low if low is not None else de.get("delta_e_lower"),
            high if high is not None else de.get("delta_e_upper"))


def plot_ablations(results: dict, path: str | os.PathLike) -> Path:
    """Delta E per ablation variant, with bootstrap intervals and population brackets."""
    rows, brackets = [], []
    for name, rec in results["variants"].items():
        de = rec["delta_e"] or {}
        rows.append((name, de.get("delta_e"), de.get("ci_low"), de.get("ci_high")))
        brackets.append(_bracket(de))
    d = results["data"]
    return plot_bars(rows, path, title=f"ablations: {d['kind']}, d = {d['dim']}", brackets=brackets)


def plot_digit_pairs(results: dict, path: str | os.PathLike) -> Path | None:
    """The picture of copying for the digits study: one row per teacher level and student, each
    with the teacher's and the student's images of the same evaluation noises side by side
    (teacher left). ``None`` when the results hold no pictures (written before they were kept)."""
    rows = [(f"{name} / {init}", st["pictures"]) for name, rec in results["teachers"].items()
            for init, st in rec["students"].items() if st.get("pictures")]
    if not rows:
        return None
    Figure, FigureCanvasAgg = require_matplotlib()
    fig = Figure(figsize=(8, 1.2 * len(rows) + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for ax, (label, pic) in zip(axes[:, 0], rows):
        teacher, student = (torch.nan_to_num(torch.tensor(pic[k])) for k in ("teacher", "student"))
        grid = image_grid(student, pair_with=teacher, ncol=2 * len(student))
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=8, loc="left")
        ax.set_axis_off()
    fig.suptitle("teacher (left of each pair) and student from the same noise", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_digits(results: dict, path: str | os.PathLike) -> Path:
    """Delta E per digits teacher (convergence levels, memorising) and student init."""
    rows, brackets = [], []
    for name, rec in results["teachers"].items():
        for init, st in rec["students"].items():
            de = st["delta_e"] or {}
            rows.append((f"{name}/{init}", de.get("delta_e"), de.get("ci_low"), de.get("ci_high")))
            brackets.append(_bracket(de))
    res = results["config"]["resolution"]
    return plot_bars(rows, path, title=f"digits {res}x{res}", brackets=brackets)
