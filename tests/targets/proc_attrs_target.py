"""A process that sets one kind of process-wide state, then checks it is
still there when asked (tests/test_proc_attrs.py).

    proc_attrs_target.py KIND

Prints "READY {json}"; on "check" prints "CHECK ok" or "CHECK bad: why";
on "quit" exits 0. Kinds:
- sched: the main thread SCHED_BATCH, nice 7, on CPU 0 only; a second
  thread SCHED_IDLE; oom_score_adj 321;
- ctty: a session leader with a pty as its controlling terminal;
- leader / group: a session leader (setsid) / its own process group (setpgid);
- plain: nothing (the session and group it was started in);
- child: a child process (sleep), whose PID is in READY;
- sysv: a SysV shared memory segment attached (not removed);
- shared-file PATH: a read-only shared mapping of a file opened read-write
  (mprotect may make it writable later);
- shared-ro: shared anonymous memory whose pages are now read-only / PROT_NONE.
"""

import json
import os
import sys
import threading

kind = sys.argv[1]
info = {"pid": os.getpid()}
state = {}


def idle_thread(ready):
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    state["idle_tid"] = threading.get_native_id()
    ready.set()
    threading.Event().wait()


def setup():
    if kind == "sched":
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, 7)
        os.sched_setaffinity(0, {0})
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("321")
        ready = threading.Event()
        threading.Thread(target=idle_thread, args=(ready,), daemon=True).start()
        ready.wait()
        info["idle_tid"] = state["idle_tid"]
    elif kind == "leader":
        os.setsid()
    elif kind == "ctty":
        import fcntl
        import termios
        os.setsid()
        state["master"], state["slave"] = os.openpty()
        fcntl.ioctl(state["slave"], termios.TIOCSCTTY, 0)
    elif kind == "group":
        os.setpgid(0, 0)
    elif kind == "child":
        import subprocess
        info["child"] = subprocess.Popen(["sleep", "1000"]).pid
    elif kind == "sysv":
        sysv_attach()
    elif kind == "shared-file":
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        fd = os.open(sys.argv[2], os.O_RDWR)
        addr = libc.mmap(None, 4096, 1, 1, fd, 0)      # PROT_READ, MAP_SHARED
        os.close(fd)
        state.update(addr=addr, libc=libc)
    elif kind == "shared-ro":
        import ctypes
        import mmap
        libc = ctypes.CDLL(None, use_errno=True)
        m = mmap.mmap(-1, 3 * 4096, flags=mmap.MAP_SHARED)
        m[:] = b"A" * 4096 + b"B" * 4096 + b"C" * 4096
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        libc.mprotect(ctypes.c_void_p(addr + 4096), 4096, 1)   # PROT_READ
        libc.mprotect(ctypes.c_void_p(addr + 8192), 4096, 0)   # PROT_NONE
        state.update(m=m, addr=addr, libc=libc)
        info["addr"] = addr
    info["sid"], info["pgid"] = os.getsid(0), os.getpgid(0)


def sysv_attach():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    shmid = libc.shmget(0, 65536, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    addr = libc.shmat(shmid, None, 0)
    # not removed (IPC_RMID): the segment outlives the process (the test removes it)
    info["shmid"], info["addr"] = shmid, addr


def check() -> str:
    if kind == "sched":
        me = threading.get_native_id()
        got = (os.sched_getscheduler(me), os.getpriority(os.PRIO_PROCESS, me),
               os.sched_getaffinity(me))
        if got != (os.SCHED_BATCH, 7, {0}):
            return f"main thread: policy, nice, cpus = {got}"
        idle = os.sched_getscheduler(state["idle_tid"])
        if idle != os.SCHED_IDLE:
            return f"second thread: policy {idle}"
        with open("/proc/self/oom_score_adj") as f:
            adj = int(f.read())
        if adj != 321:
            return f"oom_score_adj {adj}"
    if kind == "shared-file":
        import ctypes
        if state["libc"].mprotect(ctypes.c_void_p(state["addr"]), 4096, 3) != 0:
            return f"mprotect writable: {os.strerror(ctypes.get_errno())}"
        ctypes.memmove(state["addr"], b"W", 1)
        state["libc"].mprotect(ctypes.c_void_p(state["addr"]), 4096, 1)
    if kind == "shared-ro":
        with open("/proc/self/maps") as f:
            prots = {int(ln.split("-")[0], 16): ln.split()[1] for ln in f}
        want = {state["addr"]: "rw-s", state["addr"] + 4096: "r--s", state["addr"] + 8192: "---s"}
        if any(prots.get(a) != p for a, p in want.items()):
            return f"protections {[prots.get(a) for a in want]}"
        state["libc"].mprotect(__import__("ctypes").c_void_p(state["addr"] + 8192), 4096, 1)
        m = state["m"]
        if m[:] != b"A" * 4096 + b"B" * 4096 + b"C" * 4096:
            return "content differs"
        state["libc"].mprotect(__import__("ctypes").c_void_p(state["addr"] + 8192), 4096, 0)
    if kind == "ctty":
        with open("/proc/self/stat") as f:
            tty_nr = int(f.read().rsplit(")", 1)[1].split()[4])
        if tty_nr != os.fstat(state["slave"]).st_rdev:
            return f"controlling terminal {tty_nr}"
        if os.tcgetpgrp(state["slave"]) != os.getpid():
            return f"foreground group {os.tcgetpgrp(state['slave'])}"
    return "ok"


setup()
print("READY " + json.dumps(info), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "check":
        why = check()
        print("CHECK ok" if why == "ok" else f"CHECK bad: {why}", flush=True)
    elif cmd == "quit":
        sys.exit(0)
