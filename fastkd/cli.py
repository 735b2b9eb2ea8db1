"""The ``fastkd`` console command: ``fastkd demo`` (the main job) and ``fastkd bench``.

Each subcommand is an application package with a ``cli`` module (``fastkd.demo.cli``,
``fastkd.bench.cli``) exposing ``add_arguments(parser)`` and ``run(args)``; it is imported only
when chosen, so ``fastkd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("fastkd.demo.cli", "real distillation on real data, end to end (the main job)"),
    "bench": ("fastkd.bench.cli", "speed and memory of every backend against the reference"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
