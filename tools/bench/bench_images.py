#!/usr/bin/env python3
"""Layer writer / chain reader versus plain zstandard on the same bytes.

    .venv/bin/python tools/bench/bench_images.py [--size 1G] [--level 1]
        [--threads 1,2] [--runs 3]

Builds SIZE bytes of realistic memory: pages of this process's own Python
heap (read through /proc/self/mem after building many objects), zero
regions and random regions, in regions of 64 KiB..8 MiB. Then, for each
thread count, medians over RUNS of:
  write: LayerWriter -> LocalSink (fsync, rename)   vs  ZstdCompressor(level,
         threads).compress(all) -> file (fsync)
  read:  open_chain + iter_runs over every page       vs  read file +
         ZstdDecompressor().decompress(all)
and prints throughput ratios (goal >= 0.9) and the size ratio (goal <= 1.01).

Fairness: both sides get the same bytes (the layer without add_zero), the
same level and thread count, both fsync their file before the clock stops,
and both start from a file that does not exist yet (the previous run's
output is removed before the clock starts). The wall-clock ratio is the
goal; the CPU seconds (whole process, all threads) and the individual runs
are printed too, so any use of extra cores (the writer's I/O thread; zstd
workers with threads > 1) is visible.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import zstandard  # noqa: E402

from checkpoint.images import open_chain  # noqa: E402
from checkpoint.images.writer import LayerWriter, LocalSink  # noqa: E402

PS = 4096


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("IB")
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def python_heap_image(limit: int) -> bytes:
    """Pages of this process's anonymous memory after building objects."""
    rnd = random.Random(1)
    words = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(3, 12)))
             for _ in range(5000)]
    objs = []
    approx = 0
    while approx < limit:
        d = {rnd.choice(words): rnd.randint(0, 1 << 40) for _ in range(8)}
        d["name"] = " ".join(rnd.choice(words) for _ in range(6))
        d["vals"] = [rnd.random() for _ in range(10)]
        d["t"] = (rnd.randint(0, 1000), rnd.choice(words), None)
        objs.append(d)
        approx += 1400
    out = bytearray()
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
        for line in maps:
            parts = line.split()
            if len(parts) < 5 or not parts[1].startswith("rw"):
                continue
            path = parts[5] if len(parts) > 5 else ""
            if path not in ("", "[heap]"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            a = start
            while a < end and len(out) < limit:
                n = min(end - a, 8 << 20, limit - len(out))
                try:
                    out += os.pread(fd, n, a)
                except OSError:
                    pass
                a += n
    finally:
        os.close(fd)
    del objs
    gc.collect()
    return bytes(out[: len(out) // PS * PS])


def build_memory(size: int) -> tuple[bytearray, list[tuple[int, int, str]]]:
    heap = python_heap_image(min(size * 6 // 10, 512 << 20))
    buf = bytearray(size)
    regions = []
    rnd = random.Random(2)
    off = 0
    hoff = 0
    while off < size:
        n = min(rnd.randint(16, 2048) * PS, size - off)
        r = rnd.random()
        kind = "heap" if r < 0.6 else "zero" if r < 0.85 else "random"
        if kind == "heap":
            if hoff + n > len(heap):
                hoff = 0
            take = min(n, len(heap) - hoff)
            buf[off:off + take] = heap[hoff:hoff + take]
            hoff += take
        elif kind == "random":
            buf[off:off + n] = rnd.randbytes(n)
        regions.append((off, n, kind))
        off += n
    return buf, regions


def bench_write(buf, regions, d, level, threads, use_zero):
    if os.path.exists(d):
        shutil.rmtree(d)
    mv = memoryview(buf)
    c = time.process_time()
    t = time.perf_counter()
    w = LayerWriter(LocalSink(d, 0), level=level, threads=threads)
    base = 0x7F0000000000
    for off, n, kind in regions:
        if use_zero and kind == "zero":
            w.add_zero(1, base + off, n // PS)
        else:
            w.add_pages(1, base + off, mv[off:off + n])
    st = w.close()
    return time.perf_counter() - t, st.file_bytes, time.process_time() - c


def bench_zstd_write(buf, path, level, threads):
    if os.path.exists(path):
        os.unlink(path)     # like bench_write's rmtree: not inside the timing
    c = time.process_time()
    t = time.perf_counter()
    data = zstandard.ZstdCompressor(level=level, threads=threads if threads > 1 else 0).compress(buf)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t, len(data), time.process_time() - c


def bench_read(d, threads):
    t = time.perf_counter()
    total = 0
    with open_chain(d, threads=threads) as chain:
        for pid in chain.pids():
            for run in chain.iter_runs(pid):
                total += len(run.data)
    return time.perf_counter() - t, total


def bench_zstd_read(path):
    t = time.perf_counter()
    with open(path, "rb") as f:
        blob = f.read()
    out = zstandard.ZstdDecompressor().decompress(blob)
    n = len(out)
    del out
    return time.perf_counter() - t, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="bytes of memory (1G, 256M, ...)")
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    size = parse_size(args.size) // PS * PS
    t = time.perf_counter()
    buf, regions = build_memory(size)
    kinds = {k: sum(n for _, n, kk in regions if kk == k) for k in ("heap", "zero", "random")}
    print(f"memory: {size / 2**20:.0f} MiB in {len(regions)} regions "
          + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in kinds.items())
          + f" (built in {time.perf_counter() - t:.1f} s)")
    scratch = tempfile.mkdtemp(prefix="bench-images-", dir=args.dir)
    try:
        for threads in (int(x) for x in args.threads.split(",")):
            res = {k: [] for k in ("w", "wz", "zw", "r", "zr")}
            for _ in range(args.runs):
                d = os.path.join(scratch, "img")
                res["wz"].append(bench_write(buf, regions, d + "z", args.level, threads, True))
                res["w"].append(bench_write(buf, regions, d, args.level, threads, False))
                res["zw"].append(bench_zstd_write(buf, os.path.join(scratch, "plain.zst"),
                                                  args.level, threads))
                res["r"].append(bench_read(d, threads))
                res["zr"].append(bench_zstd_read(os.path.join(scratch, "plain.zst")))
                assert res["r"][-1][1] == size and res["zr"][-1][1] == size
            med = {k: statistics.median(x[0] for x in v) for k, v in res.items()}
            cpu = {k: statistics.median(x[2] for x in res[k]) for k in ("w", "wz", "zw")}
            mbps = {k: size / v / 1e6 for k, v in med.items()}
            img, plain, imgz = res["w"][0][1], res["zw"][0][1], res["wz"][0][1]
            print(f"\nlevel {args.level}, threads {threads}, medians of {args.runs} runs:")
            print(f"  write  layer {mbps['w']:7.0f} MB/s   zstd {mbps['zw']:7.0f} MB/s   "
                  f"ratio {med['zw'] / med['w']:.3f}  (goal >= 0.9)")
            print(f"  write  layer with add_zero for zero regions {mbps['wz']:7.0f} MB/s   "
                  f"ratio {med['zw'] / med['wz']:.3f}")
            print(f"  write  runs (s): layer " + " ".join(f"{x[0]:.2f}" for x in res["w"])
                  + "   zstd " + " ".join(f"{x[0]:.2f}" for x in res["zw"])
                  + f"   per-run ratios " + " ".join(f"{z[0] / w[0]:.3f}"
                                                    for w, z in zip(res["w"], res["zw"])))
            print(f"  write  cpu s (median): layer {cpu['w']:.2f}   zstd {cpu['zw']:.2f}   "
                  f"layer with add_zero {cpu['wz']:.2f}")
            print(f"  size   layer {img:,} B   zstd {plain:,} B   ratio {img / plain:.4f}  "
                  f"(goal <= 1.01); with add_zero {imgz / plain:.4f}; "
                  f"compression x{size / img:.2f}")
            print(f"  read   layer {mbps['r']:7.0f} MB/s   zstd {mbps['zr']:7.0f} MB/s   "
                  f"ratio {med['zr'] / med['r']:.3f}  (goal >= 0.9)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
