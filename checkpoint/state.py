"""Every kind of process state the engine knows, and what it does with it.

The rule: each kind is restored exactly, or the dump refuses it with one
line naming the object and the option that accepts its loss (or hands it to
the restore side). There is no third outcome: nothing is dropped silently.

``KINDS`` is the one table of that; docs/restore.md's "What is restored"
section is generated from it (``tools/gen_state_table.py``; a test fails when
they differ), and ``checkpoint dump -v`` lists what it found of each kind.

Statuses:
- ``restored``: dumped and restored exactly (its room says how);
- ``refused``: the dump fails naming it; ``option`` (if any) makes the dump go
  on and says what happens then (e.g. ``--external-fds``: left to the restore
  side, which must give a stand-in with ``--inherit-fd``);
- ``option``: dumped and restored only with ``option`` (which also says the
  caveat: CRIU's ``--file-locks``, ``--tcp-established``), refused without;
- ``engine``: belongs to the engine or the host, never the program's (the
  engine's own parked fds); listed so the table is complete;
- ``dropped``: what the engine does not handle yet and silently loses: a bug
  of the rule above, kept visible here until its room restores or refuses it
  (none may remain: tests/test_state_table.py).
"""

from __future__ import annotations

from dataclasses import dataclass

RESTORED, REFUSED, OPTION, ENGINE, DROPPED = "restored", "refused", "option", "engine", \
    "dropped"
STATUSES = (RESTORED, REFUSED, OPTION, ENGINE, DROPPED)


@dataclass(frozen=True)
class Kind:
    area: str           # "memory", "threads", "signals", "process", "files", ...
    name: str           # what a user calls it
    status: str         # one of STATUSES
    room: str           # the module that dumps and restores (or refuses) it
    option: str = ""    # the option that accepts a loss / enables it
    note: str = ""      # one line: how, or why not

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"{self.name}: unknown status {self.status!r}")
        if self.status == OPTION and not self.option:
            raise ValueError(f"{self.name}: an 'option' kind names its option")


