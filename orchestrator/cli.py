"""The `opsd` command line: one sub-command per capability, each defined beside the code it drives.

Every package that offers commands has a `cli.py` with `register(subparsers)`; those modules import their
heavy dependencies (torch, vLLM, Ray) inside the command functions, so `opsd analyze` and `opsd sandbox`
start fast and work on a machine without the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from orchestrator.errors import CONFIG_ERROR_EXIT

# Packages whose `cli.register` adds sub-commands, in the order `opsd --help` lists them.
_COMMAND_MODULES = ("sandbox.cli", "trainer.cli", "orchestrator.sweep_cli", "orchestrator.screen_cli", "analysis.cli")

EPILOG = """\
examples:
  opsd sandbox check problem.json response.md --json   grade one program in the sandbox
  opsd trial sweeps/demo_trial.yaml --out runs/demo      run one OPSD trial without Ray
  opsd analyze runs/sweep --out report/                  fit the law from trials.parquet

Run `opsd COMMAND --help` for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opsd",
        description="On-policy self-distillation sweeps and the predictive law of their results.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        # Every command module is part of the package and imports no optional stack at module level, so a
        # missing one is a broken installation: let the ImportError name it.
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        # Bad input is reported in one line. Each package has an error base class with
        # `user_facing = True` (packages do not import one another's errors, see docs/ARCHITECTURE.md).
        if not getattr(err, "user_facing", False):
            raise
        print(f"opsd {args.command}: error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"opsd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
