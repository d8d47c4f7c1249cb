"""Live migration, the source side: iterative pre-copy to a page server that
builds the process as the layers arrive, then one short final freeze.

    st = migrate(pid, to="10.0.0.2:4000", key=key)   # -> MigrationStats
    st.downtime_ms, st.rounds, st.remote_pid

The policy (docs/migrate.md):
- pre-dump rounds while the process runs; each round's layer is streamed,
  checked, published and applied on the destination before the next round;
- after each round the downtime of stopping now is predicted, as QEMU does:
  the pages the final round would carry (the dirty rate of the latest
  rounds covering 300 ms times the time since the last scan) at the
  end-to-end rate the latest round of 1 MiB or more measured after the
  thaw, plus the fixed cost of a final round
  (the freeze, the metadata, the state the destination adds). Switch over
  when the prediction is within ``downtime_limit_ms``;
- guards: at most ``max_rounds`` pre-dumps; a round that carried 64 pages or
  fewer ends the pre-copy (P.Haul); two rounds in a row that neither improve
  on the round before's prediction by 10% nor carry a quarter fewer pages
  than it mean the process dirties memory faster than
  the link carries it: then stop-the-world, or with ``auto_converge``
  throttle it (it stays frozen for part of each round, more each time the
  predictions stall) until they improve;
- the final round freezes the process, streams the last layer, and waits,
  still frozen, for the destination's RUNNING; only then is the source
  killed. Any failure before that thaws the source, which runs on; the
  destination discards what it staged.

Downtime is measured on the source, from the final freeze to RUNNING's
arrival, less half a round trip (the message's way back).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field

from . import hooks
from .dumper import Checkpointer
from .errors import CheckpointError, TransportError, UsageError
from .progress import Progress
from .transport import host_facts, mismatch
from .transport.client import RemoteChain, connect
from .transport.wire import T

log = logging.getLogger("checkpoint.migrate")
SMALL_ROUND = 64          # pages: a round this small ends the pre-copy (P.Haul)
THROTTLE_STEPS = (0.3, 0.6, 0.9)


@dataclass
class RoundStats:
    pages: int
    bytes: int
    ms: float
    frozen_ms: float
    throttle: float = 0.0
    #: the downtime predicted after this pre-dump round (0: the final round)
    predicted_ms: float = 0.0


@dataclass
class MigrationStats:
    rounds: int = 0
    downtime_ms: float = 0.0
    predicted_downtime_ms: float = 0.0
    frozen_ms: float = 0.0
    total_ms: float = 0.0
    pages_sent: int = 0
    bytes_sent: int = 0
    bytes_raw: int = 0
    remote_pid: int | None = None
    remote_images: str = ""
    converged: bool = True
    reason: str = ""
    bandwidth_mbps: float = 0.0
    per_round: list = field(default_factory=list)

    def as_json(self) -> dict:
        d = asdict(self)
        d["per_round"] = [r if isinstance(r, dict) else asdict(r) for r in self.per_round]
        return d


def migrate(pid: int, to: str, *, downtime_limit_ms: float = 50.0, max_rounds: int = 8,
            bandwidth: float | None = None, key: bytes | None = None, tls=None,
            auto_converge: bool = False, track: str = "auto", threads: int = 0,
            compress_level: int = 1, progress: bool | None = None,
            timeout: float = 60.0, skip_children: bool = False, file_locks: bool = False,
            external_fds: bool = False, tcp: str | None = None,
            action_scripts: list[str] | None = None) -> MigrationStats:
    """Migrate process ``pid`` to the page server at ``to`` (HOST:PORT).
    ``skip_children``, ``file_locks``, ``external_fds``, ``tcp``: as for a
    dump (Checkpointer); an external fd needs its stand-in on the
    destination (page-server --inherit-fd). ``action_scripts`` run at
    network-unlock: the copy runs, the source is gone, and the source's
    lock on the TCP connections goes right after (hooks.py): where the
    connections' address moves to the destination."""
    if downtime_limit_ms <= 0 or max_rounds < 0:
        raise UsageError("the downtime limit must be positive and max_rounds >= 0")
    t_start = time.perf_counter()
    stats = MigrationStats()
    facts = host_facts()
    conn, dest = connect(to, key=key, tls=tls, timeout=timeout,
                         facts={**facts, "pid": pid})
    bar = Progress("migrate", enabled=progress)
    try:
        why = mismatch(facts, dest)
        if why:
            raise TransportError(f"cannot migrate to {to}: {why}")
        stats.remote_images = str(dest.get("images", ""))
        restoring = bool(dest.get("restore"))
        rtt = _rtt(conn)
        chain = RemoteChain(conn, bandwidth=bandwidth)
        with Checkpointer(pid, None, store=chain, track=track, threads=threads, tree=False,
                          compress_level=compress_level, progress=False,
                          count_skipped=False, skip_children=skip_children,
                          file_locks=file_locks, external_fds=external_fds,
                          pages_first=True, tcp=tcp) as ck:
            predicted = _precopy(ck, chain, stats, downtime_limit_ms, max_rounds,
                                 auto_converge, bar)
            stats.predicted_downtime_ms = predicted
            answer: dict = {}
            marks: dict = {}

            def commit() -> None:     # the source is frozen; its layer is on the way
                marks["sent"] = time.perf_counter()
                marks["warm"].set()       # the frozen reads are done
                answer.update(chain.wait_final(restoring))
                marks["got"] = time.perf_counter()

            # the destination first applies every pre-copy layer: the final
            # round then has the CPUs of both ends to itself (on a shared
            # machine a backlog of applying competes with the downtime)
            chain.wait_applied(chain.index - 1)
            with _locks_warm() as warm:
                marks["warm"] = warm
                st = ck.dump(commit=commit)
            if ck.net.locks:
                try:
                    hooks.run(action_scripts, "network-unlock", pid=answer.get("pid"),
                              images_dir=stats.remote_images, fatal=False)
                finally:
                    ck.net.release()
        stats.rounds += 1
        stats.per_round.append(RoundStats(st.pages_written, st.bytes_stored,
                                          st.frozen_ms, st.frozen_ms))
        stats.pages_sent += st.pages_written
        stats.bytes_raw += st.bytes_raw
        stats.frozen_ms = st.frozen_ms
        stats.downtime_ms = st.frozen_ms + (marks["got"] - marks["sent"]) * 1e3 - rtt / 2
        stats.remote_pid = answer.get("pid")
        try:    # the source is gone: the destination keeps its copy
            conn.send(T.DONE, {})
            conn.recv(T.BYE)
        except TransportError as exc:
            log.info("after the switch-over: %s", exc)
        stats.bytes_sent = conn.bytes_sent
    except BaseException:
        try:
            conn.send(T.ERROR, {"error": "the source stopped the migration"})
        except CheckpointError:
            pass
        raise
    finally:
        bar.close()
        conn.close()
    stats.total_ms = (time.perf_counter() - t_start) * 1e3
    log.info("migrated %d in %d rounds: downtime %.1f ms (predicted %.1f), %d bytes",
             pid, stats.rounds, stats.downtime_ms, stats.predicted_downtime_ms,
             stats.bytes_sent)
    return stats


