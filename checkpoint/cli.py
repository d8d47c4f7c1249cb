"""argparse front end. Each verb lives in its own module under
``checkpoint.commands`` and exposes ``register(subparsers)``; the handler it
sets returns an exit code. Errors of the engine become one line on stderr and
a non-zero exit code; nothing here knows how a verb works.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys

from . import faults, interrupt
from .errors import CheckpointError, Interrupted

# One line per verb module; the module registers its own sub-parsers.
COMMAND_MODULES = [
    "checkpoint.commands.check",
    "checkpoint.commands.images",
    "checkpoint.commands.dump",
    "checkpoint.commands.restore",
    "checkpoint.commands.migrate",
]


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr and exit 2 (``--help`` shows the rest)."""

    def error(self, message: str):
        verb = self.prog.removeprefix("checkpoint").strip()
        self.exit(2, f"checkpoint: error: {verb + ': ' if verb else ''}{message} "
                     f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(
        prog="checkpoint",
        description="Incremental checkpoint/restore of Linux processes.",
    )
    parser.add_argument("--version", action="version", version=f"checkpoint {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def emit_json(obj) -> None:
    """Print one JSON object on stdout (the --json contract)."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


def entry() -> None:
    """The ``checkpoint`` program (console script and ``python -m
    checkpoint``). The stop signals set the flag from here to the process's
    end, so a signal that comes while the interpreter winds down cannot turn
    a finished command's status into death by that signal."""
    interrupt.install()
    faults.point("cli.ready")
    code = _main(None)
    # Python's finalisation puts the default handlers back: a signal then
    # would still kill us by its own name. Nothing is left to do but flush.
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    # First thing (before the verbs' modules are imported): SIGINT, SIGTERM,
    # SIGHUP and SIGQUIT only set a flag; the engine stops at its next safe
    # point (checkpoint/interrupt.py). An in-process caller gets its own
    # handlers back when main returns.
    with interrupt.installed():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        interrupt.check()          # a stop asked for while starting up
        code = int(args.func(args) or 0)
    except KeyboardInterrupt:      # only before install() took effect
        print("checkpoint: interrupted; targets were released", file=sys.stderr)
        return Interrupted.exit_code
    except CheckpointError as exc:
        print(f"checkpoint: error: {exc}", file=sys.stderr)
        if "--json" in (argv if argv is not None else sys.argv[1:]):
            emit_json(exc.as_json())   # an orchestrator reads stdout only
        return exc.exit_code
    except BrokenPipeError:
        return 1
    sig = interrupt.pending()
    if sig is not None:  # arrived after the commit point: the work is done
        print(f"checkpoint: {signal.Signals(sig).name} received after the work was "
              "complete; nothing was undone", file=sys.stderr)
    return code