KINDS: tuple[Kind, ...] = (
    # -- memory
    Kind("memory", "private anonymous memory", RESTORED, "objects/mm.py",
         note="every page with content, incrementally (tracking.md)"),
    Kind("memory", "private file mappings", RESTORED, "objects/mm.py",
         note="the file mapped again (identity checked), its copied-on-write pages from the image"),
    Kind("memory", "shared file mappings", RESTORED, "objects/mm.py",
         note="the file mapped again shared, opened read-write when the mapping may be made "
              "writable (VM_MAYWRITE); its pages are the file's"),
    Kind("memory", "shared anonymous memory, memfd and deleted-file mappings", RESTORED,
         "objects/mm.py", note="taken whole every round"),
    Kind("memory", "brk, mm fields, auxv, exe link", RESTORED, "objects/mm.py",
         note="PR_SET_MM_MAP"),
    Kind("memory", "vDSO block", RESTORED, "objects/mm.py",
         note="moved to its dumped address; another kernel's vDSO is refused"),
    Kind("memory", "madvise state, mlock, THP settings", RESTORED, "objects/madvise.py",
         note="per VMA from its VmFlags, after the pages: madvise (dc dd hg nh mg wf sr "
              "rr), mlock2 (lo; lf: MLOCK_ONFAULT) with the dumped RLIMIT_MEMLOCK and "
              "capabilities; PR_SET_THP_DISABLE"),
    Kind("memory", "mlockall(MCL_FUTURE), KSM for the whole process, THP disabled except "
         "advised", REFUSED, "objects/madvise.py",
         note="no room in the image (MCL_FUTURE, in no procfs file, is probed with a page "
              "mapped in the target)"),
    Kind("memory", "sealed (mseal), droppable and shadow-stack mappings, unknown VmFlags",
         REFUSED, "objects/madvise.py", note="no restore makes them; an image naming one "
                                              "is refused too"),
    # -- threads
    Kind("threads", "registers, FPU/AVX state", RESTORED, "objects/threads.py"),
    Kind("threads", "thread IDs", RESTORED, "restorer.py",
         note="clone3 set_tid (or inside --pid-ns)"),
    Kind("threads", "signal mask, sigaltstack, robust list, clear_child_tid, rseq, comm",
         RESTORED, "objects/threads.py"),
    Kind("threads", "a syscall interrupted by the dump", RESTORED, "objects/threads.py",
         note="restarted; a restart block gives EINTR or, with --restart-block reissue, "
              "the call again"),
    # -- signals
    Kind("signals", "dispositions", RESTORED, "objects/signals.py"),
    Kind("signals", "pending signals (process and thread)", RESTORED, "objects/signals.py",
         note="re-queued with their siginfo"),
    # -- process
    Kind("process", "rlimits", RESTORED, "objects/process.py",
         note="a hard limit above the caller's stays lower (needs CAP_SYS_RESOURCE)"),
    Kind("process", "personality, umask, dumpable, parent-death signal", RESTORED,
         "objects/process.py"),
    Kind("process", "credentials, capabilities, securebits, no_new_privs", RESTORED,
         "objects/process.py", note="never more than the caller has"),
    Kind("process", "seccomp (strict mode, filters)", RESTORED, "objects/process.py",
         note="user-notification filters are refused"),
    Kind("process", "cwd, root", RESTORED, "objects/fds/fs.py"),
    Kind("process", "a deleted working directory", REFUSED, "objects/fds/fs.py",
         note="no option: the process must chdir elsewhere first (CRIU recreates it)"),
    # -- files (objects/fds/: one module per kind of fd)
    Kind("files", "regular files and directories", RESTORED, "objects/fds/regfile.py",
         note="reopened by path as the dumped user, identity checked, offset and flags"),
    Kind("files", "deleted-but-open files", RESTORED, "objects/fds/regfile.py",
         note="recreated from the image as nameless files owned by the dumped user"),
    Kind("files", "deleted directories, FIFOs, devices and O_PATH files held open", REFUSED,
         "objects/fds/refused.py", option="--external-fds",
         note="no path reopens them (a deleted regular file is rebuilt from its content)"),
    Kind("files", "open procfs files", RESTORED, "objects/fds/procfile.py",
         note="reopened by path, the process's own /proc/PID made the restored PID's; "
              "offset as far as the file allows"),
    Kind("files", "files of another process's /proc", REFUSED, "objects/fds/procfile.py",
         option="--external-fds",
         note="that process may be gone or another at restore; also /proc/TID of its "
              "other threads"),
    Kind("files", "pipes and FIFOs with their data", RESTORED, "objects/fds/pipe.py"),
    Kind("files", "/dev/null, zero, full, random, urandom", RESTORED, "objects/fds/devnull.py"),
    Kind("files", "terminals and ptys", RESTORED, "objects/fds/tty.py",
         note="the restorer's terminal, a pty pair restored together, or reopened"),
    Kind("files", "terminal settings (termios, window size)", RESTORED, "objects/fds/tty.py",
         note="TCSETS2 on every tty fd; the restorer's terminal keeps its own size "
              "(SIGWINCH if it differs)"),
    Kind("files", "memfd", RESTORED, "objects/fds/memfd.py", note="content, mode and seals"),
    Kind("files", "a memfd both mapped and held as an fd", RESTORED, "objects/fds/memfd.py",
         note="one object: made by the fd room first, the mapping made from it"),
    Kind("files", "hugetlb memfds", REFUSED, "objects/fds/memfd.py", option="--external-fds"),
    Kind("files", "eventfd, signalfd", RESTORED, "objects/fds/eventfd.py"),
    Kind("files", "epoll instances and their registrations", RESTORED, "objects/fds/epoll.py",
         note="each registration's file found with kcmp(KCMP_EPOLL_TFD), also when its fd "
              "number was closed or reused"),
    Kind("files", "epoll registrations of files no fd holds", REFUSED, "objects/fds/epoll.py",
         option="--external-fds"),
    Kind("files", "timerfd", RESTORED, "objects/fds/timerfd.py",
         note="clock, flags, next expiry on its clock, unread expirations; fires after "
              "restore if it expired meanwhile"),
    Kind("files", "inotify watches", RESTORED, "objects/fds/inotify.py",
         note="re-added by path with their mask and wd; a path gone fails the restore"),
    Kind("files", "inotify instances with queued events, or watching a deleted file", REFUSED,
         "objects/fds/inotify.py", option="--external-fds"),
    Kind("files", "file locks (flock, POSIX, OFD)", OPTION, "objects/fds/locks.py",
         option="--file-locks",
         note="re-taken before the process runs; they are let go meanwhile (another "
              "process taking one fails the restore)"),
    Kind("files", "file leases", REFUSED, "objects/fds/locks.py", option="--external-fds"),
    Kind("files", "status flags of inherited fds (O_NONBLOCK)", RESTORED,
         "objects/fds/__init__.py",
         note="a --inherit-fd stand-in gets the dumped O_NONBLOCK, O_APPEND, O_NOATIME"),
    Kind("files", "unix socketpairs (stream, datagram, seqpacket) and connections accepted "
         "by a listener, within the dumped processes", RESTORED, "objects/fds/unixsk.py",
         note="unread data both ways (peeked), shutdown state, buffer sizes, SO_PASSCRED, "
              "SO_PEEK_OFF, timeouts; made by the first holder (an accepted one: by the "
              "server connecting to its restored listener), taken by the others"),
    Kind("files", "unix sockets on their own: new, bound to a path or an abstract name, "
         "listening, and the clients waiting in a listener's queue", RESTORED,
         "objects/fds/unixsk.py",
         note="bound again (the dumped socket file, if no live socket holds it, replaced; "
              "its mode and owner given back), listen with the backlog, options; waiting "
              "clients connect again in the queue's order after the accepted ones"),
    Kind("files", "unix sockets connected outside the dumped processes (or to a server whose "
         "process lacks the listener), listeners with clients waiting from outside the dump, "
         "waiting clients that sent data, bound sockets with unread data", REFUSED,
         "objects/fds/unixsk.py", option="--external-fds",
         note="left to the restore side (--inherit-fd)"),
    Kind("files", "file descriptors in flight (SCM_RIGHTS queued, not yet received)",
         REFUSED, "objects/fds/unixsk.py"),
    Kind("files", "unread data on a socket with SO_PASSCRED", REFUSED,
         "objects/fds/unixsk.py", note="the sender's credentials of each message"),
    Kind("files", "TCP sockets new, bound or listening; UDP sockets bound or connected "
         "(IPv4, IPv6)", RESTORED, "objects/fds/inetsk.py",
         note="bound again (SO_REUSEADDR for the bind alone), listen with the backlog, "
              "options (reuse, keepalive, buffers, nodelay, v6only, timeouts...)"),
    Kind("files", "netlink sockets (route, uevent...) with no message unread", RESTORED,
         "objects/fds/nlsk.py",
         note="protocol, port id, multicast groups, peer, options"),
    Kind("files", "netlink sockets with a message unread", REFUSED, "objects/fds/nlsk.py",
         option="--external-fds", note="its messages are the kernel's"),
    Kind("files", "established TCP connections (IPv4, IPv6)", OPTION, "objects/fds/tcpsk.py",
         option="--tcp-established",
         note="TCP_REPAIR: sequence numbers, both queues (sent and unsent apart), MSS, "
              "window scale, SACK, timestamps, window; packets dropped by a nftables lock "
              "from the dump to the restore; --tcp-close restores them closed instead; "
              "half-closed and connecting ones are refused by name (--tcp-close takes them)"),
    Kind("files", "TCP listeners with connections waiting, UDP sockets with "
         "unread data, packet and other sockets", REFUSED, "objects/fds/inetsk.py",
         option="--external-fds",
         note="left to the restore side, which gives a stand-in with --inherit-fd"),
    Kind("files", "fanotify, pidfd, io_uring, userfaultfd, other devices",
         REFUSED, "objects/fds/refused.py", option="--external-fds",
         note="left to the restore side (--inherit-fd)"),
    Kind("files", "shared anonymous or SysV shared memory held as an fd", REFUSED,
         "objects/fds/refused.py", option="--external-fds",
         note="an fd opened on /proc/PID/map_files of such a mapping"),
    Kind("files", "the engine's own parked tracking fds", ENGINE, "tracking/parked.py",
         note="never dumped as the program's"),
    # -- timers
    Kind("timers", "interval timers (setitimer)", RESTORED, "objects/timers.py",
         note="ITIMER_REAL/VIRTUAL/PROF with their time left and interval"),
    Kind("timers", "POSIX timers (timer_create)", RESTORED, "objects/timers.py",
         note="same ids (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.14), clock, signal, time left, "
              "interval; the last signal's overrun count reads 0 again"),
    # -- not handled yet: each must become restored or refused (issue 10)
    Kind("process", "session and process group", RESTORED, "objects/session.py",
         note="a leader leads again; the restorer's own session is joined with the group; "
              "a session whose leader is gone is made again by a keeper with its PID"),
    Kind("process", "controlling terminal of a session leader", RESTORED,
         "objects/session.py", note="TIOCSCTTY on the fd that holds it"),
    Kind("process", "a session whose leader's PID is another process's here", REFUSED,
         "objects/session.py", option="--shell-job",
         note="restore from that session, or join this one as a job (or --pid-ns)"),
    Kind("process", "a process group whose leader is gone in a session not joined",
         REFUSED, "objects/session.py", option="--shell-job"),
    Kind("tree", "child processes (the whole tree, CRIU's -t)", RESTORED, "objects/pstree.py",
         note="frozen together (listed again until stable), forked again from their "
              "restored parent with their PIDs; --skip-children dumps the root alone"),
    Kind("tree", "cgroup membership", ENGINE, "freezer.py",
         note="the host's placement, not dumped: the restored processes join the restore's "
              "cgroups (as CRIU's --manage-cgroups=ignore), an orchestrator moves them "
              "(cgroup.procs); --freeze-cgroup freezes a cgroup v2 while the tree is seized"),
    Kind("tree", "sessions and process groups across the tree", RESTORED, "objects/pstree.py",
         note="setsid at the fork, then group leaders, then members"),
    Kind("tree", "a process in a session neither its own nor its parent's", REFUSED,
         "objects/pstree.py", note="its parent left the session after forking it"),
    Kind("tree", "a process group whose leader is not in the tree (but the root's)", REFUSED,
         "objects/pstree.py"),
    Kind("tree", "zombie children", RESTORED, "objects/pstree.py",
         note="a placeholder exits with the dumped status before its parent is built; "
              "a signalled one dies of its signal (without the core-dump flag)"),
    Kind("tree", "exit signal, PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER", RESTORED,
         "objects/pstree.py", note="the parent-death signal follows the parent's leader "
              "(a child forked by another thread of its parent gets it when the parent exits)"),
    Kind("tree", "open file descriptions shared between processes (fork, SCM_RIGHTS)",
         RESTORED, "objects/pstree.py",
         note="found with kcmp, restored once and taken with pidfd_getfd by the others"),
    Kind("tree", "pipes, FIFOs, memfds, deleted files between processes", RESTORED,
         "objects/pstree.py", note="one object: reopened through the first holder's fd; "
              "its data carried once"),
    Kind("tree", "shared anonymous memory between processes", RESTORED, "objects/pstree.py",
         note="one object, mapped from the first holder's mapping (map_files); "
              "its pages carried once"),
    Kind("tree", "private memory still shared copy-on-write after fork", RESTORED,
         "objects/pstree.py", note="stored once (the same page frame in parent and child); "
              "the child is forked from its restored parent and keeps those pages shared"),
    Kind("process", "nice, scheduling policy and priority, CPU affinity (per thread)",
         RESTORED, "objects/sched.py", note="set with the caller's privilege"),
    Kind("process", "SCHED_DEADLINE", REFUSED, "objects/sched.py"),
    Kind("process", "oom_score_adj", RESTORED, "objects/sched.py"),
    Kind("memory", "pages of shared memory that is read-only or PROT_NONE now", RESTORED,
         "restorer.py", note="mapped writable, filled, then protected as dumped"),
    Kind("memory", "a removed SysV shared memory segment only the process holds",
         RESTORED, "objects/process.py", note="as shared anonymous memory, with its content"),
    Kind("memory", "SysV shared memory others can attach (not removed, or attached twice)",
         REFUSED, "objects/process.py", note="its pages are the segment's"),
    Kind("process", "SysV semaphores and message queues", ENGINE, "objects/process.py",
         note="IPC-namespace objects, not the process's: they outlive it and stay as they "
              "are; a SEM_UNDO adjustment is not visible to the engine"),
    Kind("threads", "a thread group whose leader exited", REFUSED, "objects/process.py",
         note="the zombie leader is named"),
)