@contextlib.contextmanager
def _locks_warm(period: float = 0.005, limit: float = 2.0):
    """Keep reading /proc/locks while the final round runs. The dump reads it
    inside the freeze (the POSIX locks of the process that no fd shows), and
    the kernel takes a per-CPU rw-semaphore for writing to list the locks:
    that waits for an RCU grace period (~10 ms here) unless another writer
    took it within the last ~20-40 ms. A reader that starts as the freeze
    does pays that wait in parallel with the freeze's first work and keeps
    the semaphore warm, so the read inside the freeze takes microseconds.
    What the dump reads is unchanged: it still reads /proc/locks, frozen."""
    stop = threading.Event()

    def warm() -> None:
        t_end = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < t_end:
            try:
                with open("/proc/locks", "rb") as f:
                    f.read()
            except OSError:
                return        # no /proc/locks (CONFIG_FILE_LOCKING off)
            stop.wait(period)

    t = threading.Thread(target=warm, daemon=True, name="locks-warm")
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join()


def _rtt(conn) -> float:
    t = time.perf_counter()
    conn.send(T.PING, {"t": t})
    conn.recv(T.PONG)
    return (time.perf_counter() - t) * 1e3


def _precopy(ck: Checkpointer, chain: RemoteChain, stats: MigrationStats, limit: float,
             max_rounds: int, auto_converge: bool, bar: Progress) -> float:
    """The pre-dump rounds; returns the predicted downtime of stopping now."""
    rate = 0.0                # end-to-end bytes/ms once thawed: read, compress, send, ack
    prev_scan = None          # when the previous round took its dirty set
    last = float("inf")       # the previous round's prediction
    window: list = []         # (previous scan, pages) of the rounds the dirty rate spans
    per_page = 0.0            # bytes a page stored
    strikes = 0               # rounds in a row that did not improve on it
    throttle = 0
    prev_pages = None
    predicted = float("inf")
    while stats.rounds < max_rounds:
        if chain.index == 1:
            # the first layer holds every page, and applying it on the
            # destination takes a few seconds a GiB (its memory is new there):
            # a round scanned meanwhile carries pages that the round after
            # carries again (that one waits for the apply anyway: one layer
            # in flight at most). Scanning once after the apply sends each
            # page rewritten meanwhile once, and the apply has the CPUs
            chain.wait_applied(0)
        t0 = time.perf_counter()
        hold = THROTTLE_STEPS[throttle - 1] if throttle else 0.0
        st = ck.pre_dump(hold=hold) if hold else ck.pre_dump()
        now = time.perf_counter()
        ms = (now - t0) * 1e3
        stats.rounds += 1
        stats.pages_sent += st.pages_written
        stats.bytes_raw += st.bytes_raw
        stats.per_round.append(RoundStats(st.pages_written, st.bytes_stored, ms, st.frozen_ms,
                                          hold))
        moving = max((now - (st.thawed_at or st.frozen_at)) * 1e3, 1e-3)
        # the end-to-end rate and bytes a page of the latest round big enough
        # to measure them (a round of a few pages is all fixed costs)
        if st.bytes_stored and st.pages_written and \
                (st.bytes_stored >= RATE_MIN_BYTES or not rate):
            rate = st.bytes_stored / moving
            per_page = st.bytes_stored / st.pages_written
            stats.bandwidth_mbps = rate * 1e3 * 8 / 1e6
        # the final round carries what is dirtied from this round's scan to
        # the final freeze: the dirty rate (pages a ms) of the latest rounds
        # that cover at least RATE_WINDOW_MS (a program that writes in bursts
        # shows a short round without one: the last interval alone said
        # "nothing" and the final round then carried a burst) times the time
        # since this scan; never more than those rounds carried together
        dirty_rate = None
        if hold:
            window.clear()       # a held round's rate is not the program's
        elif prev_scan is not None:
            window.append((prev_scan, st.pages_written))
            while len(window) > 1 and \
                    (st.frozen_at - window[1][0]) * 1e3 >= RATE_WINDOW_MS:
                window.pop(0)
            carried = sum(n for _, n in window)
            dirty_rate = carried / max((st.frozen_at - window[0][0]) * 1e3, 1e-3)
        prev_scan = st.frozen_at
        # plus the fixed cost of a final round: a round's freeze and metadata
        # (the latest: the first also registers every VMA), and what the
        # destination adds at the end (files, threads, credentials)
        fixed = st.frozen_ms + FINAL_EXTRA_MS

        def predict() -> float:
            since = (time.perf_counter() - st.frozen_at) * 1e3
            pages = st.pages_written if dirty_rate is None else \
                min(carried, dirty_rate * since)
            return fixed + (pages * per_page / rate if rate else 0.0)

        predicted = predict()
        if predicted <= 2 * limit:
            # close: the final freeze waits until the destination has applied
            # this layer (migrate()); that wait is part of what the final
            # round carries, so take it now and predict again
            chain.wait_applied(chain.index - 1)
            predicted = predict()
        stats.per_round[-1].predicted_ms = predicted
        bar.note(f"round {stats.rounds}: {st.pages_written} pages, {ms:.0f} ms, "
                 f"{stats.bandwidth_mbps:.0f} Mbit/s, predicted downtime {predicted:.1f} ms")
        log.info("round %d: %d pages in %.1f ms (frozen %.1f); predicted downtime %.1f ms",
                 stats.rounds, st.pages_written, ms, st.frozen_ms, predicted)
        if predicted <= limit:
            stats.reason = "predicted downtime within the limit"
            return predicted
        if st.pages_written <= SMALL_ROUND:
            stats.reason = f"a round of {st.pages_written} pages"
            return predicted
        # converging means the prediction keeps improving on the round
        # before; a round may be longer than the one before for a reason of
        # its own (it waited for the destination to apply a big layer, the
        # machine was busy), so one round without progress is forgiven, two
        # in a row are not (or, throttled, the rounds must also shrink by a
        # quarter each, else it tightens); --max-rounds bounds the rest
        # (a round a quarter smaller than the one before is progress too:
        # the dirty set still shrinks, as P.Haul asks, whatever one slow
        # round did to the prediction)
        improved = predicted < last * IMPROVE or \
            (prev_pages is not None and st.pages_written <= prev_pages * SHRINK)
        last = predicted
        strikes = 0 if improved else strikes + 1
        slow = throttle and prev_pages is not None and st.pages_written > prev_pages * SHRINK
        prev_pages = st.pages_written
        if strikes >= 2 or slow:
            strikes = 0
            if auto_converge and throttle < len(THROTTLE_STEPS):
                throttle += 1
                last = float("inf")
                log.info("not converging: throttling the process to %d%% frozen",
                         THROTTLE_STEPS[throttle - 1] * 100)
                continue
            if throttle and improved:
                continue     # at the tightest throttle, still improving: go on
            stats.converged = False
            stats.reason = ("the process dirties memory faster than the link carries it "
                            "(the predicted downtime stopped improving)" +
                            ("" if auto_converge else "; --auto-converge throttles it"))
            return predicted
    stats.converged = predicted <= limit
    stats.reason = stats.reason or f"{max_rounds} rounds (--max-rounds)"
    return predicted


IMPROVE = 0.9             # a round must improve the previous prediction by 10% to count
SHRINK = 0.75             # a round this much smaller than the one before is progress
RATE_WINDOW_MS = 300.0    # the dirty rate spans the latest rounds covering this much
RATE_MIN_BYTES = 1 << 20  # a round measures the end-to-end rate from this many bytes
# what a final round costs beyond a pre-dump's freeze and its pages, measured
# on this project's benchmarks: ~15 ms of the dump's own state on the source
# (files, threads, signals), ~15 ms for the destination's finish
FINAL_EXTRA_MS = 30.0
