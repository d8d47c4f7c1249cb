"""The destination's half of live migration: the process is built while its
layers arrive, so the final round only adds its own dirty pages and the
rest of the state.

    stager = Stager(images_dir, pid_ns=True)
    stager.apply(layer)        # each pre-dump layer, as soon as it is checked
    stager.finish(final)       # the final layer: everything else; the copy runs
    stager.release()           # the source confirmed: keep it (reaped when it exits)
    stager.abort()             # or: kill what was staged

The first layer starts the placeholder (the original PID in a new PID
namespace: the source still holds it on this machine), empties its address
space and moves the vDSO block (``_Builder.begin``). Each layer then brings
the mappings to that layer's memory map and applies that layer's own pages
only, in chain order, which gives the chain's newest copy of every page:

- a VMA the new map lacks is unmapped; a VMA the previous map lacked (or
  that changed identity: start, end, file, offset, sharing) is mapped fresh
  (the trackers report such a VMA whole, so the layer holds all of it); a
  VMA that only changed protection is mprotect'ed and keeps its pages;
- data pages are written by process_vm_writev, many ranges a call (through
  /proc/PID/mem where it refuses: no PROT_WRITE); zero pages of a kept VMA
  are dropped with MADV_DONTNEED (anonymous memory reads zero again, a
  private file mapping shows its file again), which is what a zero entry
  means; in a fresh mapping they already are.

Between layers the placeholder stays stopped and traced by this thread.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from . import faults
from . import restorer as R
from .batch import BatchError
from .errors import CheckpointError, InjectionError, Interrupted, RestoreError
from .freezer import freeze_process
from .images import format as F
from .inject import Injector
from .objects import mm as mm_obj
from .objects.fds import tcpsk
from .objects import process as proc_obj
from .objects import session as session_obj
from .pagewrite import PageWriter

log = logging.getLogger("checkpoint.stager")
PAGE = R.PAGE
MADV_DONTNEED = 4
_KEY_FLAGS = 0x01 | 0x20 | 0x0100   # MAP_SHARED, MAP_ANONYMOUS, MAP_GROWSDOWN


def vma_identity(v) -> tuple:
    """What must stay the same for a mapping to keep its pages between layers."""
    return (v.start, v.end, v.path, v.inode, v.offset, v.flags & _KEY_FLAGS, v.status)


def tracker_identity(v) -> tuple:
    """What the dump's trackers compare (tracking/base.py vma_key): a VMA that
    keeps it is not reported whole, so its pages must be carried over."""
    return (v.start, v.end, v.inode, v.offset, bool(v.flags & 0x01))


def layer_records(layer) -> dict:
    """The records of one layer as the restorer wants them."""
    rec: dict = {"core": []}
    for kind, msg in layer.decoded_records():
        if kind == "core":
            rec["core"].append(msg)
        elif kind in ("pstree", "mm", "files", "signals", "process"):
            rec[kind] = msg
    return rec


class Stager:
    def __init__(self, images_dir: str, *, pid_ns: bool = True,
                 inherit: dict[str, int] | None = None, restart_block: str = "eintr"):
        self.dir = images_dir
        self.pid_ns = pid_ns
        self.inherit = dict(inherit or {})
        self.restart_block = restart_block
        self.spawned: R._Spawned | None = None
        self.proc = None
        self.builder: R._Builder | None = None
        self.mapped: dict[tuple, object] = {}
        self.pid: int | None = None        # the copy, as this engine sees it
        self.waiter: int | None = None
        self.pages = 0
        self.restore_ms = 0.0              # the final layer's share: apply + finish
        self.running = False
        self.restored: R.Restored | None = None
        self.repairs: tcpsk.Repairs | None = None

    # -- the steps --------------------------------------------------------------
    def apply(self, layer) -> None:
        """A pre-dump layer: bring the staged memory to it."""
        rec = layer_records(layer)
        if "pstree" not in rec or "mm" not in rec:
            raise RestoreError(f"layer {layer.index} lacks its pstree or mm record")
        try:
            if self.proc is None:
                self._start(rec)
            with Injector(self.proc, self.proc.pid, safe=False) as r:
                self._memory(r, rec, layer)
        except (OSError, InjectionError, CheckpointError) as exc:
            raise self._failed(exc) from None

    def finish(self, layer) -> None:
        """The final layer: its pages, then the rest of the state; the copy runs."""
        faults.point("stager.finish")
        t0 = time.perf_counter()
        rec = layer_records(layer)
        missing = {"pstree", "mm", "files", "signals", "process"} - set(rec)
        if missing or not rec["core"]:
            raise RestoreError(f"the final layer lacks records: {sorted(missing) or ['core']}")
        try:
            R.check_images(rec["process"], rec["mm"])
            proc_obj.validate(rec["process"], rec["core"], proc_obj.caller_creds())
            if self.proc is None:
                self._start(rec)
            b = self.builder
            b.rec = rec
            # the connections' address moves here once the copy runs; the
            # source's lock is the source's to release
            b.tcp = self.repairs = tcpsk.Repairs(transparent=True, release_locks=False)
            R._trace_options(self.proc, any(c.seccomp_mode for c in rec["core"]))
            with Injector(self.proc, self.proc.pid, safe=False) as r:
                self._memory(r, rec, layer)
                b.finish(r)
            b.check_applied()
            self.repairs.resume()
            self.spawned.release_keeper()
            self.proc.thaw()
            self.running = True
        except (OSError, InjectionError, CheckpointError) as exc:
            raise self._failed(exc) from None
        self.restore_ms = (time.perf_counter() - t0) * 1e3
        log.info("staged copy of PID %d runs as %d (final layer in %.1f ms)",
                 rec["pstree"].pid, self.pid, self.restore_ms)

    def release(self) -> "R.Restored":
        """Keep the copy: it is reaped in the background when it exits."""
        if self.restored is None:
            self.restored = R.Restored(pid=self.pid, restore_ms=self.restore_ms,
                                       pages_restored=self.pages, layers=0, detached=True,
                                       pid_ns=self.pid_ns, waiter=self.waiter)
            self.restored._start_reaper()
            self.spawned = None
        return self.restored

    def abort(self) -> None:
        """Kill whatever was staged (also a copy that already runs)."""
        if self.repairs is not None:
            self.repairs.abort()
            self.repairs = None
        if self.proc is not None and self.proc.threads:
            try:
                self.proc.kill()
            except CheckpointError:
                pass
        if self.spawned is not None:
            self.spawned.kill()
            self.spawned = None
        self.proc = None

    def close(self) -> None:
        if self.restored is None:
            self.abort()

    # -- internals --------------------------------------------------------------
    def _failed(self, exc: BaseException) -> Exception:
        self.abort()
        if isinstance(exc, (RestoreError, Interrupted)):
            return exc
        what = self.builder._step if self.builder is not None and \
            hasattr(self.builder, "_step") else "start"
        return RestoreError(f"staging {what} failed: {exc}")

    def _start(self, rec: dict) -> None:
        if "process" not in rec:
            raise RestoreError("the first layer has no process record (dumped by an older "
                               "engine): it cannot be staged")
        R.check_images(rec["process"], rec["mm"])
        proc_obj.validate(rec["process"], [], proc_obj.caller_creds())
        pass_fds = tuple(sorted(set(self.inherit.values())))
        self.spawned = R._Spawned()
        tree = rec["pstree"]
        session = session_obj.plan(tree.pid, tree.sid, tree.pgid, pid_ns=self.pid_ns,
                                   tty_nr=rec["process"].tty_nr)
        pid, waiter = R._spawn_placeholder(tree.pid, pass_fds, self.pid_ns, self.spawned,
                                           session)
        self.pid, self.waiter = pid, waiter
        self.proc = freeze_process(pid)
        R._trace_options(self.proc, False)
        self.builder = R._Builder(None, rec, self.proc, self.inherit, self.restart_block)
        self.builder.session = session
        with Injector(self.proc, pid, safe=False) as r:
            self.builder.begin(r)
        self.mapped = {}

    def _memory(self, r: Injector, rec: dict, layer) -> None:
        b = self.builder
        b.rec = {**b.rec, **{k: v for k, v in rec.items() if k in ("mm", "pstree")}}
        new = [v for v in rec["mm"].vmas if v.path not in mm_obj.SPECIAL]
        want = {vma_identity(v): v for v in new}
        b._what = "address space"
        # a mapping that must be made again (its flags or status changed) but
        # that the trackers saw as the same: its pages come along
        old_t = {tracker_identity(v) for k, v in self.mapped.items() if k not in want}
        carry = {}
        for k, v in want.items():
            if k not in self.mapped and tracker_identity(v) in old_t:
                carry[k] = self.proc.mem.read(v.start, v.end - v.start)
        r.batch([("munmap", v.start, v.end - v.start) for k, v in self.mapped.items()
                 if k not in want])
        kept = {k: v for k, v in self.mapped.items() if k in want}
        # the scratch page: free in what stays mapped and in what comes
        r.map_scratch(R._free_page([*kept.values(), *rec["mm"].vmas]))
        fresh = [v for k, v in want.items() if k not in kept]
        with b.privs.as_dumped():
            b._map_vmas(r, fresh)
        for k, data in carry.items():
            self.proc.mem.write(want[k].start, data)
        reprotect = [v for k, v in want.items() if k in kept and kept[k].prot != v.prot]
        try:
            r.batch([("mprotect", v.start, v.end - v.start, v.prot) for v in reprotect])
        except BatchError as e:
            b._what = f"VMA {reprotect[e.index].start:#x}-{reprotect[e.index].end:#x} protection"
            raise
        self.mapped = want
        b._what = "memory pages"
        self._pages(r, rec["pstree"].pid, new,
                    {vma_identity(v) for v in fresh if vma_identity(v) not in carry}, layer)

    def _pages(self, r: Injector, pid: int, vmas, fresh: set, layer) -> None:
        spans = sorted((v.start, v.end, vma_identity(v) in fresh) for v in vmas
                       if not v.status & mm_obj.VMA_CONTENT_IN_FILE)
        runs = layer.runs.get(pid)
        if not runs:
            return
        fd = self.proc.mem.fd
        starts, ends, fnos, offs = runs
        frames = _FramePrefetch(layer, [fno for fno in fnos if fno >= 0])
        batch = PageWriter(self.proc.pid, fd)
        try:
            i = 0
            for a, e, fno, off in zip(starts, ends, fnos, offs):
                while i < len(spans) and spans[i][1] <= a:
                    i += 1
                frame = frames.get(fno) if fno >= 0 else None
                j = i
                while j < len(spans) and spans[j][0] < e:
                    s0, e0 = max(a, spans[j][0]), min(e, spans[j][1])
                    if s0 < e0:
                        if frame is not None:
                            batch.add(frame, off + s0 - a, s0, e0 - s0)
                            self.pages += (e0 - s0) // PAGE
                        elif not spans[j][2]:  # zero pages in a kept mapping: drop them
                            batch.flush()      # (in order: a later run may rewrite them)
                            self._zero(r, fd, s0, e0)
                    j += 1
            batch.flush()
        finally:
            batch.release()
            frames.close()

    def _zero(self, r: Injector, fd: int, s0: int, e0: int) -> None:
        res = r.syscall("madvise", s0, e0 - s0, MADV_DONTNEED)
        if res == -errno.EINVAL:   # e.g. mlocked: write the zeros instead
            zero = bytes(min(e0 - s0, 1 << 20))
            for o in range(s0, e0, len(zero)):
                os.pwrite(fd, zero[:min(len(zero), e0 - o)], o)
        elif res < 0:
            raise RestoreError(f"madvise(DONTNEED) at {s0:#x}: {os.strerror(-res)}")


class _FramePrefetch:
    """Frames of one layer decompressed ahead, in the order they are needed,
    on every core (zstd releases the GIL), while the caller writes pages."""

    def __init__(self, layer, order: list[int], window: int | None = None):
        from concurrent.futures import ThreadPoolExecutor
        self.layer = layer
        self.order = list(dict.fromkeys(order))
        self.next = 0
        self.pending: dict[int, object] = {}
        self.current: tuple[int, memoryview] | None = None
        n = os.cpu_count() or 1
        self.window = window or 2 * n
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="stage-zstd") \
            if n > 1 and len(self.order) > 1 else None

    def _fill(self) -> None:
        while self.pool is not None and self.next < len(self.order) and \
                len(self.pending) < self.window:
            fno = self.order[self.next]
            self.next += 1
            self.pending[fno] = self.pool.submit(self.layer.read_frame, fno)

    def get(self, fno: int) -> memoryview:
        if self.current is not None and self.current[0] == fno:
            return self.current[1]
        if self.pool is None:
            data = self.layer.read_frame(fno)
        else:
            self._fill()
            fut = self.pending.pop(fno, None)
            if fut is None:
                data = self.layer.read_frame(fno)
            else:
                data = fut.result()
            self._fill()
        self.current = (fno, memoryview(data))
        return self.current[1]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
