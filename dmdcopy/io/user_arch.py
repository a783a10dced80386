"""Your own network class, named by import path, filled from a state dict file.

A state dict carries weights, not code. To load one into your own class, name a *builder*, a
callable of your installed package that returns the module, by ``"module:attribute"`` (as entry
points are written), with JSON keyword arguments::

    module = load_user_module("mypkg.nets:build_teacher", {"width": 64}, "teacher.pt")

The module is imported from the path *you* give (the command line's ``--arch``,
``--teacher-arch``, ``--student-arch``), never from a name read out of a checkpoint; the weights
are read without executing anything: ``.safetensors`` with safetensors (a plain state dict, a
dmdcopy file or a distillation checkpoint), ``.pt``/``.pth``/``.bin`` with
``torch.load(weights_only=True)``, an EDM pickle with dmdcopy's restricted unpickler. The format
is recognised from the file's bytes. Every failure is one line: a bad import path, a builder that
is not callable or raises, keyword arguments that are not a JSON object, missing, unexpected or
mis-shaped keys.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dmdcopy.errors import CheckpointError, ConfigError
from dmdcopy.io.architectures import _custom_classes, module_spec
from dmdcopy.io.formats import EDM_PICKLE, SAFETENSORS, detect_format
from dmdcopy.io.state import compare_state, load_state_checked

__all__ = ["build_user_module", "fill_module", "import_builder", "load_user_module", "parse_kwargs",
           "read_state", "user_classes"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def import_builder(path: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:attribute"`` (the attribute may be dotted,
    ``"pkg.nets:Teacher.build"``), imported from the installed package or ``PYTHONPATH``."""
    form = f"architecture {path!r}: expected 'module:callable', e.g. 'mypkg.nets:build_teacher'"
    if not isinstance(path, str) or path.count(":") != 1:
        raise ConfigError(form)
    mod_name, attr = (part.strip() for part in path.split(":"))
    if not mod_name or not attr:
        raise ConfigError(form)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ConfigError(f"architecture {path!r}: no module named {e.name!r}; install your package "
                              "or put its directory on PYTHONPATH") from None
        raise ConfigError(f"architecture {path!r}: importing {mod_name!r} failed: {_first_line(e)}") from e
    except Exception as e:  # the user's module raised while being imported
        raise ConfigError(f"architecture {path!r}: importing {mod_name!r} failed: {_first_line(e)}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"architecture {path!r}: {getattr(obj, '__name__', mod_name)!r} has no "
                              f"attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"architecture {path!r}: {attr!r} is a {type(obj).__name__}, not a callable "
                          "that returns an nn.Module")
    return obj


def parse_kwargs(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Builder keyword arguments from a JSON object (``'{"width": 64}'``), a mapping or None."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        value: Any = dict(text)
    else:
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"keyword arguments {text!r} are not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"keyword arguments must be a JSON object such as '{{\"width\": 64}}', "
                          f"got {text!r}")
    return value


def build_user_module(arch: str, kwargs: str | Mapping[str, Any] | None = None) -> nn.Module:
    """``builder(**kwargs)`` for the builder named by ``arch``; it must return an ``nn.Module``.

    >>> build_user_module("torch.nn:Linear", '{"in_features": 2, "out_features": 3}')
    Linear(in_features=2, out_features=3, bias=True)
    """
    builder = import_builder(arch)
    options = parse_kwargs(kwargs)
    try:
        module = builder(**options)
    except Exception as e:  # the user's code: report it in one line, whatever it raised
        raise ConfigError(f"architecture {arch!r}: {arch}(**{json.dumps(options)}) raised "
                          f"{_first_line(e)}") from e
    if not isinstance(module, nn.Module):
        raise ConfigError(f"architecture {arch!r}: the builder returned a {type(module).__name__}, "
                          "not an nn.Module")
    return module


def read_state(
    path: str | os.PathLike, *, key: str = "ema", prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """The flat CPU state dict in ``path``, whatever its format, read without executing code.

    Args:
        key: the entry of an EDM snapshot pickle or of a distillation checkpoint.
        prefix: keep only keys under it and strip it (``None``: strip a wrapper prefix such as
            ``module.`` that every key of a torch file shares).
    """
    from dmdcopy.io.checkpoints import split_init_tensors
    from dmdcopy.io.dmd2 import read_torch_state, strip_prefix
    from dmdcopy.io.run_checkpoint import is_run_checkpoint, split_entry
    from dmdcopy.io.safetensors_io import read_safetensors

    fmt = detect_format(path)
    if fmt == SAFETENSORS:
        state, meta = read_safetensors(path)
        if is_run_checkpoint(meta):
            state = split_entry(state, key, source=str(path))
        state, init = split_init_tensors(state)
        if init:
            raise CheckpointError(f"{path}: holds an exact teacher of dmdcopy.teachers (constructor tensors "
                                  f"{sorted(init)}); load it with dmdcopy.io.load, without an architecture")
        return strip_prefix(state, prefix) if prefix is not None else state
    if fmt == EDM_PICKLE:
        from dmdcopy.io.edm_pickle import read_edm_pickle

        state = dict(read_edm_pickle(path, key=key).state_dict())
        return strip_prefix(state, prefix) if prefix is not None else state
    return strip_prefix(read_torch_state(path), prefix)


def fill_module(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    key: str = "ema",
    prefix: str | None = None,
    map_location: str | torch.device | None = None,
    name: str | None = None,
) -> nn.Module:
    """Load the weights in ``path`` (any format :func:`read_state` reads) strictly into ``module``.

    The module keeps its dtypes (the file's tensors are cast to them) and, with
    ``map_location``, is moved there. Key or shape mismatches raise
    :class:`~dmdcopy.errors.CheckpointError` on one line, naming the first few offending keys;
    ``name`` says what the module is in that message (default its class).
    """
    state = read_state(path, key=key, prefix=prefix)
    report = compare_state(module, state)
    if not report.ok:
        what = name or type(module).__name__
        raise CheckpointError(f"{path} does not fit {what}: {report.summary()}")
    load_state_checked(module, state, source=str(path))
    return module if map_location is None else module.to(map_location)


def load_user_module(
    arch: str,
    kwargs: str | Mapping[str, Any] | None,
    path: str | os.PathLike,
    *,
    key: str = "ema",
    prefix: str | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """``builder(**kwargs)`` (:func:`build_user_module`) filled strictly with the weights in
    ``path`` (:func:`fill_module`), on ``map_location``, in eval mode."""
    module = build_user_module(arch, kwargs)
    name = f"{arch} ({type(module).__name__})"
    return fill_module(module, path, key=key, prefix=prefix, map_location=map_location, name=name).eval()


def user_classes(module: nn.Module) -> list[str]:
    """The classes in ``module`` that :func:`dmdcopy.io.load` cannot rebuild from a saved file
    (a file of such a module loads with ``load(path, into=...)`` or the same ``--arch``)."""
    return _custom_classes(module_spec(module))
