"""The ``divaware`` command line.

Each subcommand is a small ``_cmd_<name>`` function that parses nothing itself and calls into the package;
heavy imports (torch, MONAI) happen inside those functions so ``divaware --help`` stays instant.
To add a subcommand: write ``_add_<name>(sub)`` registering its parser and ``set_defaults(func=_cmd_<name>)``,
and list it in ``_REGISTRARS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    return [fn for name, fn in sorted(globals().items()) if name.startswith("_add_") and callable(fn)]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    from divaware import __version__

    parser = argparse.ArgumentParser(
        prog="divaware",
        description="Divergence-aware training for fair breast tumour segmentation (MAMA-MIA).",
    )
    parser.add_argument("--version", action="version", version=f"divaware {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``divaware`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        # CohortError and configuration errors are ValueErrors whose message says what to do.
        print(f"divaware {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
