"""dmdcopy: Distribution Matching Distillation and the Delta E copying metric."""

from dmdcopy import errors, noise, precond, schedules
from dmdcopy.errors import CheckpointError, ConfigError, DmdcopyError, NonFiniteError, ShapeError
from dmdcopy.nets import MLP
from dmdcopy.noise import labels_for_seeds, noise_for_seeds, parse_seeds
from dmdcopy.precond import EDMPrecond, Precond, VEPrecond, VPPrecond
from dmdcopy.schedules import dmd_sigma_grid, karras_sigmas, ve_sigmas, vp_sigmas

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "CheckpointError",
    "ConfigError",
    "DmdcopyError",
    "EDMPrecond",
    "NonFiniteError",
    "Precond",
    "ShapeError",
    "VEPrecond",
    "VPPrecond",
    "__version__",
    "dmd_sigma_grid",
    "errors",
    "karras_sigmas",
    "labels_for_seeds",
    "noise",
    "noise_for_seeds",
    "parse_seeds",
    "precond",
    "schedules",
    "ve_sigmas",
    "vp_sigmas",
]
