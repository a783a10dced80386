"""``dmdcopy convert``: an EDM network pickle or a DMD2 / torch state dict -> dmdcopy .safetensors.

Nothing from the input file is executed: EDM pickles go through a restricted unpickler, torch
files through ``torch.load(weights_only=True)``. A torch state dict carries no architecture;
name one with ``--arch``: a built-in name, or your own class as ``module:builder`` (a callable of
your installed package returning the ``nn.Module``, called with ``--kwargs`` as JSON keyword
arguments; imported from the path you give here, never from the file). A module of your own class
is saved with its weights but cannot be rebuilt from the file alone: load it again with the same
``--arch``/``--kwargs`` (``dmdcopy delta-e --teacher-arch ...``) or ``dmdcopy.load(path, into=module)``.

Examples::

    dmdcopy convert edm-imagenet-64x64-cond-adm.pkl teacher.safetensors
    dmdcopy convert pytorch_model.bin student.safetensors --arch imagenet64-adm
    dmdcopy convert pytorch_model_1.bin fake_score.safetensors --arch imagenet64-adm --prefix fake_unet.
    dmdcopy convert teacher.pt teacher.safetensors --arch mypkg.nets:build_teacher --kwargs '{"width": 64}'
"""

from __future__ import annotations

import argparse
import os

__all__ = ["register", "run"]

# The one place architecture names map to modules (DMD2's ImageNet-64 networks use dropout 0).
_ARCHES = ("imagenet64-adm",)


def _architecture(name: str | None):
    if name is None:
        return None
    from dmdcopy.io.dmd2 import dmd2_imagenet64

    if name == "imagenet64-adm":
        return dmd2_imagenet64()
    raise AssertionError(name)  # checked in run()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an EDM pickle or a DMD2 state dict to dmdcopy's .safetensors (nothing executed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="EDM network pickle (.pkl) or torch state dict (.bin/.pt/.pth)")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--key", default="ema", help="entry of an EDM snapshot dict (default: ema)")
    p.add_argument(
        "--arch",
        default=None,
        metavar="NAME|MODULE:BUILDER",
        help=f"architecture of a torch state dict (required for those): {', '.join(_ARCHES)}, or your own "
        "class as module:builder; with an EDM pickle or a safetensors file, its weights are loaded into "
        "this architecture (strictly)",
    )
    p.add_argument("--kwargs", default=None, metavar="JSON",
                   help="keyword arguments of a module:builder --arch, as a JSON object")
    p.add_argument(
        "--prefix",
        default=None,
        help="take the network under this key prefix of a state dict, e.g. fake_unet.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmdcopy.errors import CheckpointError, ConfigError
    from dmdcopy.io import convert, detect_format, save
    from dmdcopy.io.formats import EDM_PICKLE, SAFETENSORS
    from dmdcopy.io.user_arch import build_user_module, fill_module, parse_kwargs, user_classes

    if not str(args.output).endswith(".safetensors"):
        raise CheckpointError(f"the output must be a .safetensors file, got {args.output}")
    user = args.arch is not None and ":" in args.arch
    if args.arch is not None and not user and args.arch not in _ARCHES:
        raise ConfigError(f"--arch {args.arch!r}: expected one of {', '.join(_ARCHES)} or module:builder "
                          "(your own class, e.g. mypkg.nets:build_teacher)")
    if args.kwargs is not None and not user:
        raise ConfigError("--kwargs needs --arch module:builder (the builder it is passed to)")
    fmt = detect_format(args.input)
    if fmt not in (EDM_PICKLE, SAFETENSORS) and args.arch is None:
        raise CheckpointError(
            f"{args.input} is a torch state dict without an architecture; pass --arch "
            f"({', '.join(_ARCHES)}) or, for your own class, --arch module:builder"
        )
    if user:
        try:
            module = build_user_module(args.arch, args.kwargs)
        except ConfigError as e:
            raise ConfigError(f"--arch: {e}") from e
        fill_module(module, args.input, key=args.key, prefix=args.prefix,
                    name=f"{args.arch} ({type(module).__name__})")
        facts = {"converted_from": os.path.basename(args.input), "arch": args.arch,
                 "arch_kwargs": parse_kwargs(args.kwargs)}
        if args.prefix is not None:
            facts["prefix"] = args.prefix
        save(module, args.output, metadata=facts)
    else:
        module = convert(
            args.input, args.output, key=args.key, architecture=_architecture(args.arch), prefix=args.prefix
        )
    n = sum(p.numel() for p in module.parameters())
    print(
        f"wrote {args.output}: {type(module).__name__}({type(getattr(module, 'model', module)).__name__}), "
        f"{n / 1e6:.1f}M parameters"
    )
    custom = user_classes(module)
    if custom:
        print(f"note: {', '.join(custom)} is your own class; load the file again with the same --arch and "
              "--kwargs (dmdcopy delta-e --teacher-arch/--student-arch) or dmdcopy.load(path, into=module)")
    return 0
