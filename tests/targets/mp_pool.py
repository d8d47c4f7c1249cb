"""multiprocessing.Pool mid-computation, for tests/test_trees.py: squares
0..N-1 in a pool of 2 workers (each task sleeps a little), printing
"GOT <i>" as results come in order and finally "SUM <total>".
"""

import multiprocessing as mp
import sys
import time


def work(i: int) -> int:
    time.sleep(0.02)
    return i * i


def main() -> None:
    n = int(sys.argv[1])
    mp.set_start_method(sys.argv[2] if len(sys.argv) > 2 else "fork")
    print("READY", flush=True)
    total = 0
    with mp.Pool(2) as pool:
        for i, v in enumerate(pool.imap(work, range(n))):
            total += v
            print(f"GOT {i}", flush=True)
    print(f"SUM {total}", flush=True)


if __name__ == "__main__":
    main()
