"""The architecture of a module as a JSON-able nested spec, and back.

A spec names one dmdcopy class, its constructor options and the specs of the submodules the
constructor takes::

    {"class": "EDMPrecond",
     "kwargs": {"label_dim": 0, "sample_shape": [2], "sigma_data": 0.5, ...},
     "children": {"model": {"class": "MLP", "kwargs": {"dim": 2, "hidden": 32, ...}}}}

``_ARCHITECTURES`` below is the one place where such a class name maps to a dmdcopy class (an
edge mapping of fixed names, not an open registry). A module whose class is not in it (a user's
own network) is recorded as ``{"class": None, "python_class": "pkg.mod.Name"}``: its weights are
saved, and loading them needs ``load(path, into=module)``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dmdcopy.errors import CheckpointError, ConfigError

__all__ = ["build_module", "decode_kwargs", "edm_imagenet64_adm", "encode_kwargs", "module_spec"]


def _precond_kwargs(module: nn.Module) -> dict[str, Any]:
    # Precond's constructor options are all kept as attributes of the same name.
    kwargs = dict(
        label_dim=module.label_dim,
        sample_shape=module.sample_shape,
        sigma_min=module.sigma_min,
        sigma_max=module.sigma_max,
        net_dtype=module.net_dtype,
    )
    for name in ("sigma_data", "beta_d", "beta_min", "M"):  # the subclasses' own options
        if hasattr(module, name):
            kwargs[name] = getattr(module, name)
    return kwargs


def _init_kwargs(module: nn.Module) -> dict[str, Any]:
    kwargs = getattr(module, "init_kwargs", None)
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{type(module).__name__} does not record its constructor options in init_kwargs")
    return dict(kwargs)


def _one_step_kwargs(module: nn.Module) -> dict[str, Any]:
    return {"sigma_max": module.sigma_max}


def _multi_step_kwargs(module: nn.Module) -> dict[str, Any]:
    return {"sigmas": list(module.sigmas)}


@dataclass(frozen=True)
class _Entry:
    module: str  # dmdcopy module that defines the class
    name: str  # class name, also the spec's "class"
    kwargs: Callable[[nn.Module], dict[str, Any]]  # constructor options of an instance
    children: tuple[str, ...] = ()  # submodules passed to the constructor, by attribute name


# The one table from spec class names to dmdcopy classes.
_ARCHITECTURES: tuple[_Entry, ...] = (
    _Entry("dmdcopy.precond", "EDMPrecond", _precond_kwargs, ("model",)),
    _Entry("dmdcopy.precond", "VEPrecond", _precond_kwargs, ("model",)),
    _Entry("dmdcopy.precond", "VPPrecond", _precond_kwargs, ("model",)),
    _Entry("dmdcopy.nets.mlp", "MLP", _init_kwargs),
    _Entry("dmdcopy.nets.unet", "SongUNet", _init_kwargs),
    _Entry("dmdcopy.nets.unet", "DhariwalUNet", _init_kwargs),
    _Entry("dmdcopy.students", "OneStepStudent", _one_step_kwargs, ("denoiser",)),
    _Entry("dmdcopy.students", "MultiStepStudent", _multi_step_kwargs, ("denoiser",)),
)


def _resolve(entry: _Entry) -> type | None:
    """The class of a table entry, or None while its module is not part of this install."""
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as e:
        if e.name is not None and entry.module.startswith(e.name):
            return None
        raise
    return getattr(module, entry.name, None)


def _entry_for_module(module: nn.Module) -> _Entry | None:
    for entry in _ARCHITECTURES:
        if type(module) is _resolve(entry):  # exact class: a subclass may take other options
            return entry
    return None


def _entry_for_name(name: str) -> tuple[_Entry, type]:
    for entry in _ARCHITECTURES:
        if entry.name == name:
            cls = _resolve(entry)
            if cls is None:
                break
            return entry, cls
    known = [e.name for e in _ARCHITECTURES if _resolve(e) is not None]
    raise CheckpointError(f"unknown architecture class {name!r}; this dmdcopy rebuilds {known}")


def encode_kwargs(value: Any, where: str = "kwargs") -> Any:
    """Constructor options -> JSON-able values (tuples become lists; dtypes, inf and nan are tagged)."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [encode_kwargs(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: encode_kwargs(v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"cannot record {where} = {value!r} of type {type(value).__name__} as JSON")


