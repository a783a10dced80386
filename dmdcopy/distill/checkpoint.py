"""What a distillation run saves, registered once: saving and loading iterate the same registry.

After EDM2's ``CheckpointIO(state=..., net=..., optimizer=..., ema=...)``: the Distiller builds one
:class:`RunState` naming every network, optimiser and counter of the run, and both
:meth:`RunState.state` (for ``save_checkpoint``) and :meth:`RunState.load` (for ``resume``) walk it,
so an object added to a run is saved and restored by adding it in one place. The file format
itself (tag, layout, atomic writes, ``read_entry``) belongs to :mod:`dmdcopy.io.run_checkpoint`.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dmdcopy.distill import fsdp
from dmdcopy.distill.config import RESUMABLE_CHANGES, DistillConfig
from dmdcopy.errors import CheckpointError
from dmdcopy.io.run_checkpoint import digest, flatten_optimizer, unflatten_optimizer
from dmdcopy.io.state import compare_state, load_state_checked

__all__ = ["Counters", "RunState", "check_identity", "check_resumable", "run_fingerprint"]


@dataclass
class Counters:
    """The run's counters (saved in every checkpoint)."""

    step: int = 0                 # training steps done; a step whose updates were skipped counts too
    generator_updates: int = 0    # generator updates applied (skipped ones excluded)
    fake_score_updates: int = 0   # fake-score updates applied
    nonfinite_total: int = 0      # updates skipped for a non-finite loss or gradient
    nonfinite_in_a_row: dict[str, int] = field(
        default_factory=lambda: {"generator": 0, "fake_score": 0})  # consecutive skips per kind

    def state_dict(self) -> dict[str, Any]:
        return dict(step=self.step, generator_updates=self.generator_updates,
                    fake_score_updates=self.fake_score_updates, nonfinite_total=self.nonfinite_total,
                    nonfinite_in_a_row=dict(self.nonfinite_in_a_row))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator_updates = int(state["generator_updates"])
        self.fake_score_updates = int(state["fake_score_updates"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_a_row = {k: int(v) for k, v in state["nonfinite_in_a_row"].items()}


class RunState:
    """The registry of a run's saved objects.

    Args:
        networks: ``{entry: module}``; a ``None`` module (EMA off, no GAN) is not saved. Weights
            go under ``<entry>/`` and load through :func:`dmdcopy.io.load_state_checked`.
        optimizers: ``{name: optimizer}``, saved as ``optim/<name>/...`` tensors and ``optim``
            JSON.
        counters: saved in the JSON document.
        device: the run's device; torch's CPU RNG state is saved, and the CUDA one on a GPU.
        sharded: the networks are FSDP-sharded (:mod:`dmdcopy.distill.fsdp`): saving gathers
            full tensors (every process must call :meth:`state`), loading scatters them back.
    """

    def __init__(self, *, networks: Mapping[str, nn.Module | None],
                 optimizers: Mapping[str, torch.optim.Optimizer], counters: Counters,
                 device: torch.device, sharded: bool = False) -> None:
        self.networks = {k: m for k, m in networks.items() if m is not None}
        self.optimizers = dict(optimizers)
        self.counters = counters
        self.device = device
        self.sharded = bool(sharded)

    def state(self, **extra: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Flat tensors and a JSON-able document holding every registered object (and ``extra``)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.networks.items():
            sd = fsdp.full_state(module) if self.sharded else module.state_dict()
            tensors.update({f"{name}/{k}": v for k, v in sd.items()})
        optim = {}
        for name, opt in self.optimizers.items():
            t, meta = flatten_optimizer(fsdp.full_optimizer_state(opt) if self.sharded else opt,
                                        f"optim/{name}")
            tensors.update(t)
            optim[name] = meta
        tensors["rng/torch_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors, {**self.counters.state_dict(), "optim": optim, **extra}

    def check(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any], *,
              source: str = "checkpoint") -> dict[str, dict[str, torch.Tensor]]:
        """Check that ``tensors`` / ``state`` fit every registered object, changing nothing; return
        each network's part of ``tensors``."""
        parts = {}
        for name, module in self.networks.items():
            head = name + "/"
            parts[name] = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
            report = compare_state(module, parts[name])
            if not report.ok:
                raise CheckpointError(f"{source}: the {name} weights do not fit the model: "
                                      f"{report.summary()}")
        missing = [n for n in self.optimizers if n not in state.get("optim", {})]
        if missing or "rng/torch_cpu" not in tensors:
            raise CheckpointError(f"{source}: incomplete checkpoint (no state for optimiser(s) "
                                  f"{missing} or no RNG state)")
        return parts

    def load(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any], *,
             source: str = "checkpoint") -> None:
        """Restore every registered object; nothing is changed if a network does not fit."""
        parts = self.check(tensors, state, source=source)
        for name, module in self.networks.items():
            part = fsdp.load_full_state(module, parts[name]) if self.sharded else parts[name]
            load_state_checked(module, part, strict=True, source=f"{source}: {name}")
        for name, opt in self.optimizers.items():
            sd = unflatten_optimizer(tensors, state["optim"][name], f"optim/{name}")
            opt.load_state_dict(fsdp.load_full_optimizer_state(opt, sd) if self.sharded else sd)
        torch.set_rng_state(tensors["rng/torch_cpu"])
        if self.device.type == "cuda" and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        self.counters.load_state_dict(state)


def check_resumable(saved: Mapping[str, Any], config: DistillConfig, source: str) -> None:
    """Refuse a checkpoint written with settings that change what is computed."""
    now = config.to_dict()
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        raise CheckpointError(f"{source}: the checkpoint was written with different settings for "
                              f"{changed}; resume with the same config (only {sorted(RESUMABLE_CHANGES)} "
                              "may change)")


# Fingerprint fields of the networks' initial weights: refused by default like every other field,
# accepted with ``allow_new_init=True`` (a script that builds its networks from the unseeded global
# RNG draws other initial weights at each launch; the trained weights come from the checkpoint).
_INIT_FIELDS = ("student_init", "fake_score_init", "discriminator_init")


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _architecture(module: object) -> str:
    cls = type(module)
    return _short(f"{cls.__module__}.{cls.__qualname__}\n{module!r}")


def run_fingerprint(*, teacher: nn.Module | Callable[..., torch.Tensor], student: nn.Module,
                    fake_score: nn.Module, discriminator: nn.Module | None,
                    world_size: int) -> dict[str, Any]:
    """What identifies a run besides its config: the teacher's weight digest
    (:func:`dmdcopy.pairs.teacher_fingerprint`), the architecture (class and ``repr``) and initial
    weights digest of student and fake score, the discriminator's architecture, the process count."""
    from dmdcopy.pairs import teacher_fingerprint

    cls = type(teacher)
    out: dict[str, Any] = {
        "teacher": (teacher_fingerprint(teacher) if isinstance(teacher, nn.Module)
                    else f"{cls.__module__}.{cls.__qualname__}"),
        "student_architecture": _architecture(student),
        "student_init": digest(student.state_dict())[:16],
        "fake_score_architecture": _architecture(fake_score),
        "fake_score_init": digest(fake_score.state_dict())[:16],
        "world_size": int(world_size),
    }
    if discriminator is not None:
        out["discriminator_architecture"] = _architecture(discriminator)
        out["discriminator_init"] = digest(discriminator.state_dict())[:16]
    return out


def check_identity(saved: Mapping[str, Any] | None, now: Mapping[str, Any], source: str, *,
                   allow_new_init: bool = False) -> None:
    """Refuse a checkpoint of another run, naming the fields that differ (a checkpoint without a
    fingerprint, written before fingerprints existed, is accepted). Different initial weights are
    refused too unless ``allow_new_init``, and then only reported."""
    if saved is None:
        return
    # (an init digest the checkpoint predates, such as ``discriminator_init``, is not compared)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                     and (k in saved or k not in _INIT_FIELDS))
    refused = [k for k in changed if not allow_new_init or k not in _INIT_FIELDS]
    if refused:
        hint = ("; the networks were initialised differently: seed their construction (e.g. "
                "torch.manual_seed before building them), or pass allow_new_init=True to load the "
                "trained weights over them" if set(refused) <= set(_INIT_FIELDS) else
                "; resume with the same teacher, networks and process count, or start a new out_dir")
        raise CheckpointError(f"{source}: the checkpoint belongs to another run: {refused} differ{hint}")
    if changed:
        print(f"dmdcopy: note: {source}: the networks' initial weights differ from the run's "
              f"({changed}); their trained weights are loaded from the checkpoint", file=sys.stderr)
