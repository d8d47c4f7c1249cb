"""Process trees end to end: a tree is dumped with every descendant
(CRIU's -t), killed, and restored with its PIDs, parent links, sessions,
process groups, zombies, shared memory and shared pipes; each target checks
its own state after the restore."""

from __future__ import annotations

import os
import signal

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.restorer import restore
from conftest import build_target
from test_dump_restore import Channel, reaper  # noqa: F401 (fixture)


def _dump_kill_restore(ch, p, tmp_path, reaper, **kw):
    """Dump the tree of ``p`` (Checkpointer options ``kw``), which kills it,
    and restore it with the channel's streams; returns (DumpStats, Restored)."""
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img", **kw) as ck:
        st = ck.dump()
    p.wait(10)
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    return st, r


def _start_server(reaper, n=3):
    ch = Channel()
    p = ch.popen([str(build_target("tree_server")), str(n)])
    reaper.append(p.pid)
    words = ch.expect("READY").split()[1:]
    workers = [int(w) for w in words[:n]]
    session_kid, zombie = int(words[n + 1]), int(words[n + 3])
    reaper.extend(workers + [session_kid])
    return ch, p, workers, session_kid, zombie


def test_prefork_tree_dump_kill_restore(tmp_path, reaper):
    ch, p, workers, session_kid, zombie = _start_server(reaper)
    assert ch.ask("work 10", "DONE") == "DONE 55 55"
    assert ch.ask("check", "STATE") == "STATE OK"
    kids = open(f"/proc/{workers[0]}/task/{workers[0]}/children").read().split()
    grandchild = int(kids[0])
    reaper.append(grandchild)
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        st = ck.dump()
    p.wait(10)
    pids = [q["pid"] for q in st.processes]
    assert pids[0] == p.pid
    assert sorted(pids[1:]) == sorted(workers + [session_kid, grandchild])
    assert st.zombies == [zombie]
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    assert r.pid == p.pid and sorted(r.tree) == sorted(pids + [zombie])
    # the restored workers take work from the restored pipe and add to the
    # one shared counter page
    assert ch.ask("work 5", "DONE") == "DONE 70 70"
    assert ch.ask("check", "STATE") == "STATE OK"
    ch.send("orphan\n")   # worker 1 dies: its child's parent-death signal fires
    assert ch.expect("PDEATH") == f"PDEATH {int(signal.SIGUSR1)}"
    ch.send("quit\n")
    words = ch.expect("EXIT").split()[1:]
    assert words.pop() == "orphan:0"   # reparented to the restored subreaper, reaped by it
    statuses = dict(w.split(":") for w in words)
    want = {str(workers[0]): str(signal.SIGKILL)}
    want.update({str(w): str(signal.SIGTERM) for w in workers[1:] + [session_kid]})
    want[str(zombie)] = str(7 << 8)
    assert statuses == want
    assert r.wait(10) == 0
    ch.close()


STAGE = os.path.join(os.path.dirname(__file__), "targets", "pipeline_stage.py")


