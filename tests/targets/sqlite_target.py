"""sqlite3 in an open write transaction, driven over stdin.

    sqlite_target.py DB hold     BEGIN IMMEDIATE, insert a row, print READY,
                                 then "commit" -> COMMITTED, "count" -> COUNT n
    sqlite_target.py DB wait     a second writer: BEGIN IMMEDIATE (sqlite's busy
                                 handler retries while the lock is held),
                                 insert, commit, print GOT, then COUNT n
"""
import sqlite3
import sys

db, role = sys.argv[1], sys.argv[2]
con = sqlite3.connect(db, timeout=120, isolation_level=None)
if role == "hold":
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t VALUES ('held')")
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "commit":
            con.execute("COMMIT")
            print("COMMITTED", flush=True)
        elif line.strip() == "count":
            print("COUNT", con.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
else:
    print("WAITING", flush=True)
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t VALUES ('waiter')")
    con.execute("COMMIT")
    print("GOT", flush=True)
    print("COUNT", con.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
