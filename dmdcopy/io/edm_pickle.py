"""Import EDM network pickles without executing anything from the file.

What an EDM network snapshot (``network-snapshot-*.pkl``, written by ``pickle.dump`` in EDM's
``training/training_loop.py``) contains, as far as this reader is concerned:

- a ``dict`` with entries ``ema`` (the network), ``loss_fn``, ``augment_pipe`` (or ``None``) and
  ``dataset_kwargs``; EDM2's snapshots (``training/training_loop.py`` of EDM2) are a
  ``dnnlib.util.EasyDict`` (a dict subclass, read as a dict) with ``ema`` (a
  ``training.networks_edm2.Precond`` in float16), ``loss_fn``, ``encoder`` and ``dataset_kwargs``;
- every network module of EDM's ``training/networks.py`` (``EDMPrecond``, ``DhariwalUNet``, but
  also ``Conv2d``, ``UNetBlock``, ...) and of EDM2's ``training/networks_edm2.py`` (``Precond``,
  ``UNet``, ``Block``, ``MPConv``, ``MPFourier``) is a *persistent class*: it pickles as a call
  ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
  ``meta = {"type": "class", "version": 6, "module_src": <source of the defining module>,
  "class_name": "EDMPrecond", "state": <the object's __dict__>}``, and the state holds the
  constructor's ``_init_args`` / ``_init_kwargs`` next to ``_parameters``, ``_buffers`` and
  ``_modules``. EDM's loader executes ``module_src``; this reader never does: it keeps the record;
- plain ``torch.nn`` containers (``ModuleDict``) pickle as a reference to their class plus their
  ``__dict__``; here the class becomes an inert placeholder (nothing is imported);
- tensors pickle as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and
  parameters as ``torch._utils._rebuild_parameter(tensor, requires_grad, hooks)``; a storage as
  ``torch.storage._load_from_bytes(b)`` where ``b`` is a legacy ``torch.save`` stream, which is
  parsed here by hand (magic number, protocol, system info, a persistent id
  ``("storage", torch.<Type>Storage, key, location, numel[, view])``, the key list, then
  ``numel`` as int64 followed by the raw little-endian data).

The restricted unpickler maps every global the file names to an object of this module: a
checked rebuild function, a dtype, a container type, or an inert placeholder for EDM's and
``torch.nn``'s classes. Any other global (``os.system``, ``builtins.eval``, ...) is refused with
:class:`~dmdcopy.errors.CheckpointError` before anything is called.

Sizes are checked before memory is allocated: a tensor's view of its storage may not repeat an
element (stride 0, overlapping dims) nor reach past it, the storages and copied views of one file
may not add up to more than twice its size, and the network the file records is built on the
``meta`` device and compared with its tensors before it is built for real
(:func:`dmdcopy.io.state.build_checked`). A file of a few KB cannot ask for gigabytes.

(About 700 lines: the restricted unpickler, its allow-list and the rebuild of EDM's and EDM2's
objects are one security boundary; splitting it would spread what may execute over several files.)
"""

from __future__ import annotations

import collections
import contextvars
import io
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.serialization import MAGIC_NUMBER  # the legacy torch.save stream's first pickle

from dmdcopy._record import constructor_options
from dmdcopy.errors import CheckpointError
from dmdcopy.io.formats import EDM_PICKLE, detect_format
from dmdcopy.io.state import build_checked, load_state_checked

__all__ = ["PickledModule", "load_edm_pickle", "read_edm_pickle"]

_EDM_PERSISTENCE_VERSION = 6

# Modules whose classes may appear by reference; each becomes an inert placeholder.
_PLACEHOLDER_MODULES = ("training.", "torch_utils.", "dnnlib.", "torch.nn.modules.", "third_party.edm.")

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_DTYPES = {str(d).removeprefix("torch."): d for d in _STORAGE_DTYPES.values()}


# ----------------------------------------------------------------------------- inert stand-ins


