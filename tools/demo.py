"""The README's main job: checkpoint a real running program, kill it, restore
it, and show it continuing where it stopped; then live-migrate it to another
"host" with a downtime of milliseconds. With figures.

1. `checkpoint check`: what this kernel offers.
2. A real program: CPython with a 64 MiB heap whose digest it keeps, a worker
   thread, an open file; it prints a counter and checks itself every tick.
3. Three `checkpoint pre-dump` rounds while it runs (the first full, then
   only the pages it wrote), then `checkpoint dump`, which kills it.
4. `checkpoint restore -d`: the same PID comes back and the counter goes on
   from where it stopped, its self-checks intact.
5. Two network namespaces joined by a veth pair stand for two hosts; the
   restored program is migrated from one to the other (`checkpoint migrate`
   to `checkpoint page-server --restore --pid-ns`, a pre-shared key): rounds,
   downtime, and the counter going on over there.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [os.path.join(os.path.dirname(sys.executable), "checkpoint")]

WORKLOAD = textwrap.dedent("""
    import hashlib, os, sys, threading, time
    heap = bytearray(os.urandom(1 << 20)) * 64            # 64 MiB of live data
    digest = hashlib.sha256(heap).hexdigest()
    log = open(sys.argv[1], "a+b")
    worker_ticks = [0]
    def worker():
        while True:
            time.sleep(0.01); worker_ticks[0] += 1
            heap[(worker_ticks[0] * 4096) % len(heap)] ^= 0   # touch, keep content
    threading.Thread(target=worker, daemon=True).start()
    n = 0
    while True:
        ok = hashlib.sha256(heap).hexdigest() == digest and log.tell() == 4 * n
        log.write(b"tick"); log.flush()
        print(f"tick {n} pid {os.getpid()} worker {worker_ticks[0]} "
              f"{'self-check ok' if ok else 'SELF-CHECK FAILED'}", flush=True)
        n += 1
        time.sleep(0.2)
