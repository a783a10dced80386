"""The ``dmdcopy`` command. Each subcommand lives in its own module with a ``register`` function
that adds its parser and sets ``func``; this is the one place names map to library objects."""

from __future__ import annotations

import argparse
import importlib
import sys

from dmdcopy.errors import DmdcopyError, RunInterrupted

__all__ = ["main"]

# Subcommand modules, in the order `dmdcopy --help` lists them.
_SUBCOMMANDS: list[str] = ["delta_e", "demo", "convert", "distill", "plot", "sample"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmdcopy",
        description="Distribution Matching Distillation, and how much a student copies its teacher.",
    )
    from dmdcopy import __version__

    parser.add_argument("--version", action="version", version=f"dmdcopy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        importlib.import_module(f"dmdcopy.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RunInterrupted as e:  # a run stopped cleanly on SIGINT / SIGTERM: 130 / 143
        print(f"dmdcopy {args.command}: stopped by {e}", file=sys.stderr)
        return 128 + e.signum
    except DmdcopyError as e:
        # Our own errors are the user's to fix: one line, no traceback.
        print(f"dmdcopy {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dmdcopy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
