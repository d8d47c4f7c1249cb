"""Stop requests (SIGINT, SIGTERM, SIGHUP, SIGQUIT) as a flag, never as an
exception that lands at a random bytecode.

An exception raised from a signal handler can surface anywhere: inside a
queue's lock, half-way through a ``finally`` that thaws a target, between
the two ptrace calls that put a thread's registers back. So while the
engine works, the handler only records the first signal, and the engine
asks :func:`check` at the points where stopping is safe (before freezing,
between page batches, before publishing a layer, between restore steps);
there :class:`~checkpoint.errors.Interrupted` unwinds through the ordinary
clean-up paths.

    with stoppable():          # installs the handlers (main thread only)
        ...
        check()                # raises Interrupted if a stop was asked for

Once a round has published its layer (its commit point) it finishes
without checking: the work asked for is done, and undoing it would lose
more than it saves.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from .errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

_caught: list[int] = []     # the first stop signal received, if any
_depth = 0                  # nesting of stoppable()
_saved: dict[int, object] = {}


def _on_signal(signum, _frame) -> None:
    if not _caught:
        _caught.append(signum)


def pending() -> int | None:
    """The stop signal received and not yet acted on, or None."""
    return _caught[0] if _caught else None


def clear() -> None:
    _caught.clear()


def check() -> None:
    """Raise Interrupted when a stop was asked for (the flag stays set, so an
    outer clean-up that checks again sees it too)."""
    if _caught:
        raise Interrupted(f"stopped by {signal.Signals(_caught[0]).name}; "
                          "targets were released, nothing partial was published")


def _ours(handler) -> bool:
    """A handler we may replace: Python's defaults (SIGINT raises
    KeyboardInterrupt, the others kill the process) or our own."""
    return handler in (signal.SIG_DFL, signal.default_int_handler, _on_signal)


def install() -> None:
    """Stop signals set the flag from now on, for good (the ``checkpoint``
    program; a handler someone else installed is left alone)."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            if _ours(signal.getsignal(s)):
                signal.signal(s, _on_signal)


@contextmanager
def installed() -> Iterator[None]:
    """The CLI's mode: for the whole command the stop signals only set the
    flag (a handler someone else installed is left alone); the command
    decides what a stop that came after its commit point means. The
    previous handlers and an empty flag come back at the end."""
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            old = signal.getsignal(s)
            if _ours(old):
                saved[s] = old
                signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, old in saved.items():
            signal.signal(s, old)
        clear()


@contextmanager
def stoppable() -> Iterator[None]:
    """Within the block the stop signals only set the flag (main thread; a
    handler the caller installed is kept). On leaving the outermost block
    the previous handlers come back, and a signal that arrived after the
    last :func:`check` is delivered to them then (Ctrl-C becomes the
    caller's KeyboardInterrupt right after the call that completed), so a
    stop is delayed to a safe point, never lost."""
    global _depth
    main = threading.current_thread() is threading.main_thread()
    outer = main and _depth == 0
    if outer:
        for s in STOP_SIGNALS:
            old = signal.getsignal(s)
            if _ours(old) and old is not _on_signal:
                _saved[s] = old
                signal.signal(s, _on_signal)
    _depth += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _depth -= 1
        if outer and _saved:   # library use: hand the signal back to the caller's handlers
            for s, old in _saved.items():
                signal.signal(s, old)
            _saved.clear()
            sig = pending()
            clear()
            if sig is not None and ok:
                signal.raise_signal(sig)
