"""Network lock: lock() and release_lock() of N connections, through
libnftables (the context kept, as the engine does; and a new context per
call, to show what keeping it saves) and through `nft -f -`, against the
round trip of an empty `list tables` through the kept libnftables context
in the same run (the floor: one netlink exchange). Runs in a network
namespace of its own (unshare, root), which goes away with the process.

    .venv/bin/python tools/bench/bench_netlock.py [--runs 50] [--conns 1,100,1000]
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import socket
import time

from common import median

from checkpoint import netlock

CLONE_NEWNET = 0x40000000


def conns(n: int) -> list[netlock.Conn]:
    lo = bytes([127, 0, 0, 1])
    return [netlock.Conn(socket.AF_INET, lo, 8000, lo, 30000 + i) for i in range(n)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--conns", default="1,100,1000")
    args = ap.parse_args()
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        raise SystemExit("bench_netlock: unshare(CLONE_NEWNET) failed (run it as root)")
    lib = netlock.Libnftables()
    cmd = netlock.NftCommand(shutil.which("nft") or "/usr/sbin/nft")
    means = {"libnftables": (lib, False), "libnftables, new context per call": (lib, True),
             "nft -f -": (cmd, False)}
    sizes = [int(n) for n in args.conns.split(",")]
    res: dict[str, list[float]] = {}

    def sample(row: str, fn) -> None:
        res.setdefault(row, []).append(timed(fn))

    for _ in range(args.runs):   # interleaved: the machine's load hits all alike
        sample("libnftables: list tables", lambda: lib.run("list tables\n"))
        sample("nft list tables", lambda: cmd.run("list tables\n"))
        for label, (backend, fresh) in means.items():
            netlock._cache["backend"] = backend
            lib.close()   # untimed: no context (and no wait of its) carried over
            for n in sizes:
                cs = conns(n)
                held = []
                sample(f"{label}: lock {n}",
                       lambda: (held.append(netlock.lock(cs)), fresh and netlock.close()))
                sample(f"{label}: release {n}",
                       lambda: (netlock.release_lock(held[0].name), fresh and netlock.close()))
    base = median(res["libnftables: list tables"])
    for row, xs in res.items():
        m = median(xs)
        print(f"  {row:50s} {m * 1e3:8.2f} ms  x{m / base:6.1f} the floor")
    netlock.close()


if __name__ == "__main__":
    main()