class _Placeholder:
    """Stand-in for a class the pickle names (e.g. ``torch.nn.modules.container.ModuleDict``).

    Instances only store what the pickle hands them: constructor arguments, ``__setstate__``
    state, and dict/list items for dict/list subclasses such as ``dnnlib.EasyDict``.
    """

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items, obj.list = args, None, {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list.append(value)

    def extend(self, values: Any) -> None:
        self.list.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder {self.qualified_name}>"




@dataclass
class _PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have rebuilt, kept as data."""

    class_name: str
    state: dict


@dataclass(frozen=True)
class _Marker:
    """A class the pickle may name only as an argument (``torch.Tensor``, ``Parameter``, storages)."""

    name: str


_TENSOR, _PARAMETER = _Marker("Tensor"), _Marker("Parameter")


# ----------------------------------------------------------------------------- checked rebuilders


class _Refused(pickle.UnpicklingError):
    pass


class _Oversized(pickle.UnpicklingError):
    """A tensor whose declared geometry would need memory the file's bytes do not back."""


# Bytes the tensors rebuilt from one file may still allocate: twice the file's size (its storages,
# and copies of views into them) plus 1 MiB. None outside :func:`_unpickle` (no limit).
_BUDGET: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("edm_pickle_budget", default=None)


def _charge(nbytes: int, what: str) -> None:
    budget = _BUDGET.get()
    if budget is None:
        return
    budget[0] -= nbytes
    if budget[0] < 0:
        raise _Oversized(
            f"{what} would allocate {nbytes:,} more bytes, beyond twice the file's size in all: "
            "its storages are referenced over and over"
        )


def _check_geometry(size: tuple[int, ...], stride: tuple[int, ...], offset: int, numel: int) -> None:
    """A view of ``numel`` storage elements that touches each element at most once (no stride 0,
    no overlap) and stays inside the storage: copying it never needs more than the storage."""
    dims = sorted((s, n) for n, s in zip(size, stride) if n > 1)
    span = 1  # elements spanned by the dims seen so far, smallest stride first
    for s, n in dims:
        if s < span:
            raise _Oversized(
                f"tensor of size {size} with strides {stride} repeats storage elements (a stride of 0 or "
                "overlapping dims); EDM's networks hold no such tensors"
            )
        span += s * (n - 1)
    if offset + span > numel:
        raise _Oversized(f"tensor of size {size} reaches past its storage of {numel} elements")


def _reconstruct_persistent_obj(meta: Any) -> _PersistentRecord:
    if (
        not isinstance(meta, dict)
        or meta.get("type") != "class"
        or not isinstance(meta.get("class_name"), str)
    ):
        raise pickle.UnpicklingError("malformed EDM persistence record")
    if meta.get("version") != _EDM_PERSISTENCE_VERSION:
        raise pickle.UnpicklingError(
            f"EDM persistence version {meta.get('version')!r}, expected {_EDM_PERSISTENCE_VERSION}"
        )
    state = meta.get("state")
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"EDM record {meta['class_name']} has no state dict")
    return _PersistentRecord(meta["class_name"], state)


class _StorageUnpickler(pickle.Unpickler):
    """Reads the object pickle of a legacy ``torch.save`` stream holding one storage."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Marker(name)
        raise _Refused(f"refused global {module}.{name} inside a tensor storage")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80} in a tensor storage")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (torch < 1.0 files) are not supported")
        kind, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(kind, _Marker) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage id {pid!r:.80}")
        return (_STORAGE_DTYPES[kind.name], str(key), numel)


def _load_from_bytes(data: Any) -> torch.Tensor:
    """A legacy ``torch.save`` stream of one storage -> a flat tensor holding its elements."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("tensor storage is not bytes")
    f = io.BytesIO(data)
    if _PlainUnpickler(f).load() != MAGIC_NUMBER:
        raise pickle.UnpicklingError("tensor storage without torch's magic number")
    _PlainUnpickler(f).load()  # protocol version
    sys_info = _PlainUnpickler(f).load()
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise pickle.UnpicklingError("big-endian tensor storages are not supported")
    dtype, key, numel = _StorageUnpickler(f).load()
    keys = _StorageUnpickler(f).load()
    if keys != [key]:
        raise pickle.UnpicklingError(f"tensor storage lists keys {keys!r:.80}, expected [{key!r}]")
    (count,) = struct.unpack("<q", f.read(8))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if count != numel or count < 0 or len(data) - f.tell() < count * itemsize:
        raise pickle.UnpicklingError(
            f"tensor storage truncated: {len(data) - f.tell()} of {max(numel, 0) * itemsize} bytes"
        )
    _charge(count * itemsize, "a tensor storage")
    raw = f.read(count * itemsize)
    return torch.frombuffer(bytearray(raw), dtype=dtype) if count else torch.empty(0, dtype=dtype)