""")


def cli(*args: str, **kw) -> dict:
    res = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, **kw)
    if res.returncode:
        sys.exit(f"demo: {' '.join(args[:1])} failed: {res.stderr.strip()}")
    return json.loads(res.stdout)


class Lines:
    def __init__(self, fd: int):
        self.fd, self.buf = fd, b""

    def get(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            r, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                sys.exit("demo: the program stopped printing")
            self.buf += os.read(self.fd, 4096)
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def main() -> int:
    print("== checkpoint check")
    subprocess.run([*CLI, "check"], check=True)
    work = tempfile.mkdtemp(prefix="checkpoint-demo-")
    images = os.path.join(work, "images")
    out_r, out_w = os.pipe()  # the demo keeps both ends: the restored program gets it back
    prog = subprocess.Popen([sys.executable, "-c", WORKLOAD, os.path.join(work, "log")],
                            stdin=subprocess.DEVNULL, stdout=out_w, stderr=subprocess.DEVNULL)
    lines = Lines(out_r)
    restored_pid = None
    last = None
    try:
        print(f"\n== a real program (PID {prog.pid}): CPython, 64 MiB heap, a thread, a file")
        for _ in range(3):
            last = lines.get()
            print("  ", last)
        rows = []
        for i in range(3):
            st = cli("pre-dump", "-t", str(prog.pid), "-D", images)
            rows.append(("pre-dump", st))
            last = lines.get()
            print(f"   {last}")
        st = cli("dump", "-t", str(prog.pid), "-D", images)
        rows.append(("dump", st))
        prog.wait(10)
        while True:  # what it printed before the dump froze it
            r, _, _ = select.select([out_r], [], [], 0.05)
            if not r and b"\n" not in lines.buf:
                break
            last = lines.get()
        print(f"\n== checkpoints (tracker {rows[0][1]['tracker']}); the dump killed it"
              f" (exit {prog.returncode})")
        print(f"   {'round':<10}{'frozen ms':>10}{'pages written':>15}{'in parent':>11}"
              f"{'raw MiB':>9}{'stored MiB':>12}")
        for kind, s in rows:
            print(f"   {kind:<10}{s['frozen_ms']:>10.1f}{s['pages_written']:>15}"
                  f"{s['pages_skipped_parent']:>11}{s['bytes_raw'] / 2**20:>9.1f}"
                  f"{s['bytes_stored'] / 2**20:>12.2f}")
        size = sum(os.path.getsize(os.path.join(images, f)) for f in os.listdir(images))
        print(f"   image: {len(rows)} layers, {size / 2**20:.1f} MiB on disk"
              f"; last line before the dump: {last!r}")

        key = os.readlink(f"/proc/self/fd/{out_w}")
        r = cli("restore", "-D", images, "-d", f"--inherit-fd=fd[{out_w}]:{key}",
                pass_fds=(out_w,))
        restored_pid = r["pid"]
        print(f"\n== restored: PID {r['pid']} in {r['restore_ms']:.1f} ms, "
              f"{r['pages_restored']} pages from {r['layers']} layers")
        ok = True
        first = None
        for _ in range(4):
            line = lines.get()
            first = first if first is not None else int(line.split()[1])
            ok &= "self-check ok" in line and f"pid {prog.pid}" in line
            print("  ", line)
        before = int(last.split()[1])
        ok &= first == before + 1
        print(f"\n   same PID: {restored_pid == prog.pid}; the counter went on from {before} "
              f"to {first}; self-checks: {'intact' if ok else 'FAILED'}")
        if not (ok and restored_pid == prog.pid):
            print("\nverdict: FAILED: the restored program did not go on as it was")
            return 1
        migrated = migrate_demo(work, restored_pid, lines, out_w)
        if migrated is None:
            print("\nverdict: checkpoint and restore OK; live migration skipped (see above)")
            return 0
        restored_pid = migrated
        print("\nverdict: OK: checkpointed, restored and live-migrated; the program never "
              "lost a tick or its self-checks")
        return 0
    finally:
        if prog.poll() is None:
            prog.kill()
            prog.wait()
        if restored_pid:
            try:
                os.kill(restored_pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)


def migrate_demo(work: str, pid: int, lines: Lines, out_w: int) -> int | None:
    """Live-migrate ``pid`` between two network namespaces; returns the new
    PID (None when namespaces cannot be made here)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import pytest
    from netns import two_hosts
    key = os.path.join(work, "key")
    with open(key, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(key, 0o600)
    print("\n== live migration: two network namespaces joined by a veth pair stand for two "
          "hosts")
    try:
        ctx = two_hosts("demo")
        src, dst = ctx.__enter__()
    except pytest.skip.Exception as exc:
        print(f"   skipped: {exc}")
        return None
    try:
        fd_key = os.readlink(f"/proc/self/fd/{out_w}")
        srv = subprocess.Popen(dst.wrap([*CLI, "page-server", "-D", os.path.join(work, "in"),
                                         "--address", dst.ip, "--port", "0", "--restore",
                                         "--pid-ns", "--once", "--json", "--auth-key", key,
                                         f"--inherit-fd=fd[{out_w}]:{fd_key}"]),
                               stdout=subprocess.PIPE, text=True, pass_fds=(out_w,))
        port = json.loads(srv.stdout.readline())["port"]
        print(f"   page server on {dst.ip}:{port} (namespace {dst.ns}); "
              f"source engine in {src.ns}")
        before = lines.get()
        m = subprocess.run(src.wrap([*CLI, "migrate", "-t", str(pid), "--to",
                                     f"{dst.ip}:{port}", "--auth-key", key, "--json"]),
                           capture_output=True, text=True)
        if m.returncode:
            srv.kill()
            sys.exit(f"demo: migrate failed: {m.stderr.strip()}")
        st = json.loads(m.stdout)
        res = json.loads(srv.stdout.readline())
        srv.wait(30)
        print(f"   {'round':<8}{'pages':>8}{'MiB sent':>10}{'ms':>8}{'frozen ms':>11}")
        for i, r in enumerate(st["per_round"], 1):
            kind = "final" if i == len(st["per_round"]) else f"pre {i}"
            print(f"   {kind:<8}{r['pages']:>8}{r['bytes'] / 2**20:>10.1f}{r['ms']:>8.0f}"
                  f"{r['frozen_ms']:>11.1f}")
        print(f"   downtime {st['downtime_ms']:.1f} ms (predicted "
              f"{st['predicted_downtime_ms']:.1f}); {st['bytes_sent'] / 2**20:.1f} MiB sent "
              f"in {st['total_ms'] / 1e3:.1f} s; the source is gone "
              f"({'yes' if not os.path.exists(f'/proc/{pid}/stat') or open(f'/proc/{pid}/stat').read().split(')')[1].split()[0] == 'Z' else 'NO'})")
        new = res["restored_pid"]
        print(f"   now PID {new} on the destination (PID {pid} inside its PID namespace):")
        ok = True
        last = int(before.split()[1])
        for _ in range(4):
            line = lines.get()
            n = int(line.split()[1])
            ok &= "self-check ok" in line and n >= last
            last = n
            print("  ", line)
        if not ok:
            sys.exit("demo: the migrated program does not go on as it was")
        return new
    finally:
        ctx.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
