"""The process tree: what makes a tree more than a list of processes.

At dump (``link_tree``, inside the freeze, once every process's own records
are taken): which thread of its parent forked each child (PR_SET_PDEATHSIG
follows that thread), and the objects two processes hold as one:

- an open file description (inherited across fork, passed with
  SCM_RIGHTS), found with kcmp(KCMP_FILE) against every earlier process of
  the tree holding the same inode: the later fd gets ``tree_pid``/``tree_fd``
  and ``tree_same_description``; the restore takes that very description
  from the earlier process (pidfd_getfd);
- an inode that must stay one object without being one description (the
  two ends of a pipe, another open of a FIFO, a memfd, a deleted file): the
  later fd names the earlier one, the restore reopens it through
  /proc/self/fd/N; its unread data or content is carried by the first
  holder only;
- shared memory that no path reopens (shared anonymous memory, a memfd or
  deleted file mapped shared): the later VMA names the first process's VMA
  of the same object (``shared_pid``, ``shared_start``, ``shared_end``); the
  restore maps that object (/proc/PID/map_files) and the first holder's
  layer alone carries its pages.

"Earlier" is the tree's order: the root, then breadth first, parents before
children; the restore builds the processes in that order.

Zombies (children that exited and were not reaped) have a PstreeEntry only
(``zombie``, ``exit_code``: their wait status).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import time
from array import array
from contextlib import nullcontext

from ..errors import CheckpointError, ImageError, RestoreError, TargetExited, UnsupportedObject
from ..freezer import SEIZE_OPTIONS, FrozenProcess, FrozenThread, FrozenTree
from ..images.pb import files_pb2, pstree_pb2
from ..inject import Injector
from ..kernel import procfs
from ..kernel import ptrace as pt
from ..kernel.syscalls import NR, clone_args, raw_syscall
from . import mm as mm_obj
from .fds.base import refuse

KCMP_FILE = 0
# fds whose inode is one object even as another description
_ONE_INODE = (files_pb2.FD_PIPE, files_pb2.FD_FIFO, files_pb2.FD_MEMFD)


def _kcmp_file(pid1: int, pid2: int, fd1: int, fd2: int) -> bool:
    try:
        return raw_syscall(NR["kcmp"], pid1, pid2, KCMP_FILE, fd1, fd2) == 0
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            raise UnsupportedObject("a process tree shares files, and this kernel has no "
                                    "kcmp (CONFIG_KCMP) to tell which: not supported") from None
        if exc.errno == errno.EBADF:
            return False
        raise


def _forker(parent: int, parent_tids, child: int) -> int:
    for tid in parent_tids:
        try:
            with open(f"/proc/{parent}/task/{tid}/children") as f:
                if str(child) in f.read().split():
                    return tid
        except OSError:
            pass
    return 0


def shared_object(v) -> bool:
    """A MAP_SHARED VMA whose object only the tree can give back (no path)."""
    return bool(v.flags & 0x01) and bool(v.status & mm_obj.VMA_SHARED_ANON or (
        v.status & mm_obj.VMA_DELETED) or v.path.startswith("/memfd:"))


def link_tree(recs: dict[int, dict], tree: FrozenTree, *, final: bool,
              external: bool = False) -> dict[int, set[int]]:
    """Fill in the links between the processes' records (module docstring);
    returns, by PID, the starts of the VMAs whose pages another process's
    records carry."""
    procs = tree.procs
    by_pid = tree.by_pid
    if final:
        _mark_closed_pipes(recs)
    for p in procs[1:]:
        t = recs[p.pid]["pstree"]
        parent = by_pid.get(t.ppid)
        if parent is not None:
            t.parent_tid = _forker(parent.pid, parent.tids, p.pid)
    skip: dict[int, set[int]] = {}
    if final:
        _link_unix(recs, [p.pid for p in procs], external)
    if len(procs) == 1:
        return skip
    # shared memory: the first VMA of each object, in tree order
    first_vma: dict[tuple[int, int], tuple[int, object]] = {}
    for p in procs:
        for v in recs[p.pid]["mm"].vmas:
            if not shared_object(v):
                continue
            key = (v.dev, v.inode)
            got = first_vma.get(key)
            if got is None:
                first_vma[key] = (p.pid, v)
            elif got[0] != p.pid:
                v.shared_pid, v.shared_start, v.shared_end = got[0], got[1].start, got[1].end
                skip.setdefault(p.pid, set()).add(v.start)
    if not final:
        return skip
    # files: every fd against the earlier processes' fds of the same inode
    seen: dict[tuple[int, int], list[tuple[int, object]]] = {}
    for p in procs:
        files = recs[p.pid].get("files")
        if files is None:
            continue
        mine: list[tuple[tuple[int, int], object]] = []
        for e in files.fds:
            if e.HasField("dup_of") or e.external:
                continue   # a dup follows its original in the same process
            key = (e.dev, e.inode)
            for qpid, qe in seen.get(key, ()):
                if _kcmp_file(qpid, p.pid, qe.fd, e.fd):
                    _link(e, qpid, qe.fd, True)
                    break
            else:
                if e.type in _ONE_INODE or (e.type == files_pb2.FD_REG and e.ghost):
                    first = next(((q, qe) for q, qe in seen.get(key, ())
                                  if qe.type == e.type), None)
                    if first is not None:
                        _link(e, first[0], first[1].fd, False)
            mine.append((key, e))
        for key, e in mine:
            seen.setdefault(key, []).append((p.pid, e))
    return skip


def _link_unix(recs: dict[int, dict], order: list[int], external: bool) -> None:
    """Unix socketpairs: which process makes each pair (the first in the
    tree's order holding either end; an fd sharing its description with an
    earlier process's fd is taken from it by the file links instead), and a
    pair with an end outside the dumped processes refused by name."""
    ends: dict[int, tuple[int, object]] = {}   # socket inode -> (pid, first entry)
    for pid in order:
        for e in recs[pid]["files"].fds:
            if e.type == files_pb2.FD_UNIX_SOCKET and not e.HasField("dup_of") \
                    and not e.unix.single and not e.unix.pending_on:
                ends.setdefault(e.unix.inode, (pid, e))
    rank = {pid: i for i, pid in enumerate(order)}
    _link_waiting(recs, order, rank, external)
    for inode, (pid, e) in ends.items():
        got = ends.get(e.unix.peer)
        if got is None:
            holders = [x for x in recs[pid]["files"].fds if x.type == files_pb2.FD_UNIX_SOCKET
                       and x.unix.inode == inode]
            for x in holders:
                x.ClearField("unix")
                refuse(x, "socket", "a unix socket", "unix sockets connected outside the "
                       "dumped processes", external,
                       f" of process {pid}, connected to one outside the dumped processes")
            continue
        qpid, q = got
        server = (pid, e) if e.unix.name else (qpid, q) if q.unix.name else None
        if server is not None:
            spid, se = server
            holds = any(x.type == files_pb2.FD_UNIX_SOCKET and x.unix.single and
                        x.unix.listening and x.unix.name == se.unix.name
                        for x in recs[spid]["files"].fds)
            if not holds or rank[spid] > rank[qpid if spid == pid else pid]:
                for x in [x for x in recs[pid]["files"].fds
                          if x.type == files_pb2.FD_UNIX_SOCKET and x.unix.inode == inode]:
                    x.ClearField("unix")
                    refuse(x, "socket", "a unix socket", "such connections", external,
                           f" of process {pid}, a connection whose server's process does "
                           "not hold the listener it was accepted by, or comes after the "
                           "client's")
                continue
        if rank[qpid] < rank[pid]:
            e.unix.maker = qpid
            del e.unix.queue[:]     # the maker sends it
        elif qpid != pid:
            e.unix.peer_state.CopyFrom(q.unix)
            e.unix.peer_state.ClearField("peer_state")


def _link_waiting(recs, order, rank, external: bool) -> None:
    """Clients waiting in a listener's accept queue connect to it again at
    restore, in the tree's order (then each process's fd order): that must
    be the queue's order, the listener's process must come first, and each
    waiting client must be in the dump (else the listener is refused)."""
    listeners = {}   # inode -> (pid, entry)
    waiting = {}     # client inode -> (pid, entry)
    for pid in order:
        for e in recs[pid]["files"].fds:
            if e.type != files_pb2.FD_UNIX_SOCKET or e.HasField("dup_of"):
                continue
            if e.unix.single and e.unix.listening and e.unix.pending:
                listeners.setdefault(e.unix.inode, (pid, e))
            elif e.unix.pending_on:
                waiting.setdefault(e.unix.inode, (pid, e))
    for linode, (lpid, le) in listeners.items():
        clients = [waiting.get(c) for c in le.unix.pending]
        why = ""
        if any(c is None for c in clients):
            why = ", with connections waiting from processes outside the dump"
        elif any(rank[cpid] < rank[lpid] for cpid, _ in clients):
            why = ", with a waiting client in a process that comes before the listener's"
        elif [(rank[cpid], ce.fd) for cpid, ce in clients] != \
                sorted((rank[cpid], ce.fd) for cpid, ce in clients):
            why = ", with waiting clients that would connect again in another order"
        elif any(ce.unix.pending_on != le.unix.name for _, ce in clients):
            why = ", with waiting clients naming another listener"
        if why:
            for x in [x for x in recs[lpid]["files"].fds if x.type ==
                      files_pb2.FD_UNIX_SOCKET and x.unix.inode == linode]:
                x.ClearField("unix")
                refuse(x, "socket", "a unix socket", "such listeners", external,
                       f" of process {lpid}, a listener{why}")
            for c in clients:
                if c is not None:
                    waiting.pop(c[1].unix.inode, None)
                    _refuse_unix(recs, c[0], c[1].unix.inode, external,
                                 "waiting to be accepted by a listener that is refused")
    queued = {c for _, le in listeners.values() for c in le.unix.pending}
    for cinode, (cpid, ce) in list(waiting.items()):
        if cinode not in queued:
            _refuse_unix(recs, cpid, cinode, external,
                         "waiting to be accepted by a listener outside the dump")


def _refuse_unix(recs, pid: int, inode: int, external: bool, why: str) -> None:
    for x in [x for x in recs[pid]["files"].fds if x.type == files_pb2.FD_UNIX_SOCKET
              and x.unix.inode == inode]:
        x.ClearField("unix")
        refuse(x, "socket", "a unix socket", "such unix sockets", external,
               f" of process {pid}, {why}")


def _mark_closed_pipes(recs: dict[int, dict]) -> None:
    """A pipe of which the dumped processes hold one end only: if no other
    process holds the other end either (every fd of every process on the
    host looked at: a pipe ends where its fds do), that end was closed for
    good (a writer that exited, a child's end closed after exec) and the
    restore makes it so again; otherwise the restore refuses it, naming the
    fd, unless a stand-in is given."""
    ends: dict[int, set[int]] = {}
    entries: dict[int, list] = {}
    for rec in recs.values():
        for e in rec["files"].fds:
            if e.type == files_pb2.FD_PIPE and not e.external:
                acc = e.flags & os.O_ACCMODE
                ends.setdefault(e.pipe_id, set()).update(
                    (os.O_RDONLY, os.O_WRONLY) if acc == os.O_RDWR else (acc,))
                entries.setdefault(e.pipe_id, []).append(e)
    lone = {ino for ino, m in ends.items() if len(m) < 2}
    if not lone:
        return
    held = _pipes_held_outside(set(recs), {f"pipe:[{ino}]" for ino in lone})
    for ino in lone - held:
        for e in entries[ino]:
            e.pipe_peer_closed = True


def _pipes_held_outside(pids: set[int], links: set[str]) -> set[int]:
    out: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in pids:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if link in links:
                out.add(int(link[6:-1]))
    return out


def _link(e, pid: int, fd: int, same: bool) -> None:
    e.tree_pid, e.tree_fd, e.tree_same_description = pid, fd, same
    # the first holder carries the object's data
    e.pipe_data = b""
    e.content = b""
    e.ClearField("same_inode_as")


def zombie_records(tree: FrozenTree) -> list:
    return [pstree_pb2.PstreeEntry(pid=z.pid, ppid=z.ppid, pgid=z.pgid, sid=z.sid,
                                   comm=z.comm, start_time=z.start_time, zombie=True,
                                   exit_code=z.exit_code) for z in tree.zombies]


# ---------------------------------------------------------------------------
# restore side: the tree as the image gives it, checked


class Node:
    """One process of the image's tree."""

    def __init__(self, tree, rec: dict | None):
        self.tree = tree          # its PstreeEntry
        self.rec = rec            # its records (None: a zombie)
        self.pid = tree.pid
        self.children: list["Node"] = []

    @property
    def zombie(self) -> bool:
        return self.tree.zombie


def check_tree(nodes: list[Node], path: str) -> None:
    """Refuse an image whose tree cannot be one: the root first, every other
    process's parent earlier in the order and alive, no PID or TID twice,
    links between records pointing only at earlier processes and fds or
    VMAs they have."""
    def bad(msg):
        raise ImageError(f"process tree: {msg}", path=path)

    if not nodes or nodes[0].zombie:
        bad("no live root process")
    index = {}
    tids: set[int] = set()
    for i, n in enumerate(nodes):
        if n.pid in index:
            bad(f"PID {n.pid} given twice")
        if not 0 < n.pid < 1 << 22:
            bad(f"PID {n.pid} out of range")
        if i and n.tree.ppid not in index:
            bad(f"the parent {n.tree.ppid} of {n.pid} is not earlier in the tree")
        if i and nodes[index[n.tree.ppid]].zombie:
            bad(f"the parent {n.tree.ppid} of {n.pid} is a zombie")
        if n.zombie:
            if n.rec is not None or list(n.tree.threads):
                bad(f"zombie {n.pid} has records or threads")
        else:
            for t in n.tree.threads:
                if t in tids or (t != n.pid and t in index):
                    bad(f"TID {t} given twice")
                tids.add(t)
        index[n.pid] = i
        if i:
            nodes[index[n.tree.ppid]].children.append(n)
    for i, n in enumerate(nodes):
        if n.rec is None:
            continue
        cow = list(n.rec["mm"].cow_parent)
        if cow:
            private = sorted((v.start, v.end) for v in n.rec["mm"].vmas
                             if not v.flags & 0x01 and v.path not in mm_obj.SPECIAL)
            last = 0
            if i == 0 or len(cow) % 2:
                bad(f"memory of {n.pid} shared with a parent it has not")
            for s, e in zip(cow[0::2], cow[1::2]):
                if not last <= s < e or s % 4096 or e % 4096 or not any(
                        vs <= s and e <= ve for vs, ve in private):
                    bad(f"memory of {n.pid} shared with its parent: range {s:#x}-{e:#x} "
                        "out of order or outside its private VMAs")
                last = e
        for e in n.rec["files"].fds:
            if e.type == files_pb2.FD_UNIX_SOCKET and e.unix.pending_on and not any(
                    f.type == files_pb2.FD_UNIX_SOCKET and f.unix.listening and
                    f.unix.name == e.unix.pending_on for m in nodes[:i + 1] if m.rec
                    for f in m.rec["files"].fds):
                bad(f"fd {e.fd} of {n.pid} waits on a listener no earlier process has")
            if e.type == files_pb2.FD_UNIX_SOCKET and e.unix.maker:
                j = index.get(e.unix.maker)
                if j is None or j >= i or nodes[j].zombie or not any(
                        f.type == files_pb2.FD_UNIX_SOCKET and f.unix.inode == e.unix.peer
                        for f in nodes[j].rec["files"].fds):
                    bad(f"fd {e.fd} of {n.pid}: its unix socket's maker {e.unix.maker} is "
                        "not an earlier process holding its peer")
            if not e.HasField("tree_pid"):
                continue
            j = index.get(e.tree_pid)
            if j is None or j >= i or nodes[j].zombie or not e.HasField("tree_fd"):
                bad(f"fd {e.fd} of {n.pid} names process {e.tree_pid}, not an earlier one")
            if e.tree_fd not in {f.fd for f in nodes[j].rec["files"].fds}:
                bad(f"fd {e.fd} of {n.pid} names fd {e.tree_fd} of {e.tree_pid}, "
                    "which it does not have")
        for v in n.rec["mm"].vmas:
            if not v.shared_pid:
                continue
            j = index.get(v.shared_pid)
            if j is None or j >= i or nodes[j].zombie:
                bad(f"VMA {v.start:#x} of {n.pid} names process {v.shared_pid}, "
                    "not an earlier one")
            if not any(w.start == v.shared_start and w.end == v.shared_end
                       and (w.dev, w.inode) == (v.dev, v.inode) and shared_object(w)
                       for w in nodes[j].rec["mm"].vmas) or not shared_object(v):
                bad(f"VMA {v.start:#x} of {n.pid} names no shared VMA of {v.shared_pid}")


# ---------------------------------------------------------------------------
# restore: forks, sessions, groups, zombies

SIGCHLD = 17
RLIMIT_CORE = 4


def plan(nodes: list[Node]) -> None:
    """Refuse, before anything starts, a tree whose sessions and groups the
    restore cannot make: every process is in its own session, or in the one
    its parent had (setsid before its own children are forked); every group
    is led by a process of the tree (alive or a zombie), or is the root's."""
    pids = {n.pid for n in nodes}
    root = nodes[0].tree
    by_pid = {n.pid: n for n in nodes}
    for n in nodes[1:]:
        t = n.tree
        parent = by_pid[t.ppid].tree
        if t.sid != n.pid and t.sid != parent.sid:
            raise UnsupportedObject(
                f"process {n.pid} ({t.comm}) is in session {t.sid}, neither its own nor its "
                f"parent {t.ppid}'s ({parent.sid}): not supported (its parent left the "
                "session after forking it)")
        if t.pgid != n.pid and t.pgid not in pids and t.pgid != root.pgid:
            raise UnsupportedObject(
                f"process {n.pid} ({t.comm}) is in process group {t.pgid}, whose leader is "
                "not in the tree: not supported yet")


def fork_child(parent: FrozenProcess, node: Node, timeout: float, r=None) -> FrozenProcess:
    """Fork ``node`` from its frozen parent with its PID (clone3 set_tid, an
    injected call in the parent's leader): the child starts as a copy of
    the parent placeholder, stopped and traced (PTRACE_O_TRACEFORK), and is
    built from it like the root."""

    exit_signal = SIGCHLD if node.rec is None else node.rec["process"].exit_signal
    tids = (ctypes.c_int32 * 1)(node.pid)
    args = clone_args(flags=0, exit_signal=exit_signal, set_tid_size=1)
    lead = parent.pid
    pt.setoptions(lead, SEIZE_OPTIONS | pt.PTRACE_O_EXITKILL | pt.PTRACE_O_TRACEFORK
                  | pt.PTRACE_O_TRACECLONE)
    before = set(_kids(parent.pid))
    deadline = time.monotonic() + 5
    with (Injector(parent, lead, safe=False) if r is None else nullcontext(r)) as r:
        base = r.scratch
        args.set_tid = base + 512
        r.write(base + 512, bytes(tids))
        r.write(base, bytes(args))
        while True:
            got = r.syscall("clone3", base, ctypes.sizeof(args))
            # the PID may still be held by the dumped process, dying or not
            # reaped yet by its new parent
            if got != -errno.EEXIST or time.monotonic() > deadline:
                break
            time.sleep(0.005)
    if got == -errno.EEXIST:
        raise RestoreError(f"PID {node.pid} is taken by another process: restore the tree "
                           "once it is free, or with --pid-ns")
    if got != node.pid:
        raise RestoreError(f"fork of process {node.pid} from {parent.pid}: " + (
            os.strerror(-got) if got < 0 else f"clone3 gave PID {got}"))
    new = set(_kids(parent.pid)) - before
    if len(new) != 1:
        raise RestoreError(f"cannot tell the new process {node.pid} among {sorted(new)}")
    pid = new.pop()
    child = FrozenProcess(pid, timeout)
    child.threads[pid] = FrozenThread(pid)   # auto-attached
    child._gadget = parent._gadget
    child._await_interrupt_stop(pid)
    if node.tree.sid == node.pid:
        with Injector(child, pid, safe=False) as r:
            r.call("setsid")
    return child


def _kids(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def set_groups(nodes: list[Node], procs: dict[int, FrozenProcess], root_pgid: int) -> None:
    """The process groups, once every process exists: leaders first, then
    the members (a group must exist before anyone joins it). ``root_pgid``:
    the root's group as the restored processes see it (0: not visible)."""
    root = nodes[0].tree
    pids = {n.pid for n in nodes}
    for members in (False, True):
        for n in nodes[1:]:
            t = n.tree
            if t.sid == n.pid or (t.pgid == n.pid) == members:
                continue
            want = t.pgid if t.pgid in pids else root_pgid if t.pgid == root.pgid else -1
            if want <= 0:
                continue   # the root's group, inherited
            with Injector(procs[n.pid], procs[n.pid].pid, safe=False) as r:
                res = r.syscall("setpgid", 0, 0 if want == n.pid else want)
            if res < 0:
                raise RestoreError(f"process {n.pid}: setpgid to group {t.pgid}: "
                                   f"{os.strerror(-res)}")


def make_zombies(nodes: list[Node], procs: dict[int, FrozenProcess]) -> None:
    """Each zombie's placeholder exits with the dumped status, before its
    parent is built (the parent then still has the default SIGCHLD
    disposition, so the zombie stays for its wait()); the SIGCHLD its exit
    queues in the parent placeholder is taken away again (the dumped
    parent's pending signals are restored on their own)."""
    parents = set()
    for n in nodes:
        if not n.zombie:
            continue
        proc = procs.pop(n.pid)
        code = n.tree.exit_code
        sig = code & 0x7F
        with Injector(proc, proc.pid, safe=False) as r:
            if sig:  # killed by a signal: taken at detach, default action, no core file
                r.write(r.scratch, b"\0" * 16)
                r.call("prlimit64", 0, RLIMIT_CORE, r.scratch, 0)
                r.write(r.scratch, b"\0" * 32)   # sa_handler SIG_DFL, no flags, no mask
                r.call("rt_sigaction", sig, r.scratch, 0, 8)
        if sig:
            proc.threads[proc.pid].pending_signal = sig
            proc.thaw()
        else:
            with Injector(proc, proc.pid, safe=False) as r:
                try:
                    r.syscall("exit_group", (code >> 8) & 0xFF)
                except TargetExited:
                    pass
            proc.threads.clear()
        _await_zombie(proc.pid)
        parents.add(n.tree.ppid)
    for ppid in parents:
        p = procs[ppid]
        with Injector(p, p.pid, safe=False) as r:
            mask = (1 << (SIGCHLD - 1)).to_bytes(8, "little")
            r.write(r.scratch, mask + b"\0" * 16)   # the set, then a zero timeout
            while r.syscall("rt_sigtimedwait", r.scratch, 0, r.scratch + 8, 8) == SIGCHLD:
                pass


def _await_zombie(pid: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if procfs.read_stat(pid).state in ("Z", "X"):
                return
        except CheckpointError:
            raise RestoreError(f"zombie {pid} was reaped before its parent was restored") \
                from None
        time.sleep(0.001)
    raise RestoreError(f"process {pid} did not exit to become a zombie")


# ---------------------------------------------------------------------------
# memory still shared copy-on-write with the parent

# pagemap bits that say which page an address shows (the frame, or the
# swap entry, present, file); not the per-process ones (exclusive, uffd-wp,
# soft-dirty, guard)
_CHUNK = 512                      # entries compared at once (2 MiB)
_T6 = bytes(x & 0x7F for x in range(256))            # byte 6: drop bit 55 (soft-dirty)
_T7 = bytes(x & ~0x07 & 0xFF for x in range(256))    # byte 7: drop bits 56-58
_pfns_visible: bool | None = None


def _masked(raw: bytes) -> bytearray:
    b = bytearray(raw)
    b[6::8] = b[6::8].translate(_T6)
    b[7::8] = b[7::8].translate(_T7)
    return b


def pfns_visible() -> bool:
    """Page frame numbers show in /proc/PID/pagemap only with CAP_SYS_ADMIN
    (else they read 0): asked once, of a page of our own."""
    global _pfns_visible
    if _pfns_visible is None:
        with mmap.mmap(-1, 4096) as m:
            m[0] = 1
            page = ctypes.c_char.from_buffer(m)
            addr = ctypes.addressof(page)
            del page   # (the mapping cannot close while a ctypes view holds it)
            with open("/proc/self/pagemap", "rb", 0) as f:
                entry = struct.unpack("<Q", os.pread(f.fileno(), 8, addr // 4096 * 8))[0]
        _pfns_visible = bool(entry & ((1 << 55) - 1))
    return _pfns_visible


def cow_ranges(child: int, parent: int, child_vmas, parent_vmas) -> list[int]:
    """(start, end) pairs, flat, of the child's private memory that shows the
    very page its parent shows at that address (read in the freeze from both
    pagemaps): inherited at fork and written by neither since, or untouched
    by both. Compared 512 entries at a time, entry by entry only where a
    block differs."""
    if not pfns_visible():
        return []
    pv = sorted((v.start, v.end) for v in parent_vmas if not v.shared and v.path not in
                mm_obj.SPECIAL)
    out: list[int] = []
    with open(f"/proc/{child}/pagemap", "rb", 0) as fc, \
            open(f"/proc/{parent}/pagemap", "rb", 0) as fp:
        for v in child_vmas:
            if v.shared or v.path in mm_obj.SPECIAL:
                continue
            for ps, pe in pv:
                s, e = max(v.start, ps), min(v.end, pe)
                if s >= e:
                    continue
                for at in range(s, e, _CHUNK * 4096):
                    end = min(e, at + _CHUNK * 4096)
                    n = (end - at) // 4096
                    a = _masked(os.pread(fc.fileno(), n * 8, at // 4096 * 8))
                    b = _masked(os.pread(fp.fileno(), n * 8, at // 4096 * 8))
                    if len(a) != n * 8 or len(b) != n * 8:
                        continue
                    if a == b:
                        _add(out, at, end, s)
                        continue
                    aa, bb = array("Q", a), array("Q", b)
                    for i in range(n):
                        if aa[i] == bb[i]:
                            _add(out, at + i * 4096, at + (i + 1) * 4096, s)
    return out


def _add(out: list[int], s: int, e: int, floor: int) -> None:
    """Append [s, e), merged with the last range unless that ends at ``floor``
    (a range never spans two VMAs)."""
    if out and out[-1] == s and s > floor:
        out[-1] = e
    else:
        out.extend((s, e))


def subtract(rows, ranges):
    """Region rows (flat start, end, flags) without the flat (start, end)
    ``ranges`` (both sorted)."""
    if not ranges:
        return rows
    out = array("Q")
    pairs = list(zip(ranges[0::2], ranges[1::2]))
    j = 0
    for i in range(0, len(rows), 3):
        s, e, f = rows[i], rows[i + 1], rows[i + 2]
        while j < len(pairs) and pairs[j][1] <= s:
            j += 1
        k = j
        while s < e:
            if k >= len(pairs) or pairs[k][0] >= e:
                out.extend((s, e, f))
                break
            cs, ce = pairs[k]
            if cs > s:
                out.extend((s, cs, f))
            s = max(s, ce)
            k += 1
    return out


def left_ranges(prev: list[int], now: list[int]) -> list[tuple[int, int]]:
    """What was shared with the parent at the last round and is not now
    (the parent wrote it: the child's own copy must be stored now)."""
    if not prev:
        return []
    rows = array("Q")
    for s, e in zip(prev[0::2], prev[1::2]):
        rows.extend((s, e, 0))
    rest = subtract(rows, now)
    return [(rest[i], rest[i + 1]) for i in range(0, len(rest), 3)]
