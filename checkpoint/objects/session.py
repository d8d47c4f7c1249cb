"""Session and process group of a restored process.

The image records the dumped process's session id (sid) and process group
id (pgid). A process can only be in the session of the process that forked
it, or make a new one (setsid) of which it is the leader; and it can only
join a process group of its own session. So the restore picks, before the
placeholder is started (``plan``):

- a session leader (sid == PID) calls setsid(): the same ids again; if it
  had a controlling terminal it takes it again once its fds are restored;
- a process whose session is the restorer's own (restored from the shell or
  service that started it) stays in it and takes its group again: its own
  (pgid == PID, setpgid(0, 0)) or the existing group it was in;
- a process of a session whose leader is gone (its PID is free here): a
  *keeper* with the session's PID makes the session (setsid) and forks the
  placeholder, which takes its own group or the keeper's; the keeper lives
  as long as the restored process (it is what the engine waits for);
- ``--shell-job`` (CRIU's ``-j``): the restored process joins the
  restorer's session as a job of it (its own group if it led one);
- in a new PID namespace (``--pid-ns``) the namespace's init makes a new
  session unless ``--shell-job``, and a leader takes its session or group
  again inside it (the ids of another session cannot exist there);
- otherwise the session's PID belongs to another process here: the restore
  refuses, naming it and the options.

A group of the dumped session other than its own or the session's (a
pipeline member whose group leader is gone) needs a keeper for the group
too: that is refused by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import RestoreError

MAX_ID = 1 << 22  # PID_MAX_LIMIT


@dataclass(frozen=True)
class Plan:
    setsid: bool = False        # the placeholder calls setsid()
    pgid: int | None = None     # setpgid(0, pgid) in the placeholder (0: its own group)
    keeper_sid: int = 0         # a keeper with this PID makes the session first
    how: str = ""               # one line for the log
    shell_job: bool = False     # stays in the restorer's session (no new one in a PID ns)
    ctty: int = 0               # a leader takes this terminal (dev_t) as its controlling one

    def apply(self) -> None:  # pragma: no cover - in the forked placeholder
        """In the fresh placeholder (or its keeper's child), before exec."""
        if self.setsid:
            os.setsid()
        elif self.pgid is not None:
            os.setpgid(0, self.pgid)


TIOCSCTTY = 0x540E


def take_terminal(r, engine_pid: int, plan: Plan) -> None:
    """A session leader that had a controlling terminal takes it again
    (TIOCSCTTY on the fd of the restored process that refers to it; its
    group becomes the terminal's foreground group, as the kernel does)."""
    if not plan.ctty:
        return
    fd = _tty_fd(engine_pid, plan.ctty)
    if fd is not None:
        res = r.syscall("ioctl", fd, TIOCSCTTY, 0)
        if res < 0:
            raise RestoreError(f"session leader: cannot take its controlling terminal "
                               f"again (fd {fd}): {os.strerror(-res)}")
        return
    raise RestoreError(f"the session leader had a controlling terminal (device "
                       f"{os.major(plan.ctty)}:{os.minor(plan.ctty)}) that none of its fds "
                       "holds: it cannot be given back")


TIOCSPGRP = 0x5410


def set_foreground(r, engine_pid: int, plan: Plan, pgrp: int) -> None:
    """The session leader gives its terminal back to the dumped foreground
    group (a job of a restored shell), once every group exists."""
    fd = _tty_fd(engine_pid, plan.ctty)
    if fd is None:
        return
    r.write(r.scratch, pgrp.to_bytes(4, "little"))
    res = r.syscall("ioctl", fd, TIOCSPGRP, r.scratch)
    if res < 0:
        raise RestoreError(f"session leader: cannot give its terminal to the "
                           f"foreground process group {pgrp}: {os.strerror(-res)}")


def _tty_fd(engine_pid: int, rdev: int) -> int | None:
    """The lowest fd of the restored process on the terminal ``rdev``."""
    for name in sorted(os.listdir(f"/proc/{engine_pid}/fd"), key=int):
        try:
            st = os.stat(f"/proc/{engine_pid}/fd/{name}")
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == rdev:
            return int(name)
    return None


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def plan(pid: int, sid: int, pgid: int, *, shell_job: bool = False, pid_ns: bool = False,
         new_pids: bool = False, tty_nr: int = 0) -> Plan:
    """What the placeholder does about its session and group (module docstring).
    ``pid``, ``sid`` and ``pgid`` are the dumped ones."""
    for name, v in (("sid", sid), ("pgid", pgid)):
        if not 0 <= v < MAX_ID:
            raise RestoreError(f"image field pstree.{name}: {v} is no process id")
    if sid == pid and sid:
        if pgid != pid:
            raise RestoreError(f"image: session leader {pid} in process group {pgid} "
                               "(a session leader leads its group)")
        return Plan(setsid=True, how=f"session leader {sid}", ctty=tty_nr)
    own = Plan(pgid=0, how="own process group in this session") if pgid == pid else None
    if shell_job or pid_ns or new_pids or sid == 0:
        how = "own process group in this session" if own else "this session and process group"
        return Plan(pgid=0 if own else None, how=how, shell_job=shell_job)
    if os.getsid(0) == sid:
        if own:
            return Plan(pgid=0, how=f"own process group in session {sid}")
        if pgid == os.getpgid(0):
            return Plan(how=f"process group {pgid} of session {sid}")
        return Plan(pgid=pgid, how=f"process group {pgid} of session {sid}")
    if not _exists(sid):
        if pgid not in (pid, sid):
            raise RestoreError(
                f"the dumped process was in process group {pgid} of session {sid}, "
                "neither of which is left to join (their leaders are gone): not supported; "
                "restore with --shell-job (it joins this session) or --pid-ns")
        if tty_nr:
            raise RestoreError(
                f"the dumped process was in session {sid}, whose leader is gone, with a "
                "controlling terminal: a session made again has none; restore with "
                "--shell-job (it joins this session and its terminal)")
        return Plan(keeper_sid=sid, pgid=0 if pgid == pid else None,
                    how=f"session {sid} made again by a keeper")
    raise RestoreError(
        f"the dumped process was in session {sid}, whose leader's PID is another process's "
        f"here (and this restore runs in session {os.getsid(0)}): restore it from that "
        "session, or with --shell-job (it joins this session as a job), or with --pid-ns")
