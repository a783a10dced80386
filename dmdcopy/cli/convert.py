"""``dmdcopy convert``: an EDM network pickle or a DMD2 / torch state dict -> dmdcopy .safetensors.

Nothing from the input file is executed: EDM pickles go through a restricted unpickler, torch
files through ``torch.load(weights_only=True)``. A torch state dict carries no architecture;
name one with ``--arch``.

Examples::

    dmdcopy convert edm-imagenet-64x64-cond-adm.pkl teacher.safetensors
    dmdcopy convert pytorch_model.bin student.safetensors --arch imagenet64-adm
    dmdcopy convert pytorch_model_1.bin fake_score.safetensors --arch imagenet64-adm --prefix fake_unet.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]

# The one place architecture names map to modules (DMD2's ImageNet-64 networks use dropout 0).
_ARCHES = ("imagenet64-adm",)


def _architecture(name: str | None):
    if name is None:
        return None
    from dmdcopy.io import edm_imagenet64_adm
    from dmdcopy.nets.unet import DhariwalUNet
    from dmdcopy.precond import EDMPrecond

    if name == "imagenet64-adm":
        return EDMPrecond(DhariwalUNet(**edm_imagenet64_adm(dropout=0.0)), sigma_data=0.5)
    raise AssertionError(name)  # argparse restricts the choices


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
        choices=_ARCHES,
        default=None,
        help="architecture of a torch state dict (required for those); with an EDM pickle, its weights "
        "are loaded into this architecture (strictly) instead of the one the pickle records",
    )
    p.add_argument(
        "--prefix",
        default=None,
        help="take the network under this key prefix of a state dict, e.g. fake_unet.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmdcopy.errors import CheckpointError
    from dmdcopy.io import convert, detect_format
    from dmdcopy.io.formats import EDM_PICKLE, SAFETENSORS

    if not str(args.output).endswith(".safetensors"):
        raise CheckpointError(f"the output must be a .safetensors file, got {args.output}")
    if detect_format(args.input) not in (EDM_PICKLE, SAFETENSORS) and args.arch is None:
        raise CheckpointError(
            f"{args.input} is a torch state dict without an architecture; pass --arch ({', '.join(_ARCHES)})"
        )
    module = convert(
        args.input, args.output, key=args.key, architecture=_architecture(args.arch), prefix=args.prefix
    )
    n = sum(p.numel() for p in module.parameters())
    print(
        f"wrote {args.output}: {type(module).__name__}({type(getattr(module, 'model', module)).__name__}), "
        f"{n / 1e6:.1f}M parameters"
    )
    return 0
