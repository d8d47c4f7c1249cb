#!/usr/bin/env python3
"""Live migration against stop-the-world, in the same run.

A workload of N MiB rewriting P% of its pages every 100 ms runs in one
network namespace ("source host"); `checkpoint page-server --restore
--pid-ns` runs in another ("destination host"), joined by a veth pair; then
`checkpoint migrate` moves it. The baseline is the same workload stopped for
the whole job: `checkpoint dump` then `checkpoint restore` (local, so it
pays no transfer at all: the baseline is generous to stop-the-world).

    .venv/bin/python tools/bench/bench_migrate.py                   # 256 MiB and 1 GiB, 3 runs
    .venv/bin/python tools/bench/bench_migrate.py --mib 256 --runs 5
    .venv/bin/python tools/bench/bench_migrate.py --link 1gbit      # the veth shaped (tc tbf)

Prints, per size: downtime, predicted downtime, total time, rounds, bytes
sent / raw memory (medians), the stop-the-world downtime and the ratio;
then the final round's pages and its two shares of the downtime: the
source's (frozen: pages read, compressed and sent, the rest of the state
read) and the destination's (the final layer applied, the state set, the
copy let run); the rest is the transfer's tail and checks in between.
Goals (the issue): downtime <= 50 ms at 1 GiB, prediction within +-30% of
the actual, bytes sent <= 0.6x the raw memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, Workload, median

sys.path.insert(0, os.path.join(ROOT, "tests"))
CLI = os.path.join(ROOT, ".venv", "bin", "checkpoint")


def migrate_once(src, dst, mib: int, pct: float, work: str) -> dict:
    with Workload(mib, pct) as wl:
        time.sleep(0.5)
        srv = subprocess.Popen(dst.wrap([CLI, "page-server", "-D", f"{work}/dst", "--address",
                                         dst.ip, "--port", "0", "--restore", "--pid-ns",
                                         "--once", "--json", "--auth-key", f"{work}/key"]),
                               stdout=subprocess.PIPE, text=True)
        port = json.loads(srv.stdout.readline())["port"]
        m = subprocess.run(src.wrap([CLI, "migrate", "-t", wl.pid, "--to", f"{dst.ip}:{port}",
                                     "--json", "--auth-key", f"{work}/key"]),
                           capture_output=True, text=True, timeout=600)
        if m.returncode != 0:
            srv.kill()
            raise SystemExit(f"migrate failed: {m.stderr.strip()}")
        st = json.loads(m.stdout)
        res = json.loads(srv.stdout.readline())
        srv.wait(30)
        # the final layer on the destination: from its arrival to the copy running
        st["dest_final_ms"] = res["per_layer"][-1]["apply_ms"] if res.get("per_layer") else 0.0
        if res.get("restored_pid"):
            try:
                os.kill(res["restored_pid"], 9)
            except ProcessLookupError:
                pass
        return st


def stop_the_world_once(mib: int, pct: float, work: str) -> float:
    """dump (frozen until published, then killed) + restore -d: the downtime."""
    images = tempfile.mkdtemp(dir=work)
    with Workload(mib, pct) as wl:
        time.sleep(0.5)
        t0 = time.perf_counter()
        d = subprocess.run([CLI, "dump", "-t", str(wl.pid), "-D", images, "--json"],
                           capture_output=True, text=True)
        if d.returncode:
            raise SystemExit(f"dump failed: {d.stderr.strip()}")
        frozen = json.loads(d.stdout)["frozen_ms"]
        wl.proc.wait()
        r = subprocess.run([CLI, "restore", "-D", images, "-d", "--json", "--stdio", "null"],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"restore failed: {r.stderr.strip()}")
        info = json.loads(r.stdout)
        os.kill(info["pid"], 9)
        del t0
        return frozen + info["restore_ms"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--link", default=None, help="shape the veth, e.g. 1gbit")
    ap.add_argument("--raw", metavar="FILE", help="append each migration's --json stats here")
    args = ap.parse_args()
    import pytest
    from netns import shape, two_hosts
    work = tempfile.mkdtemp(prefix="bench-migrate-")
    with open(f"{work}/key", "wb") as f:
        f.write(os.urandom(32))
    os.chmod(f"{work}/key", 0o600)
    try:
        ctx = two_hosts("bench")
        src, dst = ctx.__enter__()
    except pytest.skip.Exception as exc:
        raise SystemExit(f"needs network namespaces: {exc}")
    try:
        if args.link:
            shape(src, args.link)
            shape(dst, args.link)
        print(f"link: veth between two network namespaces{', ' + args.link if args.link else ''}"
              f"; workload rewrites {args.percent:g}% of its pages every 100 ms; "
              f"medians of {args.runs}")
        print(f"{'MiB':>5} {'downtime':>9} {'predicted':>9} {'error':>6} {'total':>8} "
              f"{'rounds':>6} {'sent/raw':>8} {'stw':>8} {'ratio':>6} | final round: "
              f"{'pages':>6} {'source':>7} {'dest':>7}")
        for mib in args.mib:
            runs = [migrate_once(src, dst, mib, args.percent, work) for _ in range(args.runs)]
            if args.raw:
                with open(args.raw, "a") as f:
                    for r in runs:
                        f.write(json.dumps({"mib": mib, **r}) + "\n")
            stw = [stop_the_world_once(mib, args.percent, work) for _ in range(args.runs)]
            down = median([r["downtime_ms"] for r in runs])
            pred = median([r["predicted_downtime_ms"] for r in runs])
            err = median([(r["predicted_downtime_ms"] - r["downtime_ms"]) / r["downtime_ms"]
                          for r in runs])
            total = median([r["total_ms"] for r in runs])
            rounds = median([r["rounds"] for r in runs])
            sent = median([r["bytes_sent"] / (mib << 20) for r in runs])
            base = median(stw)
            # the downtime's parts: the source's frozen share (freeze, pages
            # read, compressed and sent, the rest of the state), the
            # destination's (final layer applied, state set, copy let run)
            fpages = median([r["per_round"][-1]["pages"] for r in runs])
            fsrc = median([r["frozen_ms"] for r in runs])
            fdst = median([r["dest_final_ms"] for r in runs])
            print(f"{mib:5d} {down:7.1f}ms {pred:7.1f}ms {err * 100:+5.0f}% {total:6.0f}ms "
                  f"{rounds:6.0f} {sent:8.2f} {base:6.0f}ms {down / base:6.3f} |              "
                  f"{fpages:6.0f} {fsrc:5.1f}ms {fdst:5.1f}ms")
    finally:
        ctx.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
