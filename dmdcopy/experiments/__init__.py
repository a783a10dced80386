"""Reproductions of the copying findings: dimension sweeps, digits, ablations; JSON and figures.

>>> from dmdcopy.experiments import SWEEP_PRESETS
>>> sorted(SWEEP_PRESETS)
['default', 'full', 'long', 'quick']
"""

from dmdcopy.experiments.ablations import (
    ABLATION_PRESETS,
    DEFAULT_VARIANTS,
    AblationConfig,
    Variant,
    run_ablations,
)
from dmdcopy.experiments.common import gaussian_frechet, map_error, over_seeds
from dmdcopy.experiments.digits import DIGITS_PRESETS, DigitsConfig, memorisation_stats, run_digits
from dmdcopy.experiments.kinds import DATA_KINDS, DataKind, GaussianMixtureKind, PowerLawGaussianKind
from dmdcopy.experiments.pipeline import distill_student, evaluate_student, make_student
from dmdcopy.experiments.report import (
    format_ablation_table,
    format_digits_table,
    format_seed_table,
    format_sweep_table,
    plot_ablations,
    plot_curves,
    plot_digits,
    plot_sweep,
    write_json,
)
from dmdcopy.experiments.resume import ResultsFile, strip_timing
from dmdcopy.experiments.sweep import (
    SWEEP_PRESETS,
    SweepConfig,
    point_seeds,
    run_dimension_sweep,
    run_sweep_point,
)
from dmdcopy.experiments.teacher_cache import cached_teacher
from dmdcopy.experiments.teacher_training import (
    TeacherConfig,
    TrainedTeacher,
    mixed_training_sigmas,
    ode_map_error,
    train_teacher,
)

__all__ = [
    "ABLATION_PRESETS",
    "DATA_KINDS",
    "DEFAULT_VARIANTS",
    "DIGITS_PRESETS",
    "SWEEP_PRESETS",
    "AblationConfig",
    "DataKind",
    "DigitsConfig",
    "GaussianMixtureKind",
    "PowerLawGaussianKind",
    "ResultsFile",
    "SweepConfig",
    "TeacherConfig",
    "TrainedTeacher",
    "Variant",
    "cached_teacher",
    "distill_student",
    "evaluate_student",
    "format_ablation_table",
    "format_digits_table",
    "format_seed_table",
    "format_sweep_table",
    "gaussian_frechet",
    "make_student",
    "map_error",
    "memorisation_stats",
    "mixed_training_sigmas",
    "ode_map_error",
    "over_seeds",
    "plot_ablations",
    "plot_curves",
    "plot_digits",
    "plot_sweep",
    "point_seeds",
    "run_ablations",
    "run_digits",
    "run_dimension_sweep",
    "run_sweep_point",
    "strip_timing",
    "train_teacher",
    "write_json",
]
