"""Stages of a shell pipeline for tests/test_trees.py:

    pipeline_stage.py produce   numbered lines, one every millisecond
    pipeline_stage.py consume   checks each line is the previous one plus one
                                (after the filter: "LINE <n>"), prints
                                "SEEN <n>" every 500 lines and "BAD ..." on a
                                gap, a repeat or a mangled line
"""

import sys
import time


def produce() -> None:
    i = 0
    out = sys.stdout
    while True:
        i += 1
        out.write(f"line {i}\n")
        out.flush()
        time.sleep(0.001)


def consume() -> None:
    last = 0
    for raw in sys.stdin:
        word, _, num = raw.strip().partition(" ")
        if word != "LINE" or not num.isdigit() or int(num) != last + 1:
            print(f"BAD after {last}: {raw.strip()!r}", flush=True)
            return
        last = int(num)
        if last % 500 == 0:
            print(f"SEEN {last}", flush=True)


if __name__ == "__main__":
    {"produce": produce, "consume": consume}[sys.argv[1]]()
