"""The architecture of a module as a JSON-able nested spec, and back.

A spec names one dmdcopy class, its constructor options and the specs of the submodules the
constructor takes::

    {"class": "EDMPrecond",
     "kwargs": {"label_dim": 0, "sample_shape": [2], "sigma_data": 0.5, ...},
     "children": {"model": {"class": "MLP", "kwargs": {"dim": 2, "hidden": 32, ...}}}}

``_ARCHITECTURES`` below is the one place where such a class name maps to a dmdcopy class (an
edge mapping of fixed names, not an open registry). A module whose class is not in it (a user's
own network) is recorded as ``{"class": None, "python_class": "pkg.mod.Name"}``: its weights are
saved, and loading them needs ``load(path, into=module)`` (or, from the command line, the same
``--arch module:builder``; nothing is ever imported from a name read out of a file).

The exact teachers of :mod:`dmdcopy.teachers` are rebuilt too. The Gaussian and mixture teachers
keep their parameters in their state dicts (built from placeholders of the recorded size, then
filled, so the loaded teacher is bit-identical to the saved one). :class:`EmpiricalTeacher` keeps
its data out of its state dict; its constructor tensors (``data``, ``labels``) are saved beside
the state dict under the key prefix :data:`INIT_PREFIX` and named in the spec's ``"tensors"``.

(About 410 lines: the one table from spec names to classes, its encoder/decoder and the settings
check read the same records.)
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dmdcopy._record import constructor_options
from dmdcopy.errors import CheckpointError, ConfigError

__all__ = [
    "INIT_PREFIX",
    "build_module",
    "check_wrapper_settings",
    "decode_kwargs",
    "edm_imagenet64_adm",
    "encode_kwargs",
    "init_tensors",
    "module_spec",
]

# Key prefix of constructor tensors (not in the state dict) in a saved file, e.g. "dmdcopy.init/data".
INIT_PREFIX = "dmdcopy.init/"


def _precond_kwargs(module: nn.Module) -> dict[str, Any]:
    # A wrapper keeps each constructor option as an attribute of the same name; an option it
    # does not keep (VPPrecond's epsilon_t) only set the default of one it keeps (sigma_min).
    names = constructor_options(type(module))
    return {name: getattr(module, name) for name in names if name != "model" and hasattr(module, name)}


def _init_kwargs(module: nn.Module) -> dict[str, Any]:
    kwargs = getattr(module, "init_kwargs", None)
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{type(module).__name__} does not record its constructor options in init_kwargs "
                          "(decorate the class with dmdcopy._record.records_init_kwargs)")
    return dict(kwargs)


def _one_step_kwargs(module: nn.Module) -> dict[str, Any]:
    return {"sigma_max": module.sigma_max}


def _multi_step_kwargs(module: nn.Module) -> dict[str, Any]:
    return {"sigmas": list(module.sigmas)}


def _teacher_range(module: nn.Module) -> dict[str, Any]:
    return {"sample_shape": list(module.sample_shape), "sigma_min": module.sigma_min,
            "sigma_max": module.sigma_max}


def _gaussian_kwargs(module: nn.Module) -> dict[str, Any]:
    # mean, eigvals, eigvecs are buffers in the state dict
    return {"dim": int(module.mean.shape[0]), **_teacher_range(module)}


def _build_gaussian(cls: type, *, dim: int, sample_shape: list[int], **kwargs: Any) -> nn.Module:
    """A placeholder of the recorded size; its buffers are then filled from the state dict."""
    if math.prod(sample_shape) != dim:
        raise ConfigError(f"sample_shape {sample_shape} does not have dim = {dim} elements")
    # Built at d = 1, then resized: the constructor's eigendecomposition is O(d^3) (a minute at 3072).
    module = cls(torch.zeros(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), **kwargs)
    module.sample_shape = tuple(sample_shape)
    module.mean = torch.zeros(dim, dtype=torch.float64)
    module.eigvals = torch.zeros(dim, dtype=torch.float64)
    module.eigvecs = torch.zeros(dim, dim, dtype=torch.float64)
    return module


def _mixture_kwargs(module: nn.Module) -> dict[str, Any]:
    # means, stds, weights are buffers in the state dict
    K, d = module.means.shape
    return {"num_components": int(K), "dim": int(d), "conditional": module.conditional,
            **_teacher_range(module)}


def _build_mixture(cls: type, *, num_components: int, dim: int, **kwargs: Any) -> nn.Module:
    shape = (num_components, dim)
    return cls(torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64), **kwargs)


def _empirical_kwargs(module: nn.Module) -> dict[str, Any]:
    kwargs = {"chunk_size": module.chunk_size, "compute_dtype": module.compute_dtype,
              "sigma_min": module.sigma_min, "sigma_max": module.sigma_max}
    if module.labels is not None:
        kwargs["label_dim"] = module.label_dim
    return kwargs


def _empirical_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    data = module.data.reshape(module.data.shape[0], *module.sample_shape)  # (N, *sample_shape)
    return {"data": data} if module.labels is None else {"data": data, "labels": module.labels}


@dataclass(frozen=True)
class _Entry:
    module: str  # dmdcopy module that defines the class
    name: str  # class name, also the spec's "class"
    kwargs: Callable[[nn.Module], dict[str, Any]]  # constructor options of an instance
    children: tuple[str, ...] = ()  # submodules passed to the constructor, by attribute name
    # build(cls, *children, **kwargs, **tensors) when the constructor is not called directly
    build: Callable[..., nn.Module] | None = None
    # constructor tensors an instance keeps outside its state dict (saved under INIT_PREFIX)
    tensors: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None


# The one table from spec class names to dmdcopy classes.
_ARCHITECTURES: tuple[_Entry, ...] = (
    _Entry("dmdcopy.precond", "EDMPrecond", _precond_kwargs, ("model",)),
    _Entry("dmdcopy.precond", "VEPrecond", _precond_kwargs, ("model",)),
    _Entry("dmdcopy.precond", "VPPrecond", _precond_kwargs, ("model",)),
    _Entry("dmdcopy.nets.mlp", "MLP", _init_kwargs),
    _Entry("dmdcopy.nets.image_mlp", "ImageMLP", _init_kwargs),
    _Entry("dmdcopy.nets.unet", "SongUNet", _init_kwargs),
    _Entry("dmdcopy.nets.unet", "DhariwalUNet", _init_kwargs),
    _Entry("dmdcopy.nets.edm2", "EDM2Precond", _init_kwargs),  # a denoiser: the UNet is built inside
    _Entry("dmdcopy.nets.edm2", "EDM2UNet", _init_kwargs),
    _Entry("dmdcopy.students", "OneStepStudent", _one_step_kwargs, ("denoiser",)),
    _Entry("dmdcopy.students", "MultiStepStudent", _multi_step_kwargs, ("denoiser",)),
    _Entry("dmdcopy.teachers", "GaussianTeacher", _gaussian_kwargs, build=_build_gaussian),
    _Entry("dmdcopy.teachers", "GaussianMixtureTeacher", _mixture_kwargs, build=_build_mixture),
    _Entry("dmdcopy.teachers", "EmpiricalTeacher", _empirical_kwargs, tensors=_empirical_tensors),
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
    if entry.tensors is not None:
        spec["tensors"] = sorted(entry.tensors(module))
    if entry.children:
        spec["children"] = {name: module_spec(getattr(module, name)) for name in entry.children}
    return spec


def init_tensors(module: nn.Module, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """The constructor tensors ``module`` (and its recorded submodules) keep outside their state
    dicts, keyed ``INIT_PREFIX + path + name`` (e.g. ``"dmdcopy.init/data"``); ``{}`` for most
    modules. :func:`dmdcopy.io.save` stores them beside the state dict."""
    entry = _entry_for_module(module)
    if entry is None:
        return {}
    out = {}
    if entry.tensors is not None:
        out = {f"{INIT_PREFIX}{prefix}{k}": v for k, v in entry.tensors(module).items()}
    for name in entry.children:
        out.update(init_tensors(getattr(module, name), prefix=f"{prefix}{name}."))
    return out


def _check_spec(spec: Any) -> None:
    """Raise CheckpointError unless ``spec`` has the shape :func:`module_spec` writes, recursively."""
    well_formed = (
        isinstance(spec, dict)
        and "class" in spec
        and isinstance(spec["class"], (str, type(None)))
        and isinstance(spec.get("kwargs", {}), dict)
        and isinstance(spec.get("children", {}), dict)
        and isinstance(spec.get("tensors", []), list)
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


def build_module(spec: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A freshly initialised module from a spec made by :func:`module_spec`.

    ``tensors``: the constructor tensors the spec names (keys as :func:`init_tensors` writes them).
    """
    _check_spec(spec)
    custom = _custom_classes(spec)
    if custom:
        raise CheckpointError(
            f"the checkpoint holds user-defined classes {custom} that dmdcopy cannot rebuild; "
            "build the module yourself and pass it as load(path, into=module) (from the command "
            "line: --arch / --teacher-arch / --student-arch module:builder)"
        )
    return _build(spec, tensors or {}, "")