class _PlainUnpickler(pickle.Unpickler):
    """For the header pickles of a torch.save stream: plain values only, no global at all."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"refused global {module}.{name} in a torch.save header")


def _check_hooks(hooks: Any) -> None:
    if hooks:
        raise pickle.UnpicklingError("tensor with backward hooks")


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor) or storage.ndim != 1:
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if (
        len(size) != len(stride)
        or not isinstance(offset, int)
        or offset < 0
        or any(n < 0 for n in size)
        or any(s < 0 for s in stride)
    ):
        raise pickle.UnpicklingError(f"malformed tensor geometry size={size} stride={stride} offset={offset}")
    _check_hooks(hooks)
    if any(n == 0 for n in size):
        return torch.empty(size, dtype=storage.dtype)
    # checked before anything is allocated: a stride-0 view of one element would otherwise be
    # copied into a tensor of any declared size
    _check_geometry(size, stride, offset, storage.numel())
    tensor = storage.as_strided(size, stride, offset)
    whole = offset == 0 and tensor.numel() == storage.numel() and tensor.is_contiguous()
    if whole:
        return tensor
    _charge(tensor.numel() * tensor.element_size(), f"a view of size {size}")
    return tensor.clone()  # a view of part of a storage gets its own memory


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _rebuild_tensor_v2(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    _check_hooks(hooks)
    return nn.Parameter(data, requires_grad=bool(requires_grad) and data.is_floating_point())


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter) or not isinstance(args, tuple):
        raise pickle.UnpicklingError("tensor subclass rebuilt by an unexpected function")
    if new_type not in (_TENSOR, _PARAMETER):
        raise pickle.UnpicklingError(f"tensor subclass {new_type!r} is not supported")
    tensor = func(*args)
    return nn.Parameter(tensor, requires_grad=False) if new_type is _PARAMETER else tensor


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise pickle.UnpicklingError(f"tensor {what} is not a tuple of ints")
    return tuple(value)


def _torch_size(values: Any = ()) -> tuple[int, ...]:
    return _int_tuple(values, "size")


def _plain_numeric(dtype: Any) -> bool:
    import numpy as np

    plain = isinstance(dtype, np.dtype) and dtype.kind in "biufc"
    return plain and dtype.fields is None and not dtype.hasobject


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    # EDM keeps numpy scalars such as skip_scale = np.sqrt(0.5) in its layers' state.
    import numpy as np

    if not _plain_numeric(dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("only plain numeric numpy scalars are allowed")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> Any:
    import numpy as np

    dtype = np.dtype(spec) if isinstance(spec, str) and spec.isalnum() and len(spec) <= 4 else None
    if not _plain_numeric(dtype):
        raise pickle.UnpicklingError(f"numpy dtype {spec!r:.40} is not allowed")
    return dtype


# Every global an EDM network pickle may name, mapped to what this reader uses instead.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch._tensor", "Tensor"): _TENSOR,
    ("torch", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch", "Size"): _torch_size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
    **{("torch", name): dtype for name, dtype in (("float", torch.float32), ("half", torch.float16))},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._placeholders: dict[str, type] = {}  # one stand-in type per class name, per file

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith(_PLACEHOLDER_MODULES) and name.isidentifier() and name[:1].isupper():
            # A class referenced by name: never imported, replaced by an inert stand-in.
            qualified = f"{module}.{name}"
            if qualified not in self._placeholders:
                self._placeholders[qualified] = type(name, (_Placeholder,), {"qualified_name": qualified})
            return self._placeholders[qualified]
        raise _Refused(f"refused global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids do not occur in EDM network pickles")


# ----------------------------------------------------------------------------- the module tree


@dataclass
class PickledModule:
    """One module of an EDM pickle, as data.

    Attributes:
        class_name: EDM's class name (``"EDMPrecond"``) or a placeholder's qualified name
            (``"torch.nn.modules.container.ModuleDict"``).
        init_args, init_kwargs: the constructor arguments EDM recorded (empty if none).
        attributes: the other plain attributes (``img_resolution``, ``sigma_data``, ...).
        parameters, buffers: the module's own tensors (persistent buffers only).
        children: submodules by attribute name.
    """

    class_name: str
    init_args: tuple = ()
    init_kwargs: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)
    children: dict = field(default_factory=dict)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat ``{dotted key: tensor}``, as ``nn.Module.state_dict`` of the original network."""
        out = {prefix + k: v.detach() for k, v in {**self.parameters, **self.buffers}.items()}
        for name, child in self.children.items():
            out.update(child.state_dict(f"{prefix}{name}."))
        return out


