"""The ``nabla`` command. Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their subcommand runs, so optional extras
(diffusers, video IO, plotting) are needed only by the subcommands that use them."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("nabla_attn.demo.cli", "generate a clip with the bundled video DiT, dense vs NABLA, and compare"),
    "calibrate": ("nabla_attn.demo.calibrate_cli", "choose per-layer NABLA thresholds for the bundled video DiT at a kept budget"),
    "example": ("nabla_attn.example", "run the op once on this device: kept density, error vs dense, time"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nabla", description="NABLA sparse attention for video DiTs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (its arguments are needed to parse).
        if argv and argv[0] == name:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