def _build(spec: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    entry, cls = _entry_for_name(spec["class"])
    kwargs = decode_kwargs(spec.get("kwargs", {}))
    children = {name: _build(child, tensors, f"{prefix}{name}.")
                for name, child in spec.get("children", {}).items()}
    if set(children) != set(entry.children):
        raise CheckpointError(
            f"architecture of {entry.name} names submodules {sorted(children)}, "
            f"expected {list(entry.children)}"
        )
    args = [children[name] for name in entry.children]
    init = {}
    for name in spec.get("tensors", []):
        key = f"{INIT_PREFIX}{prefix}{name}"
        if key not in tensors:
            raise CheckpointError(f"the file lacks {key!r}, a constructor tensor of {entry.name}")
        init[str(name)] = tensors[key]
    try:
        if entry.build is not None:
            return entry.build(cls, *args, **kwargs, **init)
        return cls(*args, **kwargs, **init)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # ConfigError is a ValueError too
        raise CheckpointError(f"cannot build {entry.name} from the recorded options {kwargs}: {e}") from e


# Settings of a wrapper (and of a student or an exact teacher) that a state dict does not carry:
# two modules with the same weights and different settings are different denoisers.
_WRAPPER_SETTINGS = ("sigma_data", "sigma_min", "sigma_max")


def _same(a: Any, b: Any) -> bool:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    return a == b or (math.isnan(a) and math.isnan(b))


def _setting_differences(spec: dict[str, Any], module: nn.Module, where: str) -> list[str]:
    """``"<where>field: <in file> in the file, <in module> in the module"`` for every difference."""
    if spec.get("class") is None:  # a user's class: its options are not recorded
        return []
    kwargs = decode_kwargs(spec.get("kwargs", {}))
    out = []
    if any(name in kwargs for name in _WRAPPER_SETTINGS):
        cls = next((_resolve(e) for e in _ARCHITECTURES if e.name == spec["class"]), None)
        if not (isinstance(module, cls) if cls is not None else type(module).__name__ == spec["class"]):
            out.append(f"{where}class: {spec['class']} in the file, {type(module).__name__} in the module")
        for name in _WRAPPER_SETTINGS:
            if name in kwargs:
                own = getattr(module, name, "absent")
                if not _same(kwargs[name], own):
                    out.append(f"{where}{name}: {kwargs[name]} in the file, {own} in the module")
    for name, child in spec.get("children", {}).items():
        sub = getattr(module, name, None)
        if isinstance(child, dict) and isinstance(sub, nn.Module):
            out += _setting_differences(child, sub, f"{where}{name}.")
    return out


def check_wrapper_settings(
    module: nn.Module, metadata: Mapping[str, str], source: str = "checkpoint"
) -> None:
    """Raise CheckpointError when the settings a file records differ from those of ``module``.

    ``metadata``: the safetensors metadata of the file whose weights go into ``module``
    (``load(path, into=module)``). For the recorded module and every submodule it was built from
    (the ``EDMPrecond`` inside a ``OneStepStudent``) that has such settings (a wrapper, a student,
    an exact teacher), the class and ``sigma_data``, ``sigma_min``, ``sigma_max`` are compared. A
    state dict does not hold them, so a file of ``EDMPrecond(net)`` would otherwise fill a
    ``VEPrecond(net)`` or an ``EDMPrecond(net, sigma_data=1.0)`` without a word. A file without a
    recorded architecture (a plain safetensors file, a distillation checkpoint) is not checked,
    nor a part of it recorded as the user's own class (its options are not recorded).

    >>> from dmdcopy.nets import MLP
    >>> from dmdcopy.precond import EDMPrecond
    >>> meta = {"dmdcopy.architecture": json.dumps(module_spec(EDMPrecond(MLP(2, hidden=8, depth=1))))}
    >>> other = EDMPrecond(MLP(2, hidden=8, depth=1), sigma_data=1.0)
    >>> try:
    ...     check_wrapper_settings(other, meta, "net.safetensors")
    ... except CheckpointError as e:
    ...     print(str(e).split("into=: ")[1].split(";")[0])
    sigma_data: 0.5 in the file, 1.0 in the module
    """
    if "dmdcopy.architecture" not in metadata:
        return
    try:
        spec = json.loads(metadata["dmdcopy.architecture"])
    except ValueError as e:
        raise CheckpointError(f"{source}: corrupt dmdcopy.architecture metadata: {e}") from e
    _check_spec(spec)
    differences = _setting_differences(spec, module, "")
    if differences:
        raise CheckpointError(
            f"{source} records settings that differ from those of the module passed as into=: "
            f"{'; '.join(differences)}; build the module with the file's settings, or load the file "
            "without into= to rebuild it as saved"
        )


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
