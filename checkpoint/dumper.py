"""The dumper: turn a running process into a layer chain.

    with Checkpointer(pid, images_dir, track="auto") as ck:
        ck.pre_dump()                 # memory only; target keeps running
        ck.pre_dump()                 # incremental
        ck.dump(leave_running=False)  # complete state; target killed once published

A pre-dump round freezes the target, records the memory map, takes the
dirty set from the tracker (get-and-clear) and arms it for the next round,
then thaws; pages are read and compressed while the target runs (a page
written meanwhile is dirty again and comes in the next round). A dump round
does everything inside the freeze. Nothing is published unless complete (the
layer writer publishes by rename); on any error the target is thawed and the
previous layers stay as they were.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field

from .errors import CheckpointError, ImageError, NoSuchProcess, TargetExited, UsageError
from . import faults, hooks
from . import state as state_table
from .freezer import (FrozenProcess, FrozenTree, cgroup_frozen, check_freeze_cgroup,
                      freeze_process, freeze_tree)
from .interrupt import check as check_stop
from .interrupt import stoppable
from .images import LayerWriter, LocalSink, ParentRef, open_chain, open_layer_for_write
from .images.writer import fsync_dir, make_images_dir
from .images.format import KIND_DUMP, KIND_PREDUMP
from .images.pb import tracking_pb2
from .images.reader import list_layers
from .inject import Injector
from .kernel import procfs
from .kernel.procfs import PAGE_SIZE
from .objects import madvise
from .objects import mm as mm_obj
from .objects.files import dump_files
from .objects.fds import tcpsk
from .objects import process as proc_obj
from .objects import pstree as tree_obj
from .objects import signals as sig_obj
from .objects import threads as thr_obj
from .objects import timers as timer_obj
from .progress import Progress
from .tracking.base import (REGION_ZERO, Tracker, choose_tracker, content_scan_kw, trackable,
                            vma_key)
from .kernel.pagemap import PAGE_IS_PRESENT
from .kernel.syscalls import IOV_MAX, process_vm_readv_scatter
from .tracking import parked
from .tracking.scan import PagemapScanner, batch_pages

READ_CHUNK = 1 << 20
log = logging.getLogger("checkpoint.dump")


@dataclass
class DumpStats:
    """One round's figures (names follow CRIU's stats image)."""

    layer: int
    kind: str
    tracker: str
    full_reason: str
    freezing_ms: float
    frozen_ms: float
    memdump_ms: float
    memwrite_ms: float
    pages_scanned: int
    pages_written: int
    pages_skipped_parent: int
    pages_zero: int
    pages_vanished: int  # unmapped by the program before a pre-dump read them
    bytes_raw: int
    bytes_stored: int
    path: str
    layer_id: str = ""
    #: time.perf_counter() when the target was frozen for this round (its
    #: dirty set was taken just after): the migration's dirty-rate clock
    frozen_at: float = 0.0
    #: time.perf_counter() when it was thawed (0: a final round)
    thawed_at: float = 0.0
    #: the processes of the tree, the root first: pid, threads, vmas,
    #: pages (data pages of the round), full_reason
    processes: list = field(default_factory=list)
    zombies: list = field(default_factory=list)  # PIDs of the zombie children recorded

    def as_json(self) -> dict:
        """The fields, plus the names every verb uses for the layer (``index``,
        ``layer_id``) and CRIU's stats names and units (µs)."""
        d = asdict(self)
        del d["frozen_at"], d["thawed_at"]     # this process's clock: no use outside
        d["index"] = self.layer
        for name in ("freezing", "frozen", "memdump", "memwrite"):
            d[f"{name}_time"] = int(round(d[f"{name}_ms"] * 1000))
        return d


