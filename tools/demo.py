"""The README's main job: checkpoint a real running program, kill it, restore
it, and show it continuing where it stopped, with figures.

1. `checkpoint check`: what this kernel offers.
2. A real program: CPython with a 64 MiB heap whose digest it keeps, a worker
   thread, an open file; it prints a counter and checks itself every tick.
3. Three `checkpoint pre-dump` rounds while it runs (the first full, then
   only the pages it wrote), then `checkpoint dump`, which kills it.
4. `checkpoint restore -d`: the same PID comes back and the counter goes on
   from where it stopped, its self-checks intact.
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
    try:
        print(f"\n== a real program (PID {prog.pid}): CPython, 64 MiB heap, a thread, a file")
        for _ in range(3):
            print("  ", lines.get())
        rows = []
        for i in range(3):
            st = cli("pre-dump", "-t", str(prog.pid), "-D", images)
            rows.append(("pre-dump", st))
            print(f"   {lines.get()}")
        st = cli("dump", "-t", str(prog.pid), "-D", images)
        rows.append(("dump", st))
        prog.wait(10)
        last = None
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
        for _ in range(4):
            line = lines.get()
            ok &= "self-check ok" in line and f"pid {prog.pid}" in line
            print("  ", line)
        first = int(last.split()[1]) if last else -1
        print(f"\n   same PID: {restored_pid == prog.pid}; counter went on from {first};"
              f" self-checks: {'intact' if ok else 'FAILED'}")
        return 0 if ok and restored_pid == prog.pid else 1
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


if __name__ == "__main__":
    sys.exit(main())
