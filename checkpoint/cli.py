"""argparse front end. Each verb lives in its own module under
``checkpoint.commands`` and exposes ``register(subparsers)``; the handler it
sets returns an exit code. Errors of the engine become one line on stderr and
a non-zero exit code; nothing here knows how a verb works.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import CheckpointError, Interrupted
from .freezer import terminate_unwinds

# One line per verb module; the module registers its own sub-parsers.
COMMAND_MODULES = [
    "checkpoint.commands.check",
    "checkpoint.commands.images",
    "checkpoint.commands.dump",
    "checkpoint.commands.restore",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkpoint",
        description="Incremental checkpoint/restore of Linux processes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def emit_json(obj) -> None:
    """Print one JSON object on stdout (the --json contract)."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` that thaws a
    # target or puts back an injected thread's registers still runs.
    try:
        with terminate_unwinds():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("checkpoint: interrupted; targets were released", file=sys.stderr)
        return Interrupted.exit_code
    except CheckpointError as exc:
        print(f"checkpoint: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 1
