"""dmdcopy: Distribution Matching Distillation and the Delta E copying metric.

The layers, bottom to top: ``schedules``, ``noise`` -> ``precond``, ``samplers``, ``teachers``,
``nets``, ``losses``, ``metrics`` -> ``students``, ``pairs``, ``io`` -> ``measure`` ->
``distill``, ``data``, ``experiments`` -> ``cli``. ``dmdcopy.experiments`` is imported on first
access, not by ``import dmdcopy``.
"""

from dmdcopy import (
    data,
    distill,
    errors,
    io,
    losses,
    measure,
    metrics,
    nets,
    noise,
    pairs,
    precond,
    samplers,
    schedules,
    students,
    teachers,
)
from dmdcopy.distill import DeltaECallback, DistillConfig, Distiller
from dmdcopy.errors import CheckpointError, ConfigError, DmdcopyError, NonFiniteError, ShapeError
from dmdcopy.io import load, save
from dmdcopy.measure import DeltaEReport, TeacherSamples, delta_e, measure_student, teacher_samples
from dmdcopy.metrics import (
    PairingInefficiency,
    PairingResult,
    TransportResult,
    pairing_inefficiency,
    transport_inefficiency,
)
from dmdcopy.nets import MLP, DhariwalUNet, ImageMLP, SongUNet
from dmdcopy.noise import labels_for_seeds, noise_for_seeds, parse_seeds
from dmdcopy.pairs import PairStore, generate_pairs
from dmdcopy.precond import EDMPrecond, Precond, VEPrecond, VPPrecond
from dmdcopy.samplers import dpmpp_2m, edm_stochastic, euler, heun, teacher_ode
from dmdcopy.schedules import dmd_sigma_grid, karras_sigmas, ve_sigmas, vp_sigmas
from dmdcopy.students import MultiStepStudent, OneStepStudent
from dmdcopy.teachers import EmpiricalTeacher, GaussianMixtureTeacher, GaussianTeacher

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``dmdcopy.experiments`` (studies, tables, figures) is imported on first use, so that
    # ``import dmdcopy`` stays light; its plotting and data extras load later still.
    if name == "experiments":
        import importlib

        return importlib.import_module("dmdcopy.experiments")
    raise AttributeError(f"module 'dmdcopy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"experiments"})


__all__ = [
    "MLP",
    "CheckpointError",
    "ConfigError",
    "DeltaECallback",
    "DeltaEReport",
    "DhariwalUNet",
    "DistillConfig",
    "Distiller",
    "DmdcopyError",
    "EDMPrecond",
    "EmpiricalTeacher",
    "GaussianMixtureTeacher",
    "GaussianTeacher",
    "ImageMLP",
    "MultiStepStudent",
    "NonFiniteError",
    "OneStepStudent",
    "PairStore",
    "PairingInefficiency",
    "PairingResult",
    "Precond",
    "ShapeError",
    "SongUNet",
    "TeacherSamples",
    "TransportResult",
    "VEPrecond",
    "VPPrecond",
    "__version__",
    "data",
    "delta_e",
    "distill",
    "dmd_sigma_grid",
    "dpmpp_2m",
    "edm_stochastic",
    "errors",
    "euler",
    "experiments",
    "generate_pairs",
    "heun",
    "io",
    "karras_sigmas",
    "labels_for_seeds",
    "load",
    "losses",
    "measure",
    "measure_student",
    "metrics",
    "nets",
    "noise",
    "noise_for_seeds",
    "pairing_inefficiency",
    "pairs",
    "parse_seeds",
    "precond",
    "samplers",
    "save",
    "schedules",
    "students",
    "teacher_ode",
    "teacher_samples",
    "teachers",
    "transport_inefficiency",
    "ve_sigmas",
    "vp_sigmas",
]