def _as_module(obj: Any, where: str) -> PickledModule:
    if isinstance(obj, _PersistentRecord):
        name, state = obj.class_name, obj.state
    elif isinstance(obj, _Placeholder) and isinstance(obj.state, dict):
        name, state = obj.qualified_name, obj.state
    else:
        raise CheckpointError(f"{where}: expected a network module, found {type(obj).__name__}")
    if "_modules" not in state or "_parameters" not in state:
        raise CheckpointError(
            f"{where}: {name} is not a torch module (its state has no _modules/_parameters)"
        )
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    tensors_ok = all(
        v is None or isinstance(v, torch.Tensor)
        for v in (*state["_parameters"].values(), *state.get("_buffers", {}).values())
    )
    if not tensors_ok:
        raise CheckpointError(f"{where}: {name} holds parameters that are not tensors")
    return PickledModule(
        class_name=name,
        init_args=tuple(state.get("_init_args") or ()),
        init_kwargs=dict(state.get("_init_kwargs") or {}),
        attributes={k: v for k, v in state.items() if not k.startswith("_") and k != "training"},
        parameters={k: v for k, v in state["_parameters"].items() if v is not None},
        buffers={
            k: v for k, v in state.get("_buffers", {}).items() if v is not None and k not in non_persistent
        },
        children={k: _as_module(v, f"{where}.{k}") for k, v in state["_modules"].items() if v is not None},
    )


def _unpickle(path: str | os.PathLike) -> Any:
    fmt = detect_format(path)
    if fmt != EDM_PICKLE:
        raise CheckpointError(f"{path}: expected an EDM network pickle, this is a {fmt} file")
    token = _BUDGET.set([2 * os.path.getsize(path) + (1 << 20)])
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f).load()
        except _Oversized as e:
            raise CheckpointError(
                f"{path}: {e}; refused before allocating it: the file is corrupt or hostile"
            ) from None
        except _Refused as e:
            raise CheckpointError(
                f"{path}: {e}: an EDM network pickle names only EDM's persistence record, torch tensor "
                "rebuilding and plain containers; nothing from the file was executed"
            ) from None
        except (
            EOFError,
            pickle.UnpicklingError,
            struct.error,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            MemoryError,
            RuntimeError,
        ) as e:
            raise CheckpointError(
                f"{path}: cannot read the pickle, it is truncated, corrupt or not an EDM network "
                f"({type(e).__name__}: {e}); expected a complete EDM network pickle"
            ) from None
        finally:
            _BUDGET.reset(token)


def read_edm_pickle(path: str | os.PathLike, *, key: str | None = "ema") -> PickledModule:
    """The network stored under ``key`` of an EDM pickle, as a :class:`PickledModule` tree.

    Nothing in the file is executed or imported. ``key=None`` expects the pickle to hold the
    network itself rather than a snapshot dict.
    """
    obj = _unpickle(path)
    if isinstance(obj, _Placeholder) and obj.qualified_name == "dnnlib.util.EasyDict":
        obj = dict(obj.items)  # EDM2 snapshots are an EasyDict (a dict subclass), EDM's a dict
    if isinstance(obj, dict) and key is not None:
        if key not in obj:
            keys = sorted(obj, key=repr)
            raise CheckpointError(f"{path}: the pickle has no entry {key!r}; its keys are {keys}")
        obj = obj[key]
    return _as_module(obj, key or "network")


# ----------------------------------------------------------------------------- EDM -> dmdcopy