def by_status(status: str) -> list[Kind]:
    return [k for k in KINDS if k.status == status]


def markdown() -> str:
    """The table docs/restore.md holds between its state-table markers."""
    out = ["| area | state | status | how, or the option |", "|---|---|---|---|"]
    for k in KINDS:
        how = k.note
        if k.option:
            how = f"`{k.option}`: {how}" if how else f"`{k.option}`"
        out.append(f"| {k.area} | {k.name} | {k.status} | {how} |")
    counts = ", ".join(f"{len(by_status(s))} {s}" for s in STATUSES)
    out.append("")
    out.append(f"{len(KINDS)} kinds: {counts}.")
    return "\n".join(out)


BEGIN, END = "<!-- state-table:begin -->", "<!-- state-table:end -->"


def splice(doc: str) -> str:
    """``doc`` with the text between the markers replaced by :func:`markdown`."""
    a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    return doc[:a] + "\n" + markdown() + "\n" + doc[b:]


def found(records: dict) -> list[str]:
    """What a final dump found of each kind, one line each (``dump -v``)."""
    from collections import Counter

    from .images.pb import files_pb2
    out = []
    cores, mm, proc = records.get("core") or [], records.get("mm"), records.get("process")
    tree = records.get("pstree")
    out.append(f"threads: {len(cores)}")
    if mm is not None:
        kinds = Counter("anonymous" if not v.inode else "file" for v in mm.vmas)
        shared = sum(1 for v in mm.vmas if v.flags & 0x01)
        advised = sum(1 for v in mm.vmas if set(v.vmflags) & set("dc dd hg nh mg wf sr rr lo"
                                                                .split()))
        out.append(f"memory: {len(mm.vmas)} VMAs ({kinds['anonymous']} anonymous, "
                   f"{kinds['file']} file, {shared} shared, {advised} with madvise/mlock "
                   f"state){', THP disabled' if mm.thp_disabled else ''}")
    files = records.get("files")
    if files is not None:
        fk = Counter(e.kind or files_pb2.FdType.Name(e.type).lower().removeprefix("fd_")
                     for e in files.fds)
        ext = sum(1 for e in files.fds if e.external)
        locks = sum(len(getattr(e, "locks", ())) for e in files.fds)
        out.append(f"files: {len(files.fds)} fds ({', '.join(f'{n} {k}' for k, n in sorted(fk.items()))})"
                   f"{f', {ext} external' if ext else ''}, {locks} file locks")
    if proc is not None:
        out.append(f"timers: {len(proc.itimers)} interval, {len(proc.posix_timers)} POSIX")
    if tree is not None and tree.parent_tid:
        out.append(f"child of {tree.ppid} (forked by thread {tree.parent_tid})")
    if tree is not None:
        role = "session leader" if tree.sid == tree.pid else \
            "group leader" if tree.pgid == tree.pid else "member"
        out.append(f"session {tree.sid}, process group {tree.pgid} ({role})")
    from .objects.sched import POLICY_NAME, SCHED_RESET_ON_FORK
    pol = Counter(POLICY_NAME.get(c.sched_policy & ~SCHED_RESET_ON_FORK, str(c.sched_policy))
                  for c in cores if c.has_sched)
    if pol:
        out.append("scheduling: " + ", ".join(f"{n} thread(s) {p}"
                                              for p, n in sorted(pol.items())))
    return out
