"""Load a state dict into a module and say precisely what did not fit."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from dmdcopy.errors import CheckpointError

__all__ = ["LoadReport", "build_checked", "compare_state", "load_state_checked"]

# Memory a rebuilt module may hold beyond the bytes of the file it is filled from: its buffers that
# are not saved (noise embeddings' frequencies, ...) and the float32 copy of float16 weights.
_SLACK_BYTES = 64 << 20


@dataclass(frozen=True)
class LoadReport:
    """Keys of a state dict compared with a module's.

    Attributes:
        missing: keys the module has and the file lacks.
        unexpected: keys the file has and the module lacks.
        mismatched: ``(key, shape in file, shape in module)`` for every key present in both with
            different shapes.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 3) -> str:
        """The same on one line, naming at most ``limit`` keys of each kind."""

        def some(items: tuple[str, ...]) -> str:
            return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s) ({some(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s) ({some(self.unexpected)})")
        if self.mismatched:
            shapes = tuple(f"{k}: {list(a)} in the file vs {list(b)}" for k, a, b in self.mismatched)
            parts.append(f"{len(self.mismatched)} key(s) with mismatched shapes ({some(shapes)})")
        return "; ".join(parts) if parts else "all keys match"

    def describe(self) -> str:
        """Every offending key, one per line."""
        lines = []
        if self.missing:
            lines.append(f"{len(self.missing)} missing key(s) (in the module, not in the file):")
            lines += [f"  {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected key(s) (in the file, not in the module):")
            lines += [f"  {k}" for k in self.unexpected]
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} key(s) with mismatched shapes (file vs module):")
            lines += [f"  {k}: {list(a)} vs {list(b)}" for k, a, b in self.mismatched]
        return "\n".join(lines) if lines else "all keys match"


def compare_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> LoadReport:
    """The :class:`LoadReport` of loading ``state`` into ``module``, without loading anything."""
    own = module.state_dict()
    mismatched = tuple(
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    return LoadReport(
        missing=tuple(k for k in own if k not in state),
        unexpected=tuple(k for k in state if k not in own),
        mismatched=mismatched,
    )


def load_state_checked(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True, source: str = "checkpoint"
) -> LoadReport:
    """Copy ``state`` into ``module``'s parameters and buffers (cast to their dtype and device).

    With ``strict=True`` any missing, unexpected or mis-shaped key raises
    :class:`~dmdcopy.errors.CheckpointError` listing every one of them, and nothing is loaded.
    With ``strict=False`` the keys that fit are loaded and a warning lists the rest.
    """
    report = compare_state(module, state)
    if not report.ok:
        message = f"{source} does not fit {type(module).__name__}:\n{report.describe()}"
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=3)
    bad = set(report.unexpected) | {k for k, _, _ in report.mismatched}
    module.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    return report


_SMALL_NUMEL = 4096  # tensors up to this size are made for real: constructors call .item() on them


def _requested_numel(name: str, args: tuple, kwargs: dict) -> int | None:
    """Elements a tensor constructor is asked for, or None when it cannot tell cheaply."""
    try:
        if name in ("arange",):
            nums = [float(a) for a in args if isinstance(a, (int, float))]
            if len(nums) == 1:
                return int(nums[0])
            if len(nums) >= 2:
                step = nums[2] if len(nums) > 2 else float(kwargs.get("step", 1))
                return int(abs((nums[1] - nums[0]) / step)) if step else None
            return None
        if name in ("linspace", "logspace"):
            steps = args[2] if len(args) > 2 else kwargs.get("steps")
            return int(steps) if isinstance(steps, int) else None
        if name == "eye":
            dims = [int(a) for a in args if isinstance(a, int)]
            return dims[0] * (dims[1] if len(dims) > 1 else dims[0]) if dims else None
        if name in ("full",):
            size = args[0] if args else kwargs.get("size")
        elif name in ("randint",):
            sized = args and isinstance(args[-1], (tuple, list, torch.Size))
            size = args[-1] if sized else kwargs.get("size")
        else:
            size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else (
                args if args and all(isinstance(a, int) for a in args) else kwargs.get("size"))
        if size is None:
            return None
        numel = 1
        for n in size:
            numel *= int(n)
        return numel
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None


class _LargeOnMeta(TorchFunctionMode):
    """Tensor constructors asked for more than a few thousand elements make them on ``meta``
    (shapes only); small ones stay real, so a constructor's scalar arithmetic still runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors() and torch.device(kwargs.get("device") or "cpu").type == "cpu":
            numel = _requested_numel(getattr(func, "__name__", ""), args, kwargs)
            if numel is not None and numel > _SMALL_NUMEL:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _meta_build(factory: Callable[[], nn.Module], limit: int, source: str) -> nn.Module:
    """``factory()`` on the ``meta`` device: shapes without storage. The number of parameters,
    buffers and submodules registered while it runs is capped at ``limit`` (a recorded ``depth``
    of 10**7 would otherwise build ten million module objects, even on ``meta``)."""
    from torch.nn.modules import module as module_mod

    count, owner = [0], threading.get_ident()

    def hook(*_args: object) -> None:
        if threading.get_ident() != owner:  # the hooks are global: count this build's only
            return
        count[0] += 1
        if count[0] > limit:
            raise CheckpointError(
                f"{source}: the recorded architecture builds more than {limit} parameters, buffers and "
                "submodules, far more than the file's tensors; the file is corrupt or hostile"
            )

    handles = [
        module_mod.register_module_parameter_registration_hook(hook),
        module_mod.register_module_buffer_registration_hook(hook),
        module_mod.register_module_module_registration_hook(hook),
    ]
    try:
        with _LargeOnMeta():
            return factory()
    finally:
        for h in handles:
            h.remove()


def build_checked(
    factory: Callable[[], nn.Module],
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    file_bytes: int,
    strict: bool = True,
    source: str = "checkpoint",
) -> nn.Module:
    """Build the module a file records only once it is known to fit the file's tensors.

    ``factory`` is first run with its tensors of more than a few thousand elements made on the
    ``meta`` device (no memory is allocated for them), and at most four parameters, buffers or
    submodules per tensor of the file; the state dict it would have is compared with ``shapes``,
    the file's ``{key: shape}`` read from its headers. With ``strict=True`` any missing,
    unexpected or mis-shaped key raises :class:`~dmdcopy.errors.CheckpointError`; in every case
    the module's parameters and buffers may not need more than twice ``file_bytes`` plus 64 MiB.
    Only then is ``factory`` run for real. A small hostile file recording ``hidden: 12000`` is
    thus refused, not built.
    """
    limit = 4 * len(shapes) + 256
    try:
        meta = _meta_build(factory, limit, source)
    except CheckpointError:
        raise
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError,
            NotImplementedError, MemoryError) as e:
        raise CheckpointError(f"{source}: cannot build the recorded architecture ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    fake = {k: torch.empty(tuple(v), device="meta") for k, v in shapes.items()}
    report = compare_state(meta, fake)
    if strict and not report.ok:
        raise CheckpointError(
            f"{source}: the recorded architecture ({type(meta).__name__}) does not fit the file's "
            f"tensors, refused before building it: {report.summary()}"
        )
    tensors = {id(t): t for t in (*meta.parameters(), *meta.buffers())}.values()
    needed = sum(t.numel() * t.element_size() for t in tensors)
    if needed > 2 * file_bytes + _SLACK_BYTES:
        raise CheckpointError(
            f"{source}: the recorded architecture ({type(meta).__name__}) needs {needed:,} bytes of "
            f"parameters and buffers, the file holds {file_bytes:,}; refused before building it"
        )
    del meta
    return factory()