# EDM's wrapper signatures (positional order), to name positional _init_args. EDM's networks take
# the options of dmdcopy's SongUNet / DhariwalUNet, in the same order: those are read from
# dmdcopy's classes (dmdcopy._record.constructor_options), the one record of them.
_EDM_PRECOND_SIGNATURES = {
    "EDMPrecond": (
        "img_resolution",
        "img_channels",
        "label_dim",
        "use_fp16",
        "sigma_min",
        "sigma_max",
        "sigma_data",
        "model_type",
    ),
    "VPPrecond": (
        "img_resolution",
        "img_channels",
        "label_dim",
        "use_fp16",
        "beta_d",
        "beta_min",
        "M",
        "epsilon_t",
        "model_type",
    ),
    "VEPrecond": (
        "img_resolution",
        "img_channels",
        "label_dim",
        "use_fp16",
        "sigma_min",
        "sigma_max",
        "model_type",
    ),
}
_EDM_NETWORKS = ("SongUNet", "DhariwalUNet")
_PRECOND_DEFAULTS = {
    "label_dim": 0,
    "use_fp16": False,
    "sigma_min": 0.0,
    "sigma_max": float("inf"),
    "sigma_data": 0.5,
    "beta_d": 19.9,
    "beta_min": 0.1,
    "M": 1000,
    "epsilon_t": 1e-5,
}


# EDM2's wrapper (training/networks_edm2.py) and its UNet; dmdcopy's EDM2Precond takes EDM2's
# options in EDM2's positional order, the block options as explicit keywords.
_EDM2_PRECOND, _EDM2_UNET = "Precond", "UNet"


def _edm2_precond() -> type:
    from dmdcopy.nets.edm2 import EDM2Precond

    return EDM2Precond


def _network_class(name: str) -> type:
    from dmdcopy.nets import unet

    return getattr(unet, name)


def _signature(class_name: str) -> tuple[str, ...]:
    if class_name in _EDM_PRECOND_SIGNATURES:
        return _EDM_PRECOND_SIGNATURES[class_name]
    if class_name == _EDM2_PRECOND:
        return constructor_options(_edm2_precond())
    return constructor_options(_network_class(class_name))


def _options(record: PickledModule) -> dict[str, Any]:
    """Constructor options: positional args named by EDM's signature, then kwargs."""
    names = _signature(record.class_name)
    if len(record.init_args) > len(names):
        raise CheckpointError(f"{record.class_name} recorded {len(record.init_args)} positional arguments")
    return {**dict(zip(names, record.init_args)), **_plain(record.init_kwargs)}


def _precond_options(class_name: str) -> tuple[str, ...]:
    """The options EDM's wrapper and dmdcopy's share by name (``label_dim`` is passed apart)."""
    from dmdcopy import precond

    ours = constructor_options(getattr(precond, class_name))
    return tuple(n for n in _EDM_PRECOND_SIGNATURES[class_name] if n in ours and n != "label_dim")


def _plain(value: Any) -> Any:
    """Placeholders of ``dnnlib.EasyDict`` and friends -> plain dicts and lists."""
    if isinstance(value, _Placeholder):
        return (
            {k: _plain(v) for k, v in value.items.items()} if value.items else [_plain(v) for v in value.list]
        )
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _build_unet(record: PickledModule) -> nn.Module:
    cls = _network_class(record.class_name)
    options = _options(record)
    allowed = constructor_options(cls)  # what a file may set: the options dmdcopy's network records
    unknown = [name for name in options if name not in allowed]
    if unknown:
        raise CheckpointError(
            f"EDM's {record.class_name} records options {unknown} that dmdcopy's {record.class_name} "
            f"does not take (it takes {list(allowed)})"
        )
    try:
        return cls(**options)
    except TypeError as e:
        raise CheckpointError(f"cannot build {record.class_name} from EDM's options {options}: {e}") from e


