"""``DistillConfig``: every constant of a DMD / DMD2 run, with DMD2's ImageNet-64 defaults.

The defaults follow DMD2's one-step ImageNet 64x64 recipe (AdamW at 2e-6 for generator and fake
score, 5 fake-score updates per generator update, grad clip 10, Karras grid of 1000 sigmas); the
GAN term is off by default and takes DMD2's weights (1e-2 / 3e-3) when switched on.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dmdcopy.errors import ConfigError

__all__ = ["COMPILE_MODES", "PRESETS", "REGRESSION_LOSSES", "SHARDINGS", "TEACHER_DTYPES", "DistillConfig"]

# The regression losses a config may name; the distiller maps the name to a function.
REGRESSION_LOSSES = ("l2", "pseudo_huber")
# Dtypes the frozen teacher may be held in (``teacher_dtype``), and the ways to spread the trained
# networks over processes (``sharding``).
TEACHER_DTYPES = ("bfloat16", "float16")
SHARDINGS = ("ddp", "fsdp")
# torch.compile's modes (``compile_mode``); "reduce-overhead" captures CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Upper bounds on sizes, checked before anything is allocated (a batch or grid past these is a typo,
# not a run): integers fit an int64; a global batch fits an int32 index; the sigma grid is small.
MAX_INT = 2**63 - 1
MAX_BATCH_SIZE = 2**31 - 1
MAX_NUM_SIGMAS = 10**7
# Real numbers stay well inside float32 (the optimisers and losses pass them to float32 kernels);
# noise levels, learning rates and weight decay, whose products and squares meet, stay below 1e6.
MAX_FLOAT = 1e30
MAX_SCALE = 1e6

# Named starting points (``DistillConfig.preset(name, **overrides)``, or ``preset = "toy"`` in a
# ``[distill]`` table). Each is the set of fields it changes from the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # DMD2's one-step ImageNet 64x64 recipe: the defaults (lr 2e-6, batch 280, 400k steps, EMA).
    "imagenet64": {},
    # Small networks (MLPs, tiny UNets) trained from scratch on a CPU in minutes: lr 1e-3 (DMD2's
    # 2e-6 is for networks 10^4 times larger and would not move these), no weight decay, a short
    # EMA, float32, logs every 50 steps and a checkpoint every 500.
    "toy": dict(num_steps=2000, batch_size=256, generator_lr=1e-3, fake_score_lr=1e-3,
                weight_decay=0.0, ema_halflife_steps=50.0, mixed_precision=False, log_every=50,
                checkpoint_every=500),
}

# The run-length warning: AdamW moves a weight by about ``lr`` per update at most, so a run whose
# ``lr x updates`` is below this cannot move a network far from where it started (the presets
# give 0.8 for DMD2's ImageNet-64 recipe and 2 for "toy"). Runs under 100 steps are smoke tests.
MIN_LR_STEPS = 0.01
_WARN_FROM_STEPS = 100

# Fields that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = frozenset({
    "num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "progress_bar", "tensorboard",
    "max_nonfinite_in_a_row", "compile", "compile_mode", "channels_last", "fused_optimizer",
})


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Configuration of a distillation run. All fields are keyword-only; ``validate()`` runs on
    construction and names the offending field.

    >>> DistillConfig(batch_size=8).fake_score_steps
    5
    >>> DistillConfig(generator_lr=-1.0)
    Traceback (most recent call last):
    ...
    dmdcopy.errors.ConfigError: generator_lr must be > 0, got -1.0
    """

    # --- run length and batch -------------------------------------------------------------
    num_steps: int = 400_000          # training steps, each ending in a generator update (DMD2: 400k)
    batch_size: int = 280             # GLOBAL batch; split evenly over processes (DMD2: 40 x 7 GPUs)
    seed: int = 0                     # every draw derives from (seed, step, sub-step, sample index)

    # --- optimisers (AdamW for both networks) -----------------------------------------------
    generator_lr: float = 2e-6
    fake_score_lr: float = 2e-6       # also trains the GAN classifier head when gan=True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float | None = 10.0    # max global grad norm per update; None or inf = no clipping
    fake_score_steps: int = 5         # two time-scale rule: fake-score updates per generator update

    # --- noise levels: Karras grid, as DMD2 -------------------------------------------------
    num_sigmas: int = 1000            # grid size; index 0 = sigma_min, index num_sigmas-1 = sigma_max
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5           # fake-score weighting sigma^-2 + sigma_data^-2
    generator_k_range: tuple[int, int] = (20, 980)    # DMD loss: k ~ U{20..980} (2 % - 98 %)
    fake_score_k_range: tuple[int, int] = (0, 999)    # fake-score denoising loss: k ~ U{0..999}

    # --- distribution matching loss ---------------------------------------------------------
    dmd_weight: float = 1.0
    min_normaliser: float = 1e-6      # clamp of the per-sample normaliser mean|x - D_real(x_t)|

    # --- GAN (DMD2): classifier head on fake-score features ----------------------------------
    gan: bool = False
    gan_feature_module: str | None = None   # submodule of the fake score whose output the head reads
    gan_discriminator_weight: float = 1e-2  # DMD2 cls_loss_weight (fake-score side)
    gan_generator_weight: float = 3e-3      # DMD2 gen_cls_loss_weight
    gan_k_range: tuple[int, int] = (0, 999)  # noise levels of the diffusion GAN's inputs

    # --- regression to stored teacher pairs (DMD v1's auxiliary loss) ------------------------
    regression_weight: float = 0.0    # 0 = off
    regression_loss: str = "l2"       # "l2" or "pseudo_huber"
    regression_batch_size: int | None = None  # global; None = batch_size

    # --- EMA of the student -----------------------------------------------------------------
    ema_halflife_steps: float | None = 6931.0  # in generator updates (6931 ~ decay 0.9999); None or 0 = off

    # --- precision and compilation ----------------------------------------------------------
    mixed_precision: bool = True      # bf16 autocast on CUDA; no effect on CPU unless autocast_on_cpu
    autocast_on_cpu: bool = False     # with mixed_precision, bf16 autocast on CPU too (numerics checks)
    compile: bool = False             # torch.compile the student and fake-score calls
    compile_mode: str | None = None   # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)

    # --- speed levers (docs/performance.md measures each) -----------------------------------
    channels_last: bool = False       # student, fake score and teacher in channels_last memory format
    fused_optimizer: bool = False     # AdamW(fused=True): one kernel per update (CUDA; CPU in torch >= 2.4)
    teacher_dtype: str | None = None  # "bfloat16" / "float16": the frozen teacher's weights cast to it,
                                      # called under torch.inference_mode; None = the run's dtype
    sharding: str = "ddp"             # under torch.distributed: "ddp" (replicate) or "fsdp" (FSDP2)

    # --- faults -----------------------------------------------------------------------------
    max_nonfinite_in_a_row: int = 10  # stop with NonFiniteError after this many skipped updates

    # --- output -----------------------------------------------------------------------------
    log_every: int = 100              # JSONL (and TensorBoard) record interval, in steps
    checkpoint_every: int = 5000      # checkpoint interval in steps (a final one is always written)
    keep_checkpoints: int = 3         # keep the newest K checkpoint files
    progress_bar: bool = True         # tqdm on rank 0
    tensorboard: bool = False         # also write TensorBoard scalars (needs `tensorboard`)

    def __post_init__(self) -> None:
        # Normalise sequences (TOML and JSON give lists); a value that is no sequence of numbers is a
        # ConfigError naming the field, not a bare ValueError / TypeError from float() or int().
        # Integer pairs take integers only (2.5 is not an index); a bool is neither.
        for name, cast in (("betas", float), ("generator_k_range", operator.index),
                           ("fake_score_k_range", operator.index), ("gan_k_range", operator.index)):
            value = getattr(self, name)
            kind = "numbers" if cast is float else "integers"
            try:
                if isinstance(value, (str, bytes)) or any(isinstance(v, (bool, str)) for v in value):
                    raise TypeError
                object.__setattr__(self, name, tuple(cast(v) for v in value))
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"{name} must be a pair of {kind}, got {value!r}") from None
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        def positive_int(name: str, hi: int = MAX_INT) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi, name,
                 f"an int in [1, {hi}]")

        def finite(name: str, lo: float = -math.inf, strict: bool = True, hi: float = MAX_FLOAT) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and -math.inf < v < math.inf
            ok = ok and (v > lo if strict else v >= lo)
            need(ok, name, f"{'>' if strict else '>='} {lo:g}" if lo > -math.inf else "finite")
            need(v <= hi, name, f"<= {hi:g}")

        for name in ("num_steps", "fake_score_steps", "log_every", "checkpoint_every",
                     "keep_checkpoints", "max_nonfinite_in_a_row"):
            positive_int(name)
        positive_int("batch_size", MAX_BATCH_SIZE)
        positive_int("num_sigmas", MAX_NUM_SIGMAS)
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_INT,
             "seed", f"an int in [0, {MAX_INT}]")
        for name in ("gan", "mixed_precision", "autocast_on_cpu", "compile", "channels_last",
                     "fused_optimizer", "progress_bar", "tensorboard"):
            need(isinstance(getattr(self, name), bool), name, "true or false")
        for name in ("generator_lr", "fake_score_lr", "sigma_min", "sigma_data", "rho"):
            finite(name, 0.0, hi=MAX_SCALE)
        finite("weight_decay", 0.0, strict=False, hi=MAX_SCALE)
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
             "two numbers in [0, 1)")
        if self.grad_clip is not None:
            need(isinstance(self.grad_clip, (int, float)) and not isinstance(self.grad_clip, bool)
                 and self.grad_clip > 0 and (self.grad_clip == math.inf or self.grad_clip <= MAX_FLOAT),
                 "grad_clip", "> 0 (or None / inf for no clipping)")
        finite("sigma_max", 0.0, hi=MAX_SCALE)
        if not self.sigma_min < self.sigma_max:
            raise ConfigError(f"sigma_min must be < sigma_max, got sigma_min={self.sigma_min}, "
                              f"sigma_max={self.sigma_max}")
        for name in ("generator_k_range", "fake_score_k_range", "gan_k_range"):
            lo_hi = getattr(self, name)
            need(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] < self.num_sigmas, name,
                 f"(low, high) with 0 <= low <= high < num_sigmas={self.num_sigmas}")
        finite("dmd_weight", 0.0, strict=False)
        finite("min_normaliser", 0.0)
        finite("gan_discriminator_weight", 0.0, strict=False)
        finite("gan_generator_weight", 0.0, strict=False)
        need(self.gan_feature_module is None or isinstance(self.gan_feature_module, str),
             "gan_feature_module", "a string (the name of a fake-score submodule)")
        if self.gan:
            need(isinstance(self.gan_feature_module, str) and bool(self.gan_feature_module),
                 "gan_feature_module", "the name of a fake-score submodule when gan=True")
        finite("regression_weight", 0.0, strict=False)
        need(isinstance(self.regression_loss, str) and self.regression_loss in REGRESSION_LOSSES,
             "regression_loss", f"one of {REGRESSION_LOSSES}")
        if self.regression_batch_size is not None:
            positive_int("regression_batch_size", MAX_BATCH_SIZE)
        if self.ema_halflife_steps is not None:
            finite("ema_halflife_steps", 0.0, strict=False)
        need(self.teacher_dtype is None or self.teacher_dtype in TEACHER_DTYPES, "teacher_dtype",
             f"None or one of {TEACHER_DTYPES}")
        need(self.sharding in SHARDINGS, "sharding", f"one of {SHARDINGS}")
        need(self.compile_mode is None or (self.compile_mode in COMPILE_MODES and self.compile),
             "compile_mode", f"None, or one of {COMPILE_MODES} with compile=true")
        if self.channels_last and self.sharding == "fsdp":
            raise ConfigError("channels_last must be false with sharding='fsdp' (torch's FSDP2 "
                              "refuses non-contiguous parameters: NotImplementedError)")

    def replace(self, **changes: Any) -> DistillConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields (tuples become lists)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> DistillConfig:
        """Build from a mapping (e.g. a TOML table); an unknown key is a :class:`ConfigError`.
        A ``preset`` key starts from that preset (:meth:`preset`); the other keys override it."""
        data = dict(data)
        preset = data.pop("preset", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known | {'preset'})}")
        if preset is not None:
            return cls.preset(preset, where=where, **data)
        return cls(**data)

    @classmethod
    def preset(cls, name: str, *, where: str = "preset", **overrides: Any) -> DistillConfig:
        """A named starting point (:data:`PRESETS`) with ``overrides`` applied.

        >>> DistillConfig.preset("toy", num_steps=600).generator_lr
        0.001
        >>> DistillConfig.preset("imagenet64") == DistillConfig()
        True
        """
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"{where}: unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def budget_warning(self) -> str | None:
        """A sentence when the learning rates times the update counts are too small to move a
        network within ``num_steps`` (see :data:`MIN_LR_STEPS`); ``None`` otherwise."""
        if self.num_steps < _WARN_FROM_STEPS:
            return None
        moves = {"generator_lr": (self.generator_lr, self.num_steps),
                 "fake_score_lr": (self.fake_score_lr, self.num_steps * self.fake_score_steps)}
        short = [f"{name} x updates = {lr:g} x {n} = {lr * n:.2g}" for name, (lr, n) in moves.items()
                 if lr * n < MIN_LR_STEPS]
        if not short:
            return None
        return (f"{'; '.join(short)}: AdamW moves a weight by about lr per update, so this run can "
                f"barely move its networks (DMD2's ImageNet-64 recipe has 0.8, the 'toy' preset 2). "
                "Raise the learning rates or num_steps, e.g. DistillConfig.preset('toy', ...) or "
                "preset = \"toy\" in [distill], for small networks")
