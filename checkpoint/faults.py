"""Deterministic fault injection, for the tests that prove a dying or
interrupted engine never corrupts a checkpoint or leaves a target damaged
(CRIU has the same idea: CRIU_FAULT).

The engine calls :func:`point` at the places where dying is interesting
(after the dirty set was taken, between two injected syscalls, before a
layer is published ...). Nothing happens unless ``CHECKPOINT_FAULT`` is set
in the environment (or :func:`arm` is called), as ``NAME[@N][:ACTION]``:

- ``NAME``: the point, e.g. ``dump.collected``; ``*`` matches any point
  (with ``@N``: the N-th point reached, whatever its name);
- ``N``: act at the N-th time the point is reached (1 = first, the default);
- ``ACTION``: ``kill`` (SIGKILL ourselves, the default), ``term``
  (SIGTERM), ``int`` (SIGINT) or ``raise`` (a RuntimeError).

``CHECKPOINT_FAULT_LOG=FILE`` appends the name of every point reached, one a
line (the tests use it to list the points a verb goes through).
"""

from __future__ import annotations

import os
import signal

_spec: tuple[str, int, str] | None = None
_seen: dict[str, int] = {}
_log: str | None = None
_ACTIONS = ("kill", "term", "int", "raise")


def arm(spec: str | None) -> None:
    """Set (or with None clear) the fault to inject, as in CHECKPOINT_FAULT."""
    global _spec
    _seen.clear()
    if not spec:
        _spec = None
        return
    name, _, action = spec.partition(":")
    name, _, nth = name.partition("@")
    action = action or "kill"
    if action not in _ACTIONS or (nth and not nth.isdigit()):
        raise ValueError(f"bad CHECKPOINT_FAULT {spec!r}: NAME[@N][:{'|'.join(_ACTIONS)}]")
    _spec = (name, int(nth or 1), action)


def point(name: str) -> None:
    """A place where the engine may be made to fail (a no-op normally)."""
    if _spec is None and _log is None:
        return
    if _log is not None:
        with open(_log, "a") as f:
            f.write(name + "\n")
    if _spec is None:
        return
    want, nth, action = _spec
    if want not in ("*", name):
        return
    key = want
    _seen[key] = _seen.get(key, 0) + 1
    if _seen[key] != nth:
        return
    if action == "raise":
        raise RuntimeError(f"fault injected at {name}")
    os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM,
                          "int": signal.SIGINT}[action])


arm(os.environ.get("CHECKPOINT_FAULT"))
_log = os.environ.get("CHECKPOINT_FAULT_LOG") or None