class Checkpointer:
    """Checkpoint rounds of one process into one images directory."""

    def __init__(self, pid: int, images_dir: str | os.PathLike | None, *, track: str = "auto",
                 compress_level: int = 1, threads: int = 0, max_pages: int = 0,
                 external_fds: bool = False, progress: bool | None = None,
                 freeze_timeout: float = 5.0, on_frozen=None, store=None,
                 count_skipped: bool = True, sign_key: bytes | None = None,
                 prev_images_dir: str | os.PathLike | None = None,
                 action_scripts: list[str] | None = None, file_locks: bool = False,
                 skip_children: bool = False, tree: bool = True, pages_first: bool = False,
                 freeze_cgroup: str | None = None, tcp: str | None = None):
        if not isinstance(pid, int) or pid <= 0:
            raise UsageError(f"invalid PID {pid!r}")
        for name, v, lo, hi in (("compress_level", compress_level, 1, 22),
                                ("threads", threads, 0, 1024),
                                ("max_pages", max_pages, 0, 1 << 40)):
            if not isinstance(v, int) or not lo <= v <= hi:
                raise UsageError(f"{name} must be an integer in [{lo}, {hi}], not {v!r}")
        self.pid = pid
        #: where layers go instead of images_dir: an object with
        #: ``open_writer(kind, tracker, level, threads)`` and ``published(stats,
        #: final)`` (live migration streams them to a page server)
        self.store = store
        #: count pages_skipped_parent (present pages left to the parent): a
        #: page-table walk of the whole target, ~11 ms a GiB, after a
        #: pre-dump's thaw and before a dump's freeze (live migration skips it)
        self.count_skipped = count_skipped
        #: sign every layer (images/signing.py); a signed chain needs the key
        self.sign_key = sign_key
        #: CRIU's --action-script: run at pre-dump and post-dump (hooks.py)
        self.action_scripts = list(action_scripts or [])
        if store is None and images_dir is None:
            raise UsageError("an images directory (or a layer store) is needed")
        self.images_dir = os.fspath(images_dir) if images_dir is not None else "<stream>"
        self.track = track
        self.level = compress_level
        self.threads = threads
        self.max_pages = max_pages
        self.external_fds = external_fds
        #: dump file locks and take them again at restore (CRIU's --file-locks)
        self.file_locks = file_locks
        #: TCP connections: "established" (CRIU's --tcp-established: locked
        #: and repaired), "close" (--tcp-close: restored closed), None: refused
        if tcp not in (None, "established", "close"):
            raise UsageError(f"tcp must be 'established', 'close' or None, not {tcp!r}")
        self.tcp = tcp
        #: the final round's TCP connections (tcpsk.Connections): the lock
        #: its dump left for the restore is ``net.lock``
        self.net: tcpsk.Connections | None = None
        #: dump a process that has children alone (they are not in the image)
        self.skip_children = skip_children
        #: dump the process with all its descendants (CRIU's -t); off: a
        #: process with children is refused unless skip_children
        self.tree = tree and not skip_children
        #: CRIU's --freeze-cgroup: a cgroup v2 holding the tree, frozen while
        #: ptrace seizes it (for trees that fork faster than it can follow)
        self.freeze_cgroup = check_freeze_cgroup(freeze_cgroup, pid) \
            if freeze_cgroup is not None else None
        #: a final dump reads the pages before the rest of the state, so they
        #: stream (live migration: to the page server) while the injected
        #: calls, smaps and the fds are read; the memory map the pages were
        #: collected with must be the one smaps then shows (one process)
        self.pages_first = pages_first
        self.progress = progress
        self.freeze_timeout = freeze_timeout
        #: called as on_frozen(frozen_process) inside every freeze, after the
        #: dirty set was taken (an orchestrator's hook, like CRIU's action scripts)
        self.on_frozen = on_frozen
        self.tracker: Tracker | None = None  # the root's
        #: the trackers of the tree's other processes, by PID, and the start
        #: time of the process each belongs to (a PID may be reused)
        self.trackers: dict[int, Tracker] = {}
        self._starts: dict[int, int] = {}
        #: tracker states of other processes in the chain: pid -> (state, start_time)
        self._saved: dict[int, tuple] = {}
        self._known: list[int] = []  # the other processes of the last round
        #: pid -> (start_time, flat ranges) shared copy-on-write with the
        #: parent at the last round
        self._cow_prev: dict[int, tuple] = {}
        self._last = None  # (path, (ino, size, mtime_ns), ParentRef) of the layer we wrote last
        self._vmflags: dict[tuple, frozenset] = {}  # VmFlags of the VMAs seen, by _flag_key
        self._mm_probed: set[int] = set()  # refuse_mm_wide ran for these in this engine
        self._created_dir = False
        if store is None:
            self._prepare_dir()
            if prev_images_dir is not None:
                self._link_previous(os.fspath(prev_images_dir))

    # -- chain and tracker ---------------------------------------------------

    def _prepare_dir(self) -> None:
        d = self.images_dir
        if os.path.exists(d) and not os.path.isdir(d):
            raise UsageError(f"images directory {d} is not a directory")
        if not os.path.isdir(d):
            make_images_dir(d)   # every directory it makes 0700, whatever the umask
            self._created_dir = True
        if not os.access(d, os.W_OK | os.X_OK):
            raise CheckpointError(f"images directory {d} is not writable")

    def _link_previous(self, prev: str) -> None:
        """Periodic checkpoints (CRIU's --prev-images-dir): this directory
        starts as the previous checkpoint's chain, its layer files
        hard-linked (copied when on another file system), so the next layer
        holds only what changed since, and each directory restores on its
        own: dropping or squashing the older one breaks nothing here."""
        if list_layers(self.images_dir):
            raise UsageError(f"--prev-images-dir: {self.images_dir} already holds layers; "
                             "give a new directory")
        with open_chain(prev, sign_key=self.sign_key) as chain:
            trees = [m for _, m in chain.records("pstree")]
            start = proc_obj.start_time(self.pid)
            if trees and (trees[0].pid != self.pid or trees[0].start_time != start):
                raise ImageError(f"holds the chain of another process (PID {trees[0].pid}); "
                                 "give the previous checkpoint of this process",
                                 path=prev)
            paths = [layer.path for layer in chain.layers]
        for path in paths:
            dst = os.path.join(self.images_dir, os.path.basename(path))
            try:
                os.link(path, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise CheckpointError(f"--prev-images-dir: cannot link {path} into "
                                          f"{self.images_dir}: {exc.strerror}") from None
                _copy_layer(path, dst)
        fsync_dir(self.images_dir)
        log.info("continuing the chain of %s (%d layers linked)", prev, len(paths))

    def _open_writer(self, kind: str, tracker: str) -> LayerWriter:
        """The writer of the next layer. When this Checkpointer wrote the top
        layer itself and it is untouched (same file, size, mtime, nothing
        newer), the chain needs no new validation: only a layer of ours
        follows it."""
        # auto: every core. A final dump's target waits frozen for it; a
        # pre-dump round that ends sooner leaves fewer pages dirty for the
        # next one (iterative pre-copy converges faster). --threads 1 spares
        # a busy target instead.
        threads = self.threads or (os.cpu_count() or 1)
        if self.store is not None:
            return self.store.open_writer(kind, tracker, self.level, threads)
        last = self._last
        if last is not None:
            path, ident, ref = last
            layers = list_layers(self.images_dir)
            try:
                st = os.stat(path)
                same = (st.st_ino, st.st_size, st.st_mtime_ns) == ident
            except OSError:
                same = False
            if same and layers and max(layers) == ref.index:
                sink = LocalSink(self.images_dir, ref.index + 1)
                try:
                    return LayerWriter(sink, index=ref.index + 1, kind=kind, parent=ref,
                                       tracker=tracker, level=self.level, threads=threads,
                                       sign_key=self.sign_key)
                except BaseException:
                    sink.abort()
                    raise
        self._last = None
        return open_layer_for_write(self.images_dir, kind=kind, tracker=tracker,
                                    level=self.level, threads=threads, sign_key=self.sign_key)

    def _remember(self, st) -> None:
        s = os.stat(st.path)
        self._last = (st.path, (s.st_ino, s.st_size, s.st_mtime_ns), st.parent_ref)

    def _load_chain_state(self) -> None:
        """Check the chain belongs to this very process; take its tracker state."""
        if self.store is not None:  # a stream: this Checkpointer's own rounds only
            if self.tracker is None or self.tracker.name != choose_tracker(self.track).name:
                self.tracker = choose_tracker(self.track)()
            self.tracker.max_pages = self.max_pages
            return
        if self._last is not None and self.tracker is not None and \
                self.tracker.name == choose_tracker(self.track).name:
            return  # our own previous round: checked then (_open_writer re-checks the file)
        target_start = proc_obj.start_time(self.pid)
        tracker_cls = choose_tracker(self.track)
        saved = None
        if list_layers(self.images_dir):
            # with a key, the tracker state below is trusted only once it verifies
            with open_chain(self.images_dir, sign_key=self.sign_key) as chain:
                top_dump = chain.top.kind == KIND_DUMP
                trees = [m for _, m in chain.records("pstree")]
                if trees and (trees[0].pid != self.pid or trees[0].start_time != target_start):
                    raise ImageError(f"holds the chain of another process (PID {trees[0].pid}, "
                                     f"started at tick {trees[0].start_time}); target "
                                     f"{self.pid} started at tick {target_start}: use a new images "
                                     "directory", path=self.images_dir)
                starts = {m.pid: m.start_time for m in trees}
                self._saved = {}
                for _, m in chain.records("tracker"):
                    if m.pid == self.pid:
                        saved = m
                    elif m.pid in starts:
                        self._saved[m.pid] = (m, starts[m.pid])
                self._cow_prev = {m.pid: (starts.get(m.pid), list(m.cow_parent))
                                  for _, m in chain.records("mm") if m.pid != self.pid}
                # a chain may go on after a dump that left the target running
                # (dump -R arms the tracker: periodic incremental checkpoints)
                if top_dump and not (saved is not None and saved.tracker == tracker_cls.name
                                     and tracker_cls.from_state(saved.state)._reason is None):
                    raise ImageError("the chain ends with a final dump after which tracking "
                                     "was not kept (a dump without -R, or another tracker); "
                                     "use a new images directory", path=chain.top.path)
        if self.tracker is not None and self.tracker.name == tracker_cls.name:
            self.tracker.max_pages = self.max_pages
            return  # same engine, next round: keep the live tracker
        if saved is not None and saved.tracker == tracker_cls.name:
            self.tracker = tracker_cls.from_state(saved.state)
        else:
            self.tracker = tracker_cls()
            if saved is not None:
                self.tracker.reset(f"tracker changed from {saved.tracker} to {tracker_cls.name}")
        self.tracker.max_pages = self.max_pages

    # -- rounds ---------------------------------------------------------------

    def pre_dump(self, hold: float = 0.0) -> DumpStats:
        """Memory only; the target keeps running; adds one layer.

        ``hold`` (0..1): keep the target frozen while that fraction of the
        round's pages is read, thawing it only for the rest (live migration's
        auto-converge: a process that dirties memory faster than the link
        carries it runs less during the rounds)."""
        if not 0.0 <= hold <= 1.0:
            raise UsageError(f"hold must be within [0, 1], not {hold!r}")
        return self._round(final=False, leave_running=True, hold=hold)

    def dump(self, leave_running: bool = False, commit=None) -> DumpStats:
        """The final layer with the complete state; kills the target once the
        layer is published unless ``leave_running``.

        ``commit()``, if given, is called once the layer is published, with
        the target still frozen (live migration: until the destination runs
        the restored copy). If it raises, the target is thawed and keeps
        running, and the exception propagates."""
        return self._round(final=True, leave_running=leave_running, commit=commit)

    def _round(self, *, final: bool, leave_running: bool, commit=None,
               hold: float = 0.0) -> DumpStats:
        # SIGINT/SIGTERM only set a flag meanwhile; check_stop() acts on it
        # where stopping is safe (checkpoint/interrupt.py)
        with stoppable():
            try:
                check_stop()
                return self._do_round(final=final, leave_running=leave_running,
                                      commit=commit, hold=hold)
            except BaseException:
                self._drop_empty_dir()
                raise

    def _drop_empty_dir(self) -> None:
        """A dump that failed before anything was written leaves no images
        directory behind (only the one it made, and only when empty)."""
        if self._created_dir and self.store is None:
            try:
                os.rmdir(self.images_dir)
                self._created_dir = False
            except OSError:
                pass

    def _do_round(self, *, final: bool, leave_running: bool, commit=None,
                  hold: float = 0.0) -> DumpStats:
        self._load_chain_state()
        root_tracker = self.tracker
        kind = KIND_DUMP if final else KIND_PREDUMP
        writer = self._open_writer(kind, root_tracker.name)
        if final:
            self.net = tcpsk.Connections(self.tcp)
        progress = Progress("dump" if final else "pre-dump", enabled=self.progress)
        tree: FrozenTree | None = None
        lost: dict[int, list[tuple[int, int]]] = {}  # ranges that vanished before they were read
        try:
            # smaps is costly (the kernel walks every page table for its
            # counters): a pre-dump learns the VmFlags of new VMAs here, outside
            # the freeze; a final dump reads them inside it (_metadata)
            hooks.run(self.action_scripts, "pre-dump", pid=self.pid, images_dir=self.images_dir)
            if not final:
                for pid in [self.pid, *self._known]:
                    try:  # outside the freeze, where it costs nothing frozen
                        self._learn_vmflags(pid, procfs.read_maps(pid))
                    except CheckpointError:
                        pass  # (not permitted, gone): the freeze says so, in its words
            proc_obj.zombie_leader(self.pid)
            t_frozen = time.perf_counter()
            tree = self._freeze()
            try:
                faults.point("round.frozen")
                procs = tree.procs
                self._known = [p.pid for p in procs[1:]]
                trackers = self._bind_trackers(tree)
                full_reasons = {p.pid: trackers[p.pid].full_reason(p.pid) or "" for p in procs}
                full_reason = full_reasons[self.pid]
                log.info("froze %d process(es), %d threads in %.2f ms; tracker %s%s",
                         len(procs), sum(len(p.tids) for p in procs), tree.freezing_ms,
                         root_tracker.name,
                         f" (full layer: {full_reason})" if full_reason else "")
                early = final and self.pages_first and not leave_running and len(procs) == 1
                if early:   # pages first: collected with the maps, exact but for VmFlags
                    maps = procfs.read_maps(self.pid)
                    root_tracker.whole_vmas.clear()
                    early_regions = _collect(root_tracker, self.pid, maps)
                    progress.total(early_regions.data_pages)
                    t_mem = time.perf_counter()
                    # read (and streamed) by a helper thread while this one, the
                    # tracer, reads smaps and the fds; it starts once the
                    # injected calls are done (ptrace round trips slow down
                    # threefold when they share the CPUs with the page reading
                    # and its compression: 3 ms alone, 16 ms alongside)
                    started: list = []

                    def start_pages() -> None:
                        reader = ThreadPoolExecutor(1, thread_name_prefix="dump-pages")
                        started.append(reader.submit(self._write_pages, writer, self.pid,
                                                     early_regions, progress))
                        reader.shutdown(wait=False)
                    try:
                        recs = {self.pid: self._metadata(procs[0], final,
                                                         after_inject=start_pages)}
                    except BaseException:
                        futures_wait(started)
                        raise
                    mem_ms = started[0].result()
                else:
                    recs = {p.pid: self._metadata(p, final) for p in procs}
                vmas_of = {pid: r.pop("_vmas") for pid, r in recs.items()}
                linked = tree_obj.link_tree(recs, tree, final=final, external=self.external_fds)
                check_stop()
                regions: dict[int, Regions] = {}
                if early:
                    if [_flag_key(self.pid, v) for v in vmas_of[self.pid]] != \
                            [_flag_key(self.pid, v) for v in maps]:
                        raise CheckpointError(f"the memory map of {self.pid} changed inside "
                                              "the freeze; nothing was published")
                    regions[self.pid] = early_regions
                else:
                    cow = self._cow_shared(tree, vmas_of, recs, full_reasons)
                    for p in procs:
                        tr = trackers[p.pid]
                        tr.whole_vmas.clear()
                        regions[p.pid] = _collect(tr, p.pid, vmas_of[p.pid],
                                                  skip=linked.get(p.pid, ()),
                                                  cow=cow.get(p.pid))
                faults.point("round.collected")
                # a dump that kills the target ends the chain: nothing to arm
                # for; -R keeps tracking, so the next checkpoint is incremental
                if not final or leave_running:
                    for p in procs:
                        trackers[p.pid].arm(p.pid, vmas_of[p.pid])
                    faults.point("round.armed")
                if self.on_frozen is not None:
                    self.on_frozen(procs[0])
                data_pages = sum(r.data_pages for r in regions.values())
                log.info("%d VMAs, %d pages to write",
                         sum(len(v) for v in vmas_of.values()), data_pages)
                thawed: dict = {}

                def thaw() -> None:
                    tree.thaw()
                    thawed["at"] = time.perf_counter()
                    thawed["ms"] = (thawed["at"] - t_frozen) * 1e3
                    log.info("thawed after %.2f ms; writing pages while it runs",
                             thawed["ms"])
                    faults.point("round.thawed")

                if not final and not hold:
                    thaw()
                if not early:
                    t_mem = time.perf_counter()
                    progress.total(data_pages)
                    mem_ms = 0.0
                    for p in procs:
                        held = None
                        if not final and hold and tree.threads:
                            held = (int(regions[p.pid].data_pages * hold), thaw) \
                                if p is procs[-1] else None
                        mem_ms += self._write_pages(
                            writer, p.pid, regions[p.pid], progress,
                            lost=None if final else lost.setdefault(p.pid, []), thaw=held,
                            no_pin=len(procs) > 1)
                if not final:
                    if tree.threads:
                        thaw()
                    frozen_ms = thawed["ms"]
                faults.point("round.written")
                vanished = 0
                for pid, ranges in lost.items():
                    if ranges:
                        trackers[pid].lost(ranges)
                        n = sum(e - s for s, e in ranges) // PAGE_SIZE
                        vanished += n
                        log.info("%d ranges (%d pages) of %d vanished before they were read;"
                                 " the next round takes their VMAs whole", len(ranges), n, pid)
                present = 0
                for p in procs:
                    tr = trackers[p.pid]
                    recs[p.pid]["tracker"] = tracking_pb2.TrackerStateEntry(
                        pid=p.pid, tracker=tr.name, state=tr.state_bytes(),
                        full_reason=full_reasons[p.pid])
                    if full_reasons[p.pid] or not self.count_skipped:
                        pass
                    elif final:  # the smaps counters read inside the freeze
                        present += sum(v.anon_kb for v in vmas_of[p.pid]) * 1024 // PAGE_SIZE
                    else:  # after the thaw: costs no frozen time
                        present += _count_present(p.pid, vmas_of[p.pid])
            except BaseException:
                if tree.threads:
                    tree.thaw()
                raise
            if final and log.isEnabledFor(logging.INFO):
                for pid, rec in recs.items():
                    for line in state_table.found(rec):
                        log.info("found %s%s", f"in {pid}: " if len(recs) > 1 else "", line)
            # the tree's order: the root, then parents before children; zombies last
            for pid, rec in recs.items():
                for kind_, msg in rec.items():
                    for m in (msg if isinstance(msg, list) else [msg]):
                        writer.add_record(kind_, m)
            for rec in tree_obj.zombie_records(tree):
                writer.add_record("pstree", rec)
            pages_scanned = sum(v.pages for vs in vmas_of.values() for v in vs if trackable(v))
            skipped = max(0, present - data_pages + vanished)
            write_ms = (time.perf_counter() - t_mem) * 1e3 - mem_ms
            if final:  # still frozen; the layer's record stops short of its own publication
                frozen_ms = (time.perf_counter() - t_frozen) * 1e3
            check_stop()
            if final:
                dying = [p.pid for p in procs if _dying(p.pid)]
                if dying:
                    # its state was taken frozen, but a final layer of a process
                    # that was killed meanwhile is not published as a checkpoint
                    raise TargetExited(f"process {dying[0]} was killed during the dump; "
                                       "nothing was published", dying[0])
            faults.point("round.publish")
            st = writer.close(freezing_ms=tree.freezing_ms, frozen_ms=frozen_ms,
                              memdump_ms=mem_ms, memwrite_ms=write_ms,
                              pages_scanned=pages_scanned, pages_skipped_parent=skipped)
            # the commit point: from here on the round completes, signals or not
            faults.point("round.published")
            write_ms = (time.perf_counter() - t_mem) * 1e3 - mem_ms
            if final:  # the whole window, publication (fsync, rename) included
                frozen_ms = (time.perf_counter() - t_frozen) * 1e3
        except OSError as exc:
            self._failed(writer, tree, exc)
            if exc.errno == errno.ENOSPC:
                raise CheckpointError(f"no space left on device writing the layer into "
                                      f"{self.images_dir}; nothing was published") from None
            if exc.errno in (errno.ESRCH, errno.ENOENT):
                raise TargetExited(f"process {self.pid} exited during the dump; "
                                   "nothing was published", self.pid) from None
            raise CheckpointError(f"dump of {self.pid} failed: {exc}; nothing was "
                                  "published") from None
        except BaseException as exc:
            self._failed(writer, tree, exc)
            raise
        finally:
            progress.close()
        log.info("published %s: %d pages, %d zero, %d bytes stored", st.path, st.pages,
                 st.pages_zero, st.bytes_stored)
        if self.action_scripts:   # a final dump's target is still frozen here
            try:
                hooks.run(self.action_scripts, "post-dump", pid=self.pid,
                          images_dir=self.images_dir)
            except BaseException:
                self._resume_net()
                if tree.threads:
                    tree.thaw()
                raise
        if self.store is not None or commit is not None:
            try:
                if self.store is not None:
                    self.store.published(st, final)
                if final and commit is not None:
                    commit()
            except BaseException as exc:
                self._resume_net()
                if tree.threads:
                    tree.thaw()
                for tr in [self.tracker, *self.trackers.values()]:
                    tr.reset(f"the previous round was not committed ({type(exc).__name__})")
                raise
        if final:
            if leave_running:
                self._resume_net()
                tree.thaw()
            else:
                tree.kill()
                log.info("killed %s", ", ".join(str(p.pid) for p in procs))
                self.net.close(self.images_dir)   # (in repair mode: no FIN, no RST)
        if self.store is None and (not final or leave_running):
            self._remember(st)
        return DumpStats(layer=st.index, kind=kind, tracker=root_tracker.name,
                         full_reason=full_reason, freezing_ms=tree.freezing_ms,
                         frozen_ms=frozen_ms, memdump_ms=mem_ms, memwrite_ms=write_ms,
                         pages_scanned=pages_scanned, pages_written=st.pages,
                         pages_skipped_parent=skipped,
                         pages_zero=st.pages_zero, pages_vanished=vanished,
                         bytes_raw=st.bytes_raw, bytes_stored=st.bytes_stored, path=st.path,
                         layer_id=st.layer_id, frozen_at=t_frozen,
                         thawed_at=thawed.get("at", 0.0),
                         processes=[{"pid": p.pid, "threads": len(p.tids),
                                     "vmas": len(vmas_of[p.pid]),
                                     "pages": regions[p.pid].data_pages,
                                     "full_reason": full_reasons[p.pid]} for p in procs],
                         zombies=[z.pid for z in tree.zombies])

    def _freeze(self) -> FrozenTree:
        """The target, and unless ``tree`` is off its descendants, frozen."""
        if self.freeze_cgroup is not None:
            t0 = time.perf_counter()
            with cgroup_frozen(self.freeze_cgroup, self.freeze_timeout):
                tree = self._freeze_ptrace()
            tree.freezing_ms = (time.perf_counter() - t0) * 1e3
            return tree
        return self._freeze_ptrace()

    def _freeze_ptrace(self) -> FrozenTree:
        if not self.tree:
            proc = freeze_process(self.pid, self.freeze_timeout)
            return FrozenTree(self.pid, [proc], [], proc.freezing_ms)
        return freeze_tree(self.pid, self.freeze_timeout)

    def _cow_shared(self, tree: FrozenTree, vmas_of: dict, recs: dict,
                    full_reasons: dict) -> dict[int, tuple[list[int], list]]:
        """For each child: the private memory it still shares copy-on-write
        with its parent (not stored for it: the restore forks it from the
        restored parent), and what it shared at the previous round but not
        now (its own copy must be stored now: the parent wrote the page, the
        child's tracker saw nothing)."""
        out = {}
        by_pid = tree.by_pid
        for p in tree.procs[1:]:
            ppid = recs[p.pid]["pstree"].ppid
            if ppid not in by_pid:
                continue
            now = tree_obj.cow_ranges(p.pid, ppid, vmas_of[p.pid], vmas_of[ppid])
            recs[p.pid]["mm"].cow_parent.extend(now)
            start = self._starts.get(p.pid)
            prev = self._cow_prev.get(p.pid)
            left = []
            if prev is not None and prev[0] == start and not full_reasons[p.pid]:
                left = _clip(tree_obj.left_ranges(prev[1], now), vmas_of[p.pid])
            self._cow_prev[p.pid] = (start, now)
            out[p.pid] = (now, left)
        for pid in [q for q in self._cow_prev if q not in by_pid]:
            del self._cow_prev[pid]
        return out

    def _bind_trackers(self, tree: FrozenTree) -> dict[int, Tracker]:
        """One tracker per process (its own address space). A process new to
        the chain, or whose PID now names another process, starts full."""
        cls = type(self.tracker)
        out: dict[int, Tracker] = {}
        for p in tree.procs:
            if p.pid == self.pid:
                out[p.pid] = self.tracker
                self.tracker.bind(p)
                continue
            tr = self.trackers.get(p.pid)
            start = proc_obj.start_time(p.pid)
            if tr is None or self._starts.get(p.pid) != start:
                if tr is not None and hasattr(tr, "close"):
                    tr.close()
                saved = self._saved.pop(p.pid, None)
                if saved is not None and saved[1] == start and saved[0].tracker == cls.name:
                    tr = cls.from_state(saved[0].state)
                else:
                    tr = cls()
                tr.max_pages = self.max_pages
                self.trackers[p.pid] = tr
                self._starts[p.pid] = start
            out[p.pid] = self.trackers[p.pid]
            out[p.pid].bind(p)
        for pid in [q for q in self.trackers if q not in out]:  # exited since
            tr = self.trackers.pop(pid)
            self._starts.pop(pid, None)
            if hasattr(tr, "close"):
                tr.close()
        return out

    def _failed(self, writer, tree: "FrozenTree | None", exc: BaseException) -> None:
        """A round that did not publish its layer: drop the layer, release the
        target, and make the next round full. The tracker may already have
        cleared the dirty bits for the layer that was lost; an incremental
        layer after it would miss those pages."""
        writer.abort()
        self._resume_net()
        if tree is not None and tree.threads:
            tree.thaw()
        for tr in [self.tracker, *self.trackers.values()]:
            if tr is None:
                continue
            tr.reset(f"the previous round failed before its layer was published "
                     f"({type(exc).__name__})")

    def _resume_net(self) -> None:
        """The final round's connections back to normal, their lock released
        (the process runs on)."""
        if self.net is not None:
            self.net.resume()

    # -- pieces ---------------------------------------------------------------

    def _metadata(self, proc: FrozenProcess, final: bool, after_inject=None) -> dict:
        """Records of this round, taken inside the freeze. Pre-dumps hold the
        tree, the memory map and the process record (a live migration's
        destination maps the files as that process's user before the final
        layer); a dump holds everything. ``after_inject()`` is called once
        the injected calls are done (pages_first starts reading the pages)."""
        pid = proc.pid
        out: dict = {}
        cores = []
        with Injector(proc, _leader(proc)) as remote:
            brk = mm_obj.read_brk(remote)
            thp_off = madvise.thp_disabled(remote)
            # the probe costs injected calls in the freeze: once per engine
            # (a migration learns it in its first round) and in the final dump
            if final or pid not in self._mm_probed:
                madvise.refuse_mm_wide(remote)
                self._mm_probed.add(pid)
            vdso = mm_obj.vdso_identity(pid, proc.maps(), proc.mem)
            out["process"] = proc_obj.dump_process(remote, vdso)
            if final:
                # the timers just before the pending signals: one firing in
                # between is in both (an extra signal), never in neither
                out["process"].itimers.extend(timer_obj.dump_itimers(remote))
                out["process"].posix_timers.extend(timer_obj.dump_posix_timers(
                    remote, sorted(set(proc.tids) | {pid})))
                out["signals"] = sig_obj.dump_signals(remote)
                cores.append(thr_obj.dump_thread(remote))
        if final:
            for tid in proc.tids:
                if tid != remote.tid:
                    with Injector(proc, tid) as r:
                        cores.append(thr_obj.dump_thread(r))
        if after_inject is not None:
            after_inject()
        # the maps are read after every injector has unmapped its scratch page
        # a final dump reads the VmFlags inside the freeze: madvise and mlock
        # change them on a whole VMA without changing what maps shows
        if final:
            vmas = procfs.read_smaps(pid)
        else:  # the flags the restore needs (growsdown, noreserve) for every VMA
            vmas = procfs.read_maps(pid)
            self._learn_vmflags(pid, vmas)
            vmas = [procfs.with_flags(v, self._vmflags[_flag_key(pid, v)]) for v in vmas]
        proc_obj.refuse_sysv_shm(vmas)
        # in pre-dumps too: a migration learns it before it copies anything
        if not self.tree:
            proc_obj.refuse_children(pid, proc.tids, self.skip_children)
        out["pstree"] = proc_obj.dump_pstree(pid, proc.tids)
        out["mm"] = mm_obj.dump_mm(pid, vmas, brk, thp_off)
        if final:
            out["core"] = cores
            # the engine's own fds parked there, by any chain or engine run
            out["files"] = dump_files(proc, external=self.external_fds,
                                      exclude_fds=parked.engine_fds(pid),
                                      file_locks=self.file_locks, tcp=self.net)
        out["_vmas"] = vmas
        return out

    def _learn_vmflags(self, pid: int, vmas: list[procfs.Vma]) -> None:
        """VmFlags never change for a mapping that stays the same, and smaps is
        costly: read it only when a VMA is new (before a pre-dump's freeze,
        so that inside it there is nothing left to learn, normally)."""
        if any(_flag_key(pid, v) not in self._vmflags for v in vmas):
            smaps = procfs.read_smaps(pid)
            for k in [k for k in self._vmflags if k[0] == pid]:
                del self._vmflags[k]
            self._vmflags.update({_flag_key(pid, w): w.vmflags for w in smaps})
            for v in vmas:  # gone meanwhile: none of the flags a restore needs
                self._vmflags.setdefault(_flag_key(pid, v), frozenset())

    def _write_pages(self, writer, pid: int, regions: "Regions", progress: "Progress",
                     lost: list[tuple[int, int]] | None = None, thaw=None,
                     no_pin: bool = False) -> float:
        """Read the data regions from the target straight into the writer's
        frame buffer, in address order, zero regions as zero. Scattered
        regions are read together: one process_vm_readv for up to IOV_MAX of
        them, falling back to /proc/PID/mem for what it cannot read (PROT_NONE
        pages). Returns ms spent reading.

        With ``lost`` (a pre-dump, reading after the thaw) a range the
        program unmapped meanwhile is not an error: it is left out of the
        layer and appended to ``lost`` (the tracker then takes its VMA whole
        next round). Inside a freeze nothing can vanish: any failure is one.
        ``thaw``: (pages, callback): thaw the target once that many pages
        were read (a held pre-dump). ``no_pin``: read through /proc/PID/mem
        only: process_vm_readv pins the pages it reads, and the kernel
        unshares (copies) a page still shared copy-on-write with another
        process when it is pinned, so a process tree left running would
        lose its sharing (measured: 8 MiB read, 8 MiB unshared), and even a
        final dump would copy every shared page inside the freeze (a 512
        MiB parent of 8 workers: 1.75 s of reads against 0.2 s)."""
        try:
            fd = procfs.open_proc_fd(pid, "mem")
        except NoSuchProcess:
            raise TargetExited(f"process {pid} exited during the dump", pid) from None
        read_s = 0.0
        done = 0
        runs: list[tuple[int, int]] = []  # (addr, npages) of the pending batch
        iov = array("Q")
        fill = 0
        space = writer.frame_space()

        hold_until = list(thaw) if thaw is not None else None

        def flush() -> None:
            nonlocal fill, read_s, space, done
            if not runs:
                return
            check_stop()
            faults.point("round.pages")
            t = time.perf_counter()
            try:
                got = -1 if no_pin else process_vm_readv_scatter(pid, space[:fill], iov)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise TargetExited(f"process {pid} exited during the dump", pid) from None
                got = -1
            kept = runs
            if got != fill:  # some range not readable that way: the slow, sure path
                kept, o = [], 0
                for a, n in runs:
                    try:
                        ok = os.preadv(fd, [space[o:o + n * PAGE_SIZE]], a) == n * PAGE_SIZE
                    except OSError as exc:
                        if exc.errno == errno.ESRCH:
                            raise TargetExited(f"process {pid} exited during the dump",
                                               pid) from None
                        if exc.errno not in (errno.EIO, errno.EFAULT, errno.ENOMEM):
                            raise
                        ok = False
                    if ok:
                        kept.append((a, n))
                        o += n * PAGE_SIZE
                    elif lost is None:
                        raise TargetExited(f"process {pid}: memory at {a:#x} vanished during "
                                           "the dump", pid)
                    else:
                        lost.append((a, a + n * PAGE_SIZE))
                fill = o
            read_s += time.perf_counter() - t
            space.release()
            if kept:
                writer.commit_runs(pid, kept, fill)
            done += sum(n for _, n in runs)
            progress.advance(sum(n for _, n in runs))
            if hold_until and done >= hold_until[0]:
                hold_until.pop()()   # the callback, once
                hold_until.clear()
            runs.clear()
            del iov[:]
            fill = 0
            space = writer.frame_space()

        try:
            rows = regions.rows
            for i in range(0, len(rows), 3):
                s, e, f = rows[i], rows[i + 1], rows[i + 2]
                if f & REGION_ZERO:
                    flush()
                    writer.add_zero(pid, s, (e - s) // PAGE_SIZE)
                    continue
                while s < e:
                    n = min(e - s, len(space) - fill)
                    runs.append((s, n // PAGE_SIZE))
                    iov.extend((s, n))
                    fill += n
                    s += n
                    if fill == len(space) or len(runs) == IOV_MAX:
                        flush()
            flush()
        finally:
            space.release()
            os.close(fd)
        return read_s * 1e3

    def close(self) -> None:
        for tr in [self.tracker, *self.trackers.values()]:
            if tr is not None and hasattr(tr, "close"):
                tr.close()
        self.trackers.clear()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Regions:
    """The round's regions, address-ordered, in one flat array('Q') of
    (start, end, flags) triples; memory 24 bytes a region."""

    def __init__(self):
        self.rows = array("Q")
        self.data_pages = 0


def _collect(tracker: Tracker, pid: int, vmas: list[procfs.Vma], skip=(),
             cow=None) -> Regions:
    """Run the tracker and lay its regions out in address order, as flat
    (start, end, flags) triples: no Python object per region on the common
    path. VMAs reported whole get their pages without content marked zero
    (so older layers' pages at those addresses never come back); VMAs whose
    pages may live outside the process's page tables (shared anonymous
    memory, memfd, deleted files) are taken whole, as data, but those whose
    object another process of the tree holds first (``skip``, VMA starts):
    its layer carries the pages. ``cow``: (ranges shared copy-on-write with
    the parent: left out; ranges shared before and not now: taken)."""
    out = Regions()
    per_vma: dict[tuple, list[bytes]] = {}
    for batch in tracker.collect(pid, vmas):
        # batches are views over the scanner's reused vector: copy them out
        per_vma.setdefault(vma_key(batch.vma), []).append(batch.regions.tobytes())
    for v in vmas:
        if v.path in mm_obj.SPECIAL or mm_obj.content_in_file(v) or not trackable(v) \
                or v.start in skip:
            continue
        if mm_obj.taken_whole(v):
            out.rows.extend((v.start, v.end, 0))
            out.data_pages += v.pages
            continue
        key = vma_key(v)
        rows = array("Q")
        for chunk in per_vma.get(key, ()):
            rows.frombytes(chunk)
        starts = rows[0::3]
        if len(starts) > 1 and starts != array("Q", sorted(starts)):
            trip = sorted(zip(starts, rows[1::3], rows[2::3]))
            rows = array("Q", [x for t in trip for x in t])
        if key in tracker.whole_vmas:
            rows = array("Q", [x for t in _fill_gaps(v, _triples(rows)) for x in t])
        out.rows.extend(rows)
        zero = sum(e - s for s, e, f in _triples(rows) if f & REGION_ZERO) \
            if any(f & REGION_ZERO for f in rows[2::3]) else 0
        out.data_pages += (sum(rows[1::3]) - sum(rows[0::3]) - zero) // PAGE_SIZE
    if cow is not None:
        now, left = cow
        rows = tree_obj.subtract(out.rows, now)
        if left:
            rows = _add_ranges(rows, left)
        out.rows = rows
        out.data_pages = sum((e - s) // PAGE_SIZE for s, e, f in _triples(rows)
                             if not f & REGION_ZERO)
    return out


def _add_ranges(rows: array, ranges) -> array:
    """``rows`` plus the data ranges ``ranges`` where no row is."""
    extra = array("Q")
    for s, e in ranges:
        extra.extend((s, e, 0))
    cover = [x for s, e, _ in _triples(rows) for x in (s, e)]
    extra = tree_obj.subtract(extra, cover)
    merged = sorted([*_triples(rows), *_triples(extra)])
    return array("Q", [x for t in merged for x in t])


def _clip(ranges, vmas) -> list[tuple[int, int]]:
    """``ranges`` within the private VMAs whose pages the dump reads."""
    out = []
    spans = sorted((v.start, v.end) for v in vmas if not v.shared and trackable(v)
                   and v.path not in mm_obj.SPECIAL)
    for s, e in ranges:
        for vs, ve in spans:
            a, b = max(s, vs), min(e, ve)
            if a < b:
                out.append((a, b))
    return out


def _triples(rows: array):
    return zip(rows[0::3], rows[1::3], rows[2::3])


def _fill_gaps(v: procfs.Vma, rows: list) -> list:
    out, at = [], v.start
    for s, e, f in rows:
        if s > at:
            out.append((at, s, REGION_ZERO))
        out.append((s, e, f))
        at = e
    if at < v.end:
        out.append((at, v.end, REGION_ZERO))
    return out


def _dying(pid: int) -> bool:
    """The target exited or a SIGKILL is on its way (pending: kill() has
    returned, the frozen task has not run its exit yet)."""
    try:
        st = procfs.read_status(pid)
    except CheckpointError:
        return True
    return st.state in ("Z", "X") or bool((st.sig_pnd | st.shd_pnd) & 1 << (signal.SIGKILL - 1))


def _leader(proc: FrozenProcess) -> int:
    return proc.pid if proc.pid in proc.threads else proc.tids[0]


def _copy_layer(src: str, dst: str) -> None:
    """A layer copied under a temporary name, fsync'ed, then renamed (0600)."""
    tmp = f"{dst}.copy-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                os.write(fd, chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, dst)


def _flag_key(pid: int, v: procfs.Vma) -> tuple:
    return (pid, v.start, v.end, v.inode, v.offset, v.perms, v.path)


def _count_present(pid: int, vmas: list[procfs.Vma]) -> int:
    """Pages in RAM with content of their own (for pages_skipped_parent).
    Swapped entries are left out: uffd-wp pte markers on never-touched pages
    read as swapped too."""
    n = 0
    with PagemapScanner(pid) as scanner:
        for v in vmas:
            if trackable(v) and v.path not in mm_obj.SPECIAL and not mm_obj.content_in_file(v):
                kw = content_scan_kw(v)
                kw["category_anyof_mask"] = PAGE_IS_PRESENT
                for b in scanner.scan(v.start, v.end, **kw):
                    n += batch_pages(b)
    return n