def _tree_pids(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


@pytest.mark.parametrize("predumps", [0, 2])
def test_shell_pipeline_mid_stream(tmp_path, reaper, predumps):
    """bash running producer | tr | consumer: restored mid-stream, not a
    line is lost or repeated (the consumer checks every one), with and
    without pre-dump rounds of the whole tree first."""
    import sys
    import time
    ch = Channel()
    py = sys.executable
    p = ch.popen(["bash", "-c", f"{py} -u {STAGE} produce | tr a-z A-Z | {py} {STAGE} consume"])
    reaper.append(p.pid)
    ch.expect("SEEN 500")
    deadline = time.monotonic() + 5
    while len(_tree_pids(p.pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    before = sorted(_tree_pids(p.pid))
    reaper.extend(before)
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        for _ in range(predumps):
            ck.pre_dump()
        st = ck.dump()
    p.wait(10)
    assert sorted(q["pid"] for q in st.processes) == before
    seen = int(ch.lines[-1].split()[1])
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    ch.expect(f"SEEN {seen + 1000}", timeout=20)
    assert not [line for line in ch.lines if line.startswith("BAD")]
    r.kill()
    for pid in before:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    r.wait(10)
    ch.close()


def test_multiprocessing_pool_finishes_after_restore(tmp_path, reaper):
    """A Python multiprocessing.Pool (a parent with its handler threads, two
    workers, pipes and named semaphores between them) dumped
    mid-computation finishes with the result of an uninterrupted run."""
    import sys
    n = 300
    ch = Channel()
    p = ch.popen([sys.executable, os.path.join(os.path.dirname(__file__), "targets",
                                               "mp_pool.py"), str(n)])
    reaper.append(p.pid)
    ch.expect("READY")
    ch.expect("GOT 50")
    reaper.extend(_tree_pids(p.pid))
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.pre_dump()
        st = ck.dump()
    p.wait(10)
    assert len(st.processes) == 3
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    assert ch.expect("SUM", timeout=30) == f"SUM {sum(i * i for i in range(n))}"
    got = [int(line.split()[1]) for line in ch.lines if line.startswith("GOT")]
    assert got == list(range(n))
    assert r.wait(20) == 0
    ch.close()


def test_tree_forking_during_the_dump(tmp_path, reaper):
    """A parent forking a child every millisecond: the freeze catches the
    tree in one consistent state (children running, exited ones as
    zombies); after the restore the parent reaps every child, those frozen
    mid-life and the zombies, each with its own exit status."""
    import sys
    import time
    ch = Channel()
    p = ch.popen([sys.executable, os.path.join(os.path.dirname(__file__), "targets",
                                               "forker.py")])
    reaper.append(p.pid)
    ch.expect("READY")
    time.sleep(0.3)
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        st = ck.dump()
    p.wait(10)
    kids = len(st.processes) - 1 + len(st.zombies)
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    time.sleep(0.3)
    forked, reaped, bad, running = map(int, ch.ask("check", "STATE").split()[1:])
    assert bad == 0 and forked > reaped > 0 and running < 50, (forked, reaped, bad, kids)
    r.kill()
    r.wait(10)
    ch.close()


def _pss_kib(pids) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


@pytest.mark.parametrize("predump", [False, True])
def test_copy_on_write_memory_stays_shared(tmp_path, reaper, predump):
    """A parent and 4 workers sharing 64 MiB copy-on-write: after the
    restore each sees exactly its own memory (the parent's pages rewritten
    after the fork, the workers' own pages) and the tree uses about the
    memory it used before (proportional set sizes summed: within 1.1x), not
    five copies. With a pre-dump first, the parent rewrites pages between
    the rounds: the workers' copies, shared no more, come in the last one."""
    ch = Channel()
    p = ch.popen([str(build_target("cow_tree")), "64", "4"])
    reaper.append(p.pid)
    workers = [int(w) for w in ch.expect("READY").split()[1:]]
    reaper.extend(workers)
    assert ch.ask("check", "CHECK") == "CHECK good 4"
    before = _pss_kib([p.pid, *workers])
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        if predump:
            ck.pre_dump()
            assert ch.ask("parentwrite", "WROTE") == "WROTE"
        st = ck.dump()
    p.wait(10)
    # the image holds the shared memory once, not five times
    assert st.bytes_raw < 1.2 * 64 * 2**20 or predump
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    assert ch.ask("check", "CHECK") == "CHECK good 4"
    after = _pss_kib([r.pid, *workers])
    assert after <= 1.1 * before, (before, after)
    ch.send("quit\n")
    assert r.wait(10) == 0
    ch.close()


def _c_project(d):
    d.mkdir()
    names = [f"m{i}" for i in range(6)]
    for i, n in enumerate(names):
        # enough code that cc1 runs a while
        body = "\n".join(f"static int f{j}(int x) {{ return x * {j + 3} + (x >> {j % 7}); }}"
                         for j in range(400))
        calls = " + ".join(f"f{j}(x)" for j in range(0, 400, 7))
        (d / f"{n}.c").write_text(f"{body}\nint {n}(int x) {{ return {calls}; }}\n")
    (d / "main.c").write_text("".join(f"int {n}(int);\n" for n in names)
                              + "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", "
                              + " + ".join(f"{n}(1)" for n in names) + "); return 0; }\n")
    objs = " ".join(f"{n}.o" for n in [*names, "main"])
    (d / "Makefile").write_text(
        f"prog: {objs}\n\tcc -o prog {objs}\n"
        "%.o: %.c\n\tsleep 0.2\n\tcc -O2 -c -o $@ $<\n")


def test_make_j2_checkpointed_mid_build(tmp_path, reaper):
    """make -j2 of a small C project, dumped mid-build (make, its shells, cc
    and cc1 at work) and restored: the build completes and its program is
    byte for byte the one an uninterrupted build makes."""
    import shutil
    import subprocess
    import time
    assert shutil.which("make") and shutil.which("cc"), "tools/setup installs make and cc"
    ref, work = tmp_path / "ref", tmp_path / "work"
    _c_project(ref)
    _c_project(work)
    subprocess.run(["make", "-s", "-j2"], cwd=ref, check=True, capture_output=True)
    ch = Channel()
    p = ch.popen(["make", "-s", "-j2"], cwd=work)
    reaper.append(p.pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            open(f"/proc/{q}/comm").read().strip() == "cc1" for q in _tree_pids(p.pid)
            if os.path.exists(f"/proc/{q}")):
        time.sleep(0.005)
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        st = ck.dump()
    p.wait(10)
    reaper.extend(q["pid"] for q in st.processes)
    # make with its children (running, or exited and not reaped yet)
    assert len(st.processes) + len(st.zombies) >= 2, (st.processes, st.zombies)
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    assert r.wait(60) == 0
    assert (work / "prog").read_bytes() == (ref / "prog").read_bytes()
    ch.close()


CLOSED_PIPE = """
import os, sys
r, w = os.pipe()
os.write(w, b"left behind")
os.close(w)   # no writer left anywhere: the next reads give the data, then EOF
print("READY", flush=True)
sys.stdin.readline()
print("GOT", os.read(r, 100).decode(), repr(os.read(r, 100)), flush=True)
"""


def test_pipe_whose_other_end_is_closed_everywhere(tmp_path, reaper):
    """A read end whose write end no process holds any more is restored
    with its data and its EOF (not refused as a pipe to another process)."""
    import sys
    ch = Channel()
    p = ch.popen([sys.executable, "-c", CLOSED_PIPE])
    reaper.append(p.pid)
    ch.expect("READY")
    _, r = _dump_kill_restore(ch, p, tmp_path, reaper)
    assert ch.ask("go", "GOT") == "GOT left behind b''"
    assert r.wait(10) == 0
    ch.close()


def _edits():
    def child(recs, i=1):
        return [t for t in recs["pstree"] if not t.zombie][i]

    def files_of(recs, pid):
        return next(f for f in recs["files"] if f.pid == pid)

    def mm_of(recs, pid):
        return next(m for m in recs["mm"] if m.pid == pid)

    def linked_fd(recs):
        for f in recs["files"]:
            for e in f.fds:
                if e.HasField("tree_pid"):
                    return f, e
        raise AssertionError("no linked fd")

    def parent_unknown(recs):
        child(recs).ppid = 4_000_000 - 1

    def fd_names_later(recs):
        f, e = linked_fd(recs)
        e.tree_pid = [t.pid for t in recs["pstree"] if not t.zombie][-1]

    def fd_names_missing_fd(recs):
        _, e = linked_fd(recs)
        e.tree_fd = 999

    def vma_bogus_share(recs):
        m = mm_of(recs, child(recs).pid)
        v = next(v for v in m.vmas if v.shared_pid)
        v.shared_start += 4096

    def root_cow(recs):
        mm_of(recs, recs["pstree"][0].pid).cow_parent.extend([4096, 8192])

    def cow_outside(recs):
        m = mm_of(recs, child(recs).pid)
        m.cow_parent[:] = [4096, 8192]

    def pid_twice(recs):
        from checkpoint.images.pb import pstree_pb2
        dup = pstree_pb2.PstreeEntry()
        dup.CopyFrom(child(recs, 1))
        recs["pstree"].append(dup)

    def zombie_threads(recs):
        next(t for t in recs["pstree"] if t.zombie).threads.append(12345)

    return [(parent_unknown, "is not earlier in the tree"),
            (fd_names_later, "not an earlier one"),
            (fd_names_missing_fd, "which it does not have"),
            (vma_bogus_share, "names no shared VMA"),
            (root_cow, "a parent it has not"),
            (cow_outside, "outside its private VMAs"),
            (pid_twice, "given twice"),
            (zombie_threads, "has records or threads")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_hostile_tree_images_refused_before_anything_starts(tmp_path, reaper):
    """Links between the processes of a tree are checked before anything is
    started: each impossible one is refused naming it."""
    from checkpoint.errors import ImageError
    from image_edit import edited_copy
    ch, p, workers, session_kid, zombie = _start_server(reaper)
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        ck.dump()
    p.wait(10)
    # show prints the tree, the root first, the zombie with its status
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "checkpoint", "show", "-D",
                          str(tmp_path / "img"), "--json"], capture_output=True, text=True)
    procs = json.loads(out.stdout)["processes"]
    assert procs[0]["pid"] == p.pid and procs[0]["ppid"] == os.getpid()
    assert {q["pid"]: q["state"] for q in procs}[zombie] == "zombie"
    assert {q["pid"] for q in procs} >= set(workers) | {session_kid, zombie}
    text = subprocess.run([sys.executable, "-m", "checkpoint", "show", "-D",
                           str(tmp_path / "img"), "--tree"], capture_output=True, text=True)
    assert f"{zombie}" in text.stdout and "Z(0x700)" in text.stdout
    for i, (edit, msg) in enumerate(_edits()):
        bad = edited_copy(tmp_path / "img", tmp_path / f"bad{i}", edit)
        with pytest.raises(ImageError, match=msg):
            restore(bad, inherit=stdio, inherit_stdio=False)
        assert not any(_alive(w) for w in workers), edit.__name__
    ch.close()


FG_JOB = """
import fcntl, os, signal, sys, termios, time
os.setsid()
master, slave = os.openpty()
fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
kid = os.fork()
if kid == 0:
    os.setpgid(0, 0)
    while True:
        time.sleep(1)
os.setpgid(kid, kid)
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
os.tcsetpgrp(slave, kid)          # a job in the foreground, as a shell does
print("READY", kid, flush=True)
for line in sys.stdin:
    print("FG", os.tcgetpgrp(slave), os.getsid(kid), os.getpgid(kid), flush=True)
"""


def test_terminal_foreground_job_comes_back(tmp_path, reaper):
    """A session leader with a controlling terminal whose foreground group
    is a child's (a shell running a job): restored, the child's group has
    the terminal again, not the leader's."""
    import sys
    ch = Channel()
    p = ch.popen([sys.executable, "-c", FG_JOB])
    reaper.append(p.pid)
    kid = int(ch.expect("READY").split()[1])
    reaper.append(kid)
    assert ch.ask("fg", "FG") == f"FG {kid} {p.pid} {kid}"
    _, r = _dump_kill_restore(ch, p, tmp_path, reaper)
    assert ch.ask("fg", "FG") == f"FG {kid} {p.pid} {kid}"
    r.kill()
    r.wait(10)
    ch.close()


SOCKPAIRS = r"""
import os, socket, sys
# a stream pair between parent and child, a datagram pair, a seqpacket pair
# in the parent alone; unread data queued in both directions; one end shut
ps, cs = socket.socketpair()
pd, cd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
q1, q2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
kid = os.fork()
if kid == 0:
    ps.close(); pd.close()
    cs.sendall(b"from child, unread")        # queued for the parent
    for line in iter(lambda: cs.recv(100), b""):
        if line.endswith(b"ping"):            # (after the parent's unread "x")
            cs.sendall(b"pong:" + cd.recv(100) + b"," + cd.recv(100))
    os._exit(0)
cs.close(); cd.close()
ps.sendall(b"x")                              # unread by the child
pd.send(b"one"); pd.send(b"two")              # two datagrams the child has not read
q1.send(b"m1"); q1.send(b"m2"); q2.shutdown(socket.SHUT_WR)
ps.setblocking(False)
import time; time.sleep(0.2)
print("READY", kid, flush=True)
for cmd in sys.stdin:
    got = []
    ps.setblocking(True)
    got.append(ps.recv(100))                   # the child's unread data
    got.append(q2.recv(10)); got.append(q2.recv(10))
    got.append(q1.recv(10))                    # EOF: q2 shut its sending side
    ps.sendall(b"ping")
    got.append(ps.recv(100))
    print("GOT", repr(got), ps.getblocking(), flush=True)
    break
"""


def test_unix_socketpairs_across_the_tree(tmp_path, reaper):
    """Unix socketpairs (stream between a parent and its child, datagram,
    seqpacket in one process) with unread data in both directions and a
    shut end: restored, every byte and message is there once, the EOF is
    there, and the pair still talks both ways."""
    import sys
    ch = Channel()
    p = ch.popen([sys.executable, "-c", SOCKPAIRS])
    reaper.append(p.pid)
    kid = int(ch.expect("READY").split()[1])
    reaper.append(kid)
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img") as ck:
        st = ck.dump()
    p.wait(10)
    assert len(st.processes) == 2
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    want = [b"from child, unread", b"m1", b"m2", b"", b"pong:one,two"]
    assert ch.ask("go", "GOT") == f"GOT {want!r} True"
    r.kill()
    r.wait(10)
    ch.close()


ASYNCIO = r"""
import asyncio, sys

async def main():
    loop = asyncio.get_running_loop()
    q = asyncio.Queue()
    loop.add_reader(0, lambda: q.put_nowait(sys.stdin.readline()))
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(tick())
    print("READY", flush=True)
    while True:
        line = await q.get()
        if not line:
            return
        # call_soon_threadsafe writes to the loop's self-pipe (a socketpair)
        fut = loop.create_future()
        import threading
        threading.Thread(target=lambda: loop.call_soon_threadsafe(fut.set_result, 1)).start()
        await fut
        print("TICKS", ticks, flush=True)

asyncio.run(main())
"""


def test_asyncio_program_with_its_self_pipe(tmp_path, reaper):
    """An asyncio event loop holds a socketpair (its self-pipe, woken by
    call_soon_threadsafe from another thread): dumped and restored, the loop
    goes on and is woken through it."""
    import sys
    ch = Channel()
    p = ch.popen([sys.executable, "-c", ASYNCIO])
    reaper.append(p.pid)
    ch.expect("READY")
    first = int(ch.ask("t", "TICKS").split()[1])
    _, r = _dump_kill_restore(ch, p, tmp_path, reaper)
    import time
    time.sleep(0.2)
    assert int(ch.ask("t", "TICKS").split()[1]) > first
    r.kill()
    r.wait(10)
    ch.close()


UNIX_SERVER = r"""
import os, socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
os.chmod(path, 0o640)
srv.listen(7)
abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
abstract.bind("\0ck-tree-test-" + str(os.getpid()))
fresh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # never bound
print("READY", flush=True)
for line in sys.stdin:
    conn, _ = srv.accept()
    conn.sendall(b"hello " + conn.recv(100))
    conn.close()
    print("SERVED", oct(os.stat(path).st_mode & 0o777), repr(abstract.getsockname()),
          repr(fresh.getsockname()), flush=True)
"""


def test_unix_server_listening(tmp_path, reaper):
    """A unix server listening on a path (mode 0640), an abstract datagram
    socket and a fresh unbound one: restored, the path is bound again with
    its mode and a client connecting then is served."""
    import sys
    path = str(tmp_path / "srv.sock")
    ch = Channel()
    p = ch.popen([sys.executable, "-c", UNIX_SERVER, path])
    reaper.append(p.pid)
    ch.expect("READY")
    _, r = _dump_kill_restore(ch, p, tmp_path, reaper)
    ch.send("serve\n")
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        c.sendall(b"client")
        assert c.recv(100) == b"hello client"
    line = ch.expect("SERVED")
    assert line == f"SERVED 0o640 b'\\x00ck-tree-test-{p.pid}' ''"
    r.kill()
    r.wait(10)
    ch.close()


TCP_SERVER = r"""
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(17)
srv6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
srv6.bind(("::1", 0))
srv6.listen(3)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
print("READY", srv.getsockname()[1], srv6.getsockname()[1], udp.getsockname()[1], flush=True)
for line in sys.stdin:
    for s in (srv, srv6):
        conn, _ = s.accept()
        conn.sendall(b"hello " + conn.recv(100))
        conn.close()
    data, peer = udp.recvfrom(100)
    udp.sendto(data.upper(), peer)
    print("SERVED", srv.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
          srv6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), flush=True)
"""


def test_tcp_and_udp_servers_idle(tmp_path, reaper):
    """An idle TCP server (IPv4 and IPv6 listeners, no client) and a bound
    UDP socket: restored on the same ports with their options; clients
    connecting after the restore are served."""
    import socket
    import sys
    ch = Channel()
    p = ch.popen([sys.executable, "-c", TCP_SERVER])
    reaper.append(p.pid)
    port4, port6, uport = map(int, ch.expect("READY").split()[1:])
    _, r = _dump_kill_restore(ch, p, tmp_path, reaper)
    ch.send("serve\n")
    for fam, addr in ((socket.AF_INET, ("127.0.0.1", port4)), (socket.AF_INET6, ("::1", port6))):
        with socket.socket(fam, socket.SOCK_STREAM) as c:
            c.connect(addr)
            c.sendall(b"client")
            assert c.recv(100) == b"hello client"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"ping", ("127.0.0.1", uport))
        assert u.recvfrom(100)[0] == b"PING"
    assert ch.expect("SERVED") == "SERVED 1 1"
    r.kill()
    r.wait(10)
    ch.close()


UNIX_CONN = r"""
import os, socket, sys, time
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(4)
kid = os.fork()
if kid == 0:
    srv.close()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.sendall(b"queued for the server")   # left unread at the dump
    while True:
        msg = c.recv(100)
        if not msg:
            os._exit(0)
        c.sendall(b"echo " + msg + b" " + repr(c.getpeername()).encode())
conn, _ = srv.accept()
time.sleep(0.2)
print("READY", kid, flush=True)
for line in sys.stdin:
    got = conn.recv(100)
    conn.sendall(b"ping")
    print("GOT", got.decode(), conn.recv(200).decode(), repr(conn.getsockname()), flush=True)
"""


def test_unix_server_with_a_connected_client(tmp_path, reaper):
    """A unix server and its client (its child) connected through the
    server's listener, with data the server has not read: restored, the
    connection is made again through the restored listener (the server's
    end has the listener's name, the client sees it as its peer) and every
    byte is there once."""
    import sys
    path = str(tmp_path / "srv.sock")
    ch = Channel()
    p = ch.popen([sys.executable, "-c", UNIX_CONN, path])
    reaper.append(p.pid)
    kid = int(ch.expect("READY").split()[1])
    reaper.append(kid)
    _, r = _dump_kill_restore(ch, p, tmp_path, reaper)
    want = f"GOT queued for the server echo ping {path!r} {path!r}"
    assert ch.ask("go", "GOT") == want
    r.kill()
    r.wait(10)
    ch.close()


def _cgroup2_root() -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return parts[1]
    return None


@pytest.fixture
def cgroup():
    """A fresh cgroup v2 directory, removed at the end (once empty)."""
    import time
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 mount on this machine (the freezer test needs one)")
    path = os.path.join(root, f"ck-test-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(path)
    yield path
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(os.path.join(path, "cgroup.events")) as f:
            if "populated 0" in f.read():
                break
        time.sleep(0.01)
    os.rmdir(path)


def test_freeze_cgroup_for_a_tree_that_forks_fast(tmp_path, reaper, cgroup):
    """--freeze-cgroup: the forking parent's cgroup (v2) is frozen while
    ptrace seizes the tree, so no child is born meanwhile; the restored
    parent reaps every child with its status. A process not in the cgroup,
    or a path that is no cgroup v2, is a usage error."""
    import sys
    import time
    from checkpoint.errors import UsageError
    ch = Channel()
    p = ch.popen([sys.executable, os.path.join(os.path.dirname(__file__), "targets",
                                               "forker.py")])
    reaper.append(p.pid)
    ch.expect("READY")
    with pytest.raises(UsageError, match="is not in it"):
        Checkpointer(p.pid, tmp_path / "x", freeze_cgroup=cgroup)
    with pytest.raises(UsageError, match="not a cgroup v2"):
        Checkpointer(p.pid, tmp_path / "x", freeze_cgroup=str(tmp_path))
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(p.pid))
    time.sleep(0.2)
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img", freeze_cgroup=cgroup) as ck:
        ck.dump()
    with open(os.path.join(cgroup, "cgroup.freeze")) as f:
        assert f.read().strip() == "0"        # thawed again
    p.wait(10)
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    time.sleep(0.2)
    forked, reaped, bad, running = map(int, ch.ask("check", "STATE").split()[1:])
    assert bad == 0 and forked > reaped > 0
    r.kill()
    r.wait(10)
    ch.close()


WAITING = r"""
import os, socket, sys, time
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind("\0ck-waiting-" + str(os.getpid()))
srv.listen(8)
done = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
done.connect("\0ck-waiting-" + str(os.getpid()))
first, _ = srv.accept()                  # one connection accepted...
go_r, go_w = os.pipe()
kid = os.fork()
if kid == 0:                             # ...two clients waiting, in a child
    srv.close()
    cs = []
    for i in range(2):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect("\0ck-waiting-" + str(os.getppid()))
        cs.append(c)
    os.read(go_r, 1)                     # the clients talk once the dump is over
    for i, c in enumerate(cs):
        c.sendall(b"client %d" % i)
        # one write a line: two processes print to the same pipe
        os.write(1, f"CLIENT {i} {c.recv(100).decode()}\n".encode())
    os._exit(0)
time.sleep(0.3)
print("READY", kid, flush=True)
sys.stdin.readline()
os.write(go_w, b"g")
for i in range(2):
    conn, _ = srv.accept()
    conn.sendall(b"served " + conn.recv(100))
first.sendall(b"x")
os.write(1, f"FIRST {done.recv(10).decode()}\n".encode())
"""


def test_unix_listener_with_clients_waiting(tmp_path, reaper):
    """A unix listener with one connection accepted and two clients (a
    child's) still in its accept queue: restored, the accepted connection is
    made again first, the two clients wait in the queue again in their
    order, and the server accepts and serves them."""
    import sys
    ch = Channel()
    p = ch.popen([sys.executable, "-c", WAITING])
    reaper.append(p.pid)
    kid = int(ch.expect("READY").split()[1])
    reaper.append(kid)
    _, r = _dump_kill_restore(ch, p, tmp_path, reaper)
    ch.send("go\n")
    got = sorted(ch.expect("") for _ in range(3))
    assert got == ["CLIENT 0 served client 0", "CLIENT 1 served client 1", "FIRST x"]
    r.wait(10)
    ch.close()


NETLINK = r"""
import socket, struct, sys
RTMGRP_LINK, RTNLGRP_IPV4_ROUTE = 1, 7
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.bind((0, RTMGRP_LINK))
s.setsockopt(270, 1, RTNLGRP_IPV4_ROUTE)        # NETLINK_ADD_MEMBERSHIP
s.setsockopt(270, 11, 1)                         # NETLINK_EXT_ACK
u = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)   # NETLINK_KOBJECT_UEVENT
print("READY", s.getsockname()[0], flush=True)
for line in sys.stdin:
    s.send(struct.pack("=IHHII", 20, 18, 0x301, 1, 0) + b"\0\0\0\0")   # RTM_GETLINK dump
    reply = s.recv(65536)
    kind = struct.unpack_from("=H", reply, 4)[0]
    groups = struct.unpack_from("=I", s.getsockopt(270, 9, 64))[0]
    print("NL", s.getsockname()[0], kind, hex(groups), s.getsockopt(270, 11),
          u.getsockopt(socket.SOL_SOCKET, 38), flush=True)
"""


def test_netlink_route_socket(tmp_path, reaper):
    """A NETLINK_ROUTE socket with its port id and multicast groups (one of
    them joined by NETLINK_ADD_MEMBERSHIP) and a uevent socket: restored,
    the route socket answers an RTM_GETLINK dump on the same port id."""
    import sys
    ch = Channel()
    p = ch.popen([sys.executable, "-c", NETLINK])
    reaper.append(p.pid)
    portid = int(ch.expect("READY").split()[1])
    _, r = _dump_kill_restore(ch, p, tmp_path, reaper)
    # RTM_NEWLINK (16) answers; groups 1 and 7: 0x41; EXT_ACK on; uevent protocol 15
    assert ch.ask("go", "NL") == f"NL {portid} 16 0x41 1 15"
    r.kill()
    r.wait(10)
    ch.close()