def _build_edm2(record: PickledModule, net_dtype: torch.dtype | None) -> nn.Module:
    """dmdcopy's EDM2Precond from EDM2's ``Precond`` record: the options a file may set are those
    dmdcopy's class records (EDM2's ``Precond``, ``UNet`` and ``Block`` options by name)."""
    cls = _edm2_precond()
    unet = record.children.get("unet")
    if unet is None or unet.class_name != _EDM2_UNET:
        found = None if unet is None else unet.class_name
        raise CheckpointError(
            f"EDM2's Precond.unet is {found}; dmdcopy rebuilds EDM2's UNet; for others build the module "
            "and use load(path, into=module)"
        )
    allowed = constructor_options(cls)
    # EDM2 keeps some options as attributes too; those win over the recorded constructor call.
    options = {**_options(record), **{k: v for k, v in record.attributes.items() if k in allowed}}
    unknown = [name for name in options if name not in allowed]
    if unknown:
        raise CheckpointError(
            f"EDM2's Precond records options {unknown} that dmdcopy's EDM2Precond does not take "
            f"(it takes {list(allowed)})"
        )
    if net_dtype not in (None, torch.float32, torch.float16):
        raise CheckpointError(f"an EDM2 network runs in float32 or float16, not {net_dtype}")
    options["use_fp16"] = net_dtype is torch.float16  # EDM2's own rule: float16 on CUDA only
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build EDM2Precond from EDM2's options {options}: {e}") from e


def _build(record: PickledModule, net_dtype: torch.dtype | None) -> nn.Module:
    from dmdcopy import precond

    if record.class_name == _EDM2_PRECOND:
        return _build_edm2(record, net_dtype)
    if record.class_name not in _EDM_PRECOND_SIGNATURES:
        raise CheckpointError(
            f"the pickled network is an EDM {record.class_name}; dmdcopy rebuilds EDMPrecond, VPPrecond, "
            "VEPrecond (EDM) and Precond (EDM2); for others build the module and use load(path, into=module)"
        )
    model = record.children.get("model")
    if model is None or model.class_name not in _EDM_NETWORKS:
        found = None if model is None else model.class_name
        raise CheckpointError(
            f"{record.class_name}.model is {found}; dmdcopy rebuilds SongUNet and DhariwalUNet; "
            "for others build the module and use load(path, into=module)"
        )
    # EDM keeps every option as an attribute too; those win over the recorded constructor call.
    opts = {**_PRECOND_DEFAULTS, **_options(record), **record.attributes}
    kwargs = {name: opts[name] for name in _precond_options(record.class_name)}
    cls = getattr(precond, record.class_name)
    shape = (int(opts["img_channels"]), int(opts["img_resolution"]), int(opts["img_resolution"]))
    return cls(
        _build_unet(model),
        label_dim=int(opts["label_dim"]),
        sample_shape=shape,
        net_dtype=net_dtype,
        **kwargs,
    )


def load_edm_pickle(
    path: str | os.PathLike,
    *,
    key: str | None = "ema",
    map_location: str | torch.device = "cpu",
    net_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Import an EDM network pickle as dmdcopy's ``EDMPrecond``/``VPPrecond``/``VEPrecond`` around a
    ``SongUNet``/``DhariwalUNet``, or an EDM2 one as :class:`~dmdcopy.nets.edm2.EDM2Precond`, weights
    loaded with ``strict=True``; nothing from the file runs.

    Args:
        path: e.g. ``edm-imagenet-64x64-cond-adm.pkl``, ``edm2-img64-s-1073741-0.075.pkl`` or
            ``network-snapshot-*.pkl``.
        key: entry of the snapshot dict (``"ema"``); ``None`` if the pickle is the network itself.
        map_location: device of the returned module.
        net_dtype: dtype the UNet runs in. EDM's and EDM2's ``use_fp16=True`` ran float16 on CUDA
            only; pass ``torch.float16`` to do the same (for EDM2: ``use_fp16=True``), default
            keeps float32. EDM2 stores its snapshots' weights in float16; they are loaded into
            float32 parameters.

    Returns:
        The network in eval mode (as EDM's snapshots), ``requires_grad`` left on.
    """
    record = read_edm_pickle(path, key=key)
    state = record.state_dict()
    # the recorded options are checked against the pickled tensors before the network is built
    module = build_checked(lambda: _build(record, net_dtype), {k: v.shape for k, v in state.items()},
                           file_bytes=os.path.getsize(path), strict=True, source=f"{path} [{key}]")
    load_state_checked(module, state, strict=True, source=f"{path} [{key}]")
    return module.to(map_location).eval()
