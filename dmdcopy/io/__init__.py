"""Checkpoints: dmdcopy's safetensors format, and EDM / DMD2 imports that execute nothing.

>>> from dmdcopy.io import save, load  # doctest: +SKIP
>>> save(teacher, "teacher.safetensors"); teacher = load("teacher.safetensors")  # doctest: +SKIP
"""

from dmdcopy.io.architectures import build_module, edm_imagenet64_adm, module_spec
from dmdcopy.io.checkpoints import convert, load
from dmdcopy.io.dmd2 import load_dmd2_checkpoint, read_torch_state
from dmdcopy.io.edm_pickle import load_edm_pickle, read_edm_pickle
from dmdcopy.io.formats import detect_format
from dmdcopy.io.safetensors_io import read_metadata, save
from dmdcopy.io.state import LoadReport, load_state_checked
from dmdcopy.io.user_arch import build_user_module, fill_module, load_user_module

__all__ = [
    "LoadReport",
    "build_module",
    "build_user_module",
    "convert",
    "detect_format",
    "edm_imagenet64_adm",
    "fill_module",
    "load",
    "load_dmd2_checkpoint",
    "load_edm_pickle",
    "load_state_checked",
    "load_user_module",
    "module_spec",
    "read_edm_pickle",
    "read_metadata",
    "read_torch_state",
    "save",
]
