"""The ``lnstd`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import get_method, list_methods

    for name in list_methods():
        doc = (get_method(name).__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands), also used by tests to check job entrypoints."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lnstd", description="Explain Vision Transformers (timm ViT and Swin) at dataset scale."
    )
    parser.add_argument("--version", action="version", version=f"lnstd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("methods", help="list the attribution methods")
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lnstd`` console script and ``python -m lnstd``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"lnstd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
