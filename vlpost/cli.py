"""`vlpost` console script: a thin dispatcher; each package registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register(subparsers)`, adding parsers whose `func(args) -> int` does the work.
COMMAND_MODULES = (
    "vlpost.data.commands",
    "vlpost.data.audit_commands",
    "vlpost.eval.commands",
    "vlpost.train.commands",
    "vlpost.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlpost", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # not written yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
