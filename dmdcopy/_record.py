"""A class's constructor options, read from its signature: the one record of them.

A network decorated with :func:`records_init_kwargs` keeps the arguments it was built with in
``init_kwargs`` (``type(net)(**net.init_kwargs)`` rebuilds it); :func:`constructor_options`
names the options a class takes. :mod:`dmdcopy.io` reads both (the architecture spec of a saved
file, the options an EDM pickle may set) instead of keeping its own lists.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import typing
from typing import Any, TypeVar

__all__ = ["constructor_options", "records_init_kwargs"]

T = TypeVar("T", bound=type)

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def constructor_options(cls: type) -> tuple[str, ...]:
    """Names of the arguments ``cls(...)`` takes, in positional order.

    Where a constructor passes ``**kwargs`` on to its base class, the base's options come first
    (``EDMPrecond``: ``model``, ``label_dim``, ``sample_shape``, ``sigma_min``, ``sigma_max``,
    ``net_dtype``, ``sigma_data``).

    >>> class A:
    ...     def __init__(self, a, b=1): ...
    >>> class B(A):
    ...     def __init__(self, c=2, **kwargs): super().__init__(**kwargs)
    >>> constructor_options(B)
    ('a', 'b', 'c')
    """
    chain: list[list[str]] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]  # without self
        chain.append([p.name for p in params if p.kind in _NAMED])
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    names: dict[str, None] = {}
    for own in reversed(chain):  # base classes first
        names.update(dict.fromkeys(own))
    return tuple(names)


def _plain(value: Any, hint: Any) -> Any:
    """``value`` as the JSON-able type its annotation names (``Sequence[int]`` -> list of int)."""
    if hint in (int, float, str, bool):
        return hint(value)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is collections.abc.Sequence and len(args) == 1 and args[0] in (int, float, str):
        return [args[0](v) for v in value]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
        return [args[0](v) for v in value]  # tuple[int, ...]: recorded as JSON has it, a list
    return value


def records_init_kwargs(cls: T) -> T:
    """Class decorator: each instance keeps its constructor arguments in ``init_kwargs``.

    The arguments are bound to the constructor's signature (positional ones by name, defaults
    filled in) once the constructor has returned, and each becomes the plain type its annotation
    names (``int``, ``float``, ``str``, ``Sequence[int]`` -> ``list``), so the dict is JSON-able
    and ``type(net)(**net.init_kwargs)`` rebuilds the network.

    >>> from torch import nn
    >>> @records_init_kwargs
    ... class Net(nn.Module):
    ...     def __init__(self, dim: int, widths: collections.abc.Sequence[int] = (8, 8)):
    ...         super().__init__()
    >>> Net(2).init_kwargs
    {'dim': 2, 'widths': [8, 8]}
    """
    init = cls.__init__
    signature = inspect.signature(init)
    hints = typing.get_type_hints(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        self.init_kwargs = {
            name: _plain(value, hints.get(name))
            for name, value in list(bound.arguments.items())[1:]  # without self
        }

    cls.__init__ = __init__
    return cls