def decode_kwargs(value: Any) -> Any:
    """Inverse of :func:`encode_kwargs`."""
    if isinstance(value, list):
        return [decode_kwargs(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        if set(value) == {"__dtype__"}:
            dtype = getattr(torch, str(value["__dtype__"]), None)
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"unknown dtype {value['__dtype__']!r} in the architecture")
            return dtype
        return {k: decode_kwargs(v) for k, v in value.items()}
    return value


def module_spec(module: nn.Module) -> dict[str, Any]:
    """The nested architecture spec of ``module`` (see the module docstring).

    >>> from dmdcopy.nets import MLP
    >>> module_spec(MLP(2, hidden=8, depth=1))["class"]
    'MLP'
    """
    entry = _entry_for_module(module)
    if entry is None:
        cls = type(module)
        return {"class": None, "python_class": f"{cls.__module__}.{cls.__qualname__}"}
    kwargs = encode_kwargs(entry.kwargs(module), f"{entry.name} kwargs")
    spec: dict[str, Any] = {"class": entry.name, "kwargs": kwargs}
    if entry.children:
        spec["children"] = {name: module_spec(getattr(module, name)) for name in entry.children}
    return spec


def _check_spec(spec: Any) -> None:
    """Raise CheckpointError unless ``spec`` has the shape :func:`module_spec` writes, recursively."""
    well_formed = (
        isinstance(spec, dict)
        and "class" in spec
        and isinstance(spec["class"], (str, type(None)))
        and isinstance(spec.get("kwargs", {}), dict)
        and isinstance(spec.get("children", {}), dict)
    )
    if not well_formed:
        raise CheckpointError(
            f"malformed architecture spec {repr(spec)[:200]}: expected an object "
            '{"class": name, "kwargs": {...}, "children": {...}}'
        )
    for child in spec.get("children", {}).values():
        _check_spec(child)


def _custom_classes(spec: dict[str, Any]) -> list[str]:
    if spec.get("class") is None:
        return [str(spec.get("python_class"))]
    return [c for child in spec.get("children", {}).values() for c in _custom_classes(child)]


def build_module(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised module from a spec made by :func:`module_spec`."""
    _check_spec(spec)
    custom = _custom_classes(spec)
    if custom:
        raise CheckpointError(
            f"the checkpoint holds user-defined classes {custom} that dmdcopy cannot rebuild; "
            "build the module yourself and pass it as load(path, into=module)"
        )
    entry, cls = _entry_for_name(spec["class"])
    kwargs = decode_kwargs(spec.get("kwargs", {}))
    children = {name: build_module(child) for name, child in spec.get("children", {}).items()}
    if set(children) != set(entry.children):
        raise CheckpointError(
            f"architecture of {entry.name} names submodules {sorted(children)}, "
            f"expected {list(entry.children)}"
        )
    args = [children[name] for name in entry.children]
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # ConfigError is a ValueError too
        raise CheckpointError(f"cannot build {entry.name} from the recorded options {kwargs}: {e}") from e


def edm_imagenet64_adm(*, dropout: float = 0.10, label_dropout: float = 0.0) -> dict[str, Any]:
    """``DhariwalUNet`` options of EDM's class-conditional ImageNet-64 ADM network.

    EDM trains it with ``--cond=1 --arch=adm --dropout=0.10 --augment=0``; DMD2's students use the
    same network with ``dropout=0``. Wrap it as ``EDMPrecond(DhariwalUNet(**edm_imagenet64_adm()))``
    (sigma_data 0.5, sigma range (0, inf) as EDM's).

    >>> edm_imagenet64_adm()["model_channels"]
    192
    """
    return dict(
        img_resolution=64,
        in_channels=3,
        out_channels=3,
        label_dim=1000,
        augment_dim=0,
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        channel_mult_emb=4,
        num_blocks=3,
        attn_resolutions=[32, 16, 8],
        dropout=dropout,
        label_dropout=label_dropout,
    )
