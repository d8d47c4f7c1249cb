"""A target holding one kind of fd and checking it itself after a restore.

    fd_kinds_target.py KIND DIR
prints "READY {json}" once set up; then for each line on stdin prints
"STATE ok" or "STATE bad <what>", checking that the state of KIND is what
it was (and behaves: an epoll reports its events, a timer fires...).
Kinds: procfs, epoll, memfd, inherit, inotify, timerfd, tty, and those the
dump refuses (see REFUSED: they only set up and print READY).
"""
import ctypes
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import sys
import termios
import time
import tty

libc = ctypes.CDLL(None, use_errno=True)
kind, d = sys.argv[1], sys.argv[2]
info: dict = {}
keep: list = []
problems: list[str] = []


def check():  # the refused kinds: nothing of theirs to check after a restore
    pass


def expect(cond, what):
    if not cond:
        problems.append(what)


# -- procfs: /proc/stat at an offset, our own status and dir, /proc/self/fd
if kind == "procfs":
    stat_fd = os.open("/proc/stat", os.O_RDONLY)
    os.read(stat_fd, 10)
    status_fd = os.open("/proc/self/status", os.O_RDONLY)
    os.read(status_fd, 5)
    self_dir = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
    sys_fd = os.open("/proc/sys/kernel/ostype", os.O_RDONLY)
    info.update(stat=stat_fd, status=status_fd, dir=self_dir, sys=sys_fd)

    def check():
        expect(os.lseek(stat_fd, 0, os.SEEK_CUR) == 10, "stat offset")
        expect(os.pread(stat_fd, 3, 0) == b"cpu", "stat content")
        expect(os.lseek(status_fd, 0, os.SEEK_CUR) == 5, "status offset")
        text = os.pread(status_fd, 4096, 0).decode()
        pid = [ln.split()[1] for ln in text.splitlines() if ln.startswith("Pid:")][0]
        expect(int(pid) == os.getpid(), f"status of pid {pid}, I am {os.getpid()}")
        with open(os.open("status", os.O_RDONLY, dir_fd=self_dir)) as f:
            pid2 = [ln.split()[1] for ln in f.read().splitlines() if ln.startswith("Pid:")][0]
        expect(int(pid2) == os.getpid(), f"dir is pid {pid2}'s")
        expect(os.pread(sys_fd, 10, 0) == b"Linux\n", "ostype")

# -- epoll: a registration whose number now names another file, one whose
#    number was closed (the file lives on at another fd), one plain
elif kind == "epoll":
    ep = select.epoll()
    keep.append(ep)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    r3, w3 = os.pipe()
    ep.register(r1, select.EPOLLIN)
    ep.register(r2, select.EPOLLIN)
    ep.register(r3, select.EPOLLIN)
    # r1: moved away; a file of another kind now sits at its number
    r1_moved = os.dup(r1)
    os.close(r1)
    other = os.open("/dev/null", os.O_RDONLY)
    if other != r1:
        os.dup2(other, r1)
        os.close(other)
    # r2: its number closed, the file lives on elsewhere
    r2_moved = os.dup(r2)
    os.close(r2)
    info.update(ep=ep.fileno(), r1=r1, r1_moved=r1_moved, r2=r2, r2_moved=r2_moved, r3=r3)

    def check():
        expect(ep.poll(0) == [], "events before writes")
        for w, r, key in ((w1, r1_moved, r1), (w2, r2_moved, r2), (w3, r3, r3)):
            os.write(w, b"x")
            got = ep.poll(1)
            expect(got == [(key, select.EPOLLIN)], f"wrote to the pipe of {key}: {got}")
            os.read(r, 1)
        expect(ep.poll(0) == [], "events after reads")
        with open(f"/proc/self/fdinfo/{ep.fileno()}") as f:
            tfds = sorted(int(ln.split()[1]) for ln in f if ln.startswith("tfd:"))
        expect(tfds == sorted([r1, r2, r3]), f"registrations {tfds}")

# -- memfd: mapped shared and held as an fd: one object; its mode and seals
elif kind == "memfd":
    mfd = os.memfd_create("kinds", os.MFD_ALLOW_SEALING)
    os.ftruncate(mfd, 3 * 4096)
    m = mmap.mmap(mfd, 2 * 4096, mmap.MAP_SHARED, offset=4096)
    m[:5] = b"hello"
    os.pwrite(mfd, b"tail", 3 * 4096 - 4)
    os.fchmod(mfd, 0o640)
    fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    ro = os.open(f"/proc/self/fd/{mfd}", os.O_RDONLY)
    keep.append(m)
    info.update(memfd=mfd, ro=ro)

    def check():
        expect(os.pread(mfd, 5, 4096) == b"hello", "mapped bytes seen through the fd")
        m[100:103] = b"abc"
        expect(os.pread(ro, 3, 4096 + 100) == b"abc", "a write to the mapping is the fd's")
        os.pwrite(mfd, b"XYZ", 4096 + 200)
        expect(m[200:203] == b"XYZ", "a write to the fd is the mapping's")
        expect(os.pread(mfd, 4, 3 * 4096 - 4) == b"tail", "content past the mapping")
        st = os.fstat(mfd)
        expect(st.st_mode & 0o777 == 0o640, f"mode {st.st_mode & 0o777:o}")
        seals = fcntl.fcntl(mfd, fcntl.F_GET_SEALS)
        expect(seals == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, f"seals {seals:#x}")
        expect(os.fstat(ro).st_ino == st.st_ino, "the O_RDONLY fd is the same memfd")
        expect(fcntl.fcntl(ro, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY, "ro mode")
        maps = open("/proc/self/maps").read()
        ino = [ln.split()[4] for ln in maps.splitlines() if "/memfd:kinds" in ln]
        expect(ino == [str(st.st_ino)], f"the mapping is of inode {ino}, the fd {st.st_ino}")

# -- inherit: a socket left to the restore side, O_NONBLOCK on it
elif kind == "inherit":
    # sockets the dump refuses (bound, with a datagram unread from an
    # unnamed sender; socketpairs and idle bound sockets are restored)
    a, b = (socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2))
    a.bind(f"\0ck-inherit-{os.getpid()}-a")
    b.bind(f"\0ck-inherit-{os.getpid()}-b")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
        c.sendto(b"x", f"\0ck-inherit-{os.getpid()}-a")
        c.sendto(b"x", f"\0ck-inherit-{os.getpid()}-b")
    a.setblocking(False)
    keep.extend([a, b])
    app = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    info.update(sock=a.fileno(), peer=b.fileno(), app=app)

    def check():
        fl = fcntl.fcntl(a.fileno(), fcntl.F_GETFL)
        expect(fl & os.O_NONBLOCK, "the stand-in lost O_NONBLOCK")
        try:
            a.recv(1)
            problems.append("recv returned")
        except BlockingIOError:
            pass

# -- inotify: a directory and a file watched; the events come with their wds
elif kind == "inotify":
    os.mkdir(os.path.join(d, "watched"))
    open(os.path.join(d, "file"), "w").close()
    ifd = libc.inotify_init1(os.O_NONBLOCK)
    wd_dir = libc.inotify_add_watch(ifd, os.path.join(d, "watched").encode(), 0x100)  # CREATE
    gap = libc.inotify_add_watch(ifd, d.encode(), 0x100)
    libc.inotify_rm_watch(ifd, gap)  # a hole in the wd numbers
    os.read(ifd, 4096)  # its IN_IGNORED
    wd_file = libc.inotify_add_watch(ifd, os.path.join(d, "file").encode(), 0x2)  # MODIFY
    info.update(inotify=ifd, wd_dir=wd_dir, wd_file=wd_file)
    n = [0]

    def check():
        try:
            early = os.read(ifd, 4096)
            problems.append(f"events before any change: {early!r}")
        except BlockingIOError:
            pass
        n[0] += 1
        open(os.path.join(d, "watched", f"new{n[0]}"), "w").close()
        with open(os.path.join(d, "file"), "a") as f:
            f.write("x")
        time.sleep(0.05)
        data = os.read(ifd, 4096)
        got = []
        while data:
            wd, mask, _, ln = struct.unpack_from("iIII", data)
            got.append((wd, mask, data[16:16 + ln].rstrip(b"\0").decode()))
            data = data[16 + ln:]
        expect(got == [(wd_dir, 0x100, f"new{n[0]}"), (wd_file, 0x2, "")], f"events {got}")

# -- timerfd: periodic with unread expirations, a one-shot to expire
#    while the process is not running, a disarmed one
elif kind == "timerfd":
    CLOCK_MONOTONIC, CLOCK_REALTIME = 1, 0

    def settime(fd, flags, value, interval):
        raw = struct.pack("qqqq", int(interval), int(interval % 1 * 1e9), int(value),
                          int(value % 1 * 1e9))
        assert libc.timerfd_settime(fd, flags, ctypes.create_string_buffer(raw), None) == 0

    periodic = libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK)
    t0 = time.monotonic()
    settime(periodic, 0, 0.1, 0.1)
    oneshot = libc.timerfd_create(CLOCK_REALTIME, os.O_NONBLOCK)
    settime(oneshot, 0, 1.5, 0)
    idle = libc.timerfd_create(CLOCK_MONOTONIC, 0)
    time.sleep(0.35)  # 3 expirations of the periodic one, unread
    info.update(periodic=periodic, oneshot=oneshot, idle=idle)
    total = [0]

    def read_ticks(fd):
        try:
            return struct.unpack("Q", os.read(fd, 8))[0]
        except BlockingIOError:
            return 0

    def check():
        total[0] += read_ticks(periodic)
        want = int((time.monotonic() - t0) / 0.1)
        expect(abs(total[0] - want) <= 1, f"periodic: {total[0]} expirations, {want} due")
        expect(read_ticks(oneshot) == 1, "the one-shot did not fire once")
        raw = ctypes.create_string_buffer(32)
        libc.timerfd_gettime(idle, raw)
        expect(raw.raw == b"\0" * 32, "the idle timer got armed")
        expect(fcntl.fcntl(periodic, fcntl.F_GETFL) & os.O_NONBLOCK, "O_NONBLOCK")

# -- tty: a pty pair, the slave raw with a window size
elif kind == "tty":
    master, slave = os.openpty()
    tty.setraw(slave)
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    attrs[6][termios.VMIN] = 3
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    want_attrs = termios.tcgetattr(slave)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    info.update(master=master, slave=slave)

    def check():
        expect(termios.tcgetattr(slave) == want_attrs, "termios")
        ws = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
        expect(ws[:2] == (33, 101), f"window size {ws}")
        os.write(master, b"ab\n")  # raw: no echo, no line discipline, VMIN 3
        expect(os.read(slave, 3) == b"ab\n", "raw read")

# -- tty-inherit: the restorer's terminal stands in for ours: it gets our
#    settings, keeps its own size, and we are told it changed (SIGWINCH)
elif kind == "tty-inherit":
    import signal
    winch = [0]
    signal.signal(signal.SIGWINCH, lambda *a: winch.__setitem__(0, winch[0] + 1))
    master, slave = os.openpty()
    tty.setraw(slave)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    info.update(master=master, slave=slave, attrs=termios.tcgetattr(slave)[:6])

    def check():
        expect(winch[0] == 1, f"{winch[0]} SIGWINCH")
        ws = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
        expect(ws[:2] == (24, 80), f"window size {ws}")

# -- what the dump refuses: set up only
elif kind == "unix-pending":   # a client not accepted yet that sent data
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"\0ck-pending-{os.getpid()}")
    s.listen(4)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(f"\0ck-pending-{os.getpid()}")
    c.send(b"early")
    keep.extend([s, c])
    info["fd"] = c.fileno()
elif kind == "unix-bound":  # bound to an (abstract) name, a datagram unread
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(f"\0ck-bound-{os.getpid()}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
        c.sendto(b"x", f"\0ck-bound-{os.getpid()}")
    keep.append(s)
    info["fd"] = s.fileno()
elif kind == "unix-outside":  # a pair whose other end a process outside the tree holds
    a, b = socket.socketpair()
    if os.fork() == 0:
        a.close()
        if os.fork() == 0:   # reparented once its parent exits: no longer in the tree
            while b.recv(100):
                pass
            os._exit(0)
        os._exit(0)
    os.wait()
    b.close()
    keep.append(a)
    info["fd"] = a.fileno()
elif kind == "scm-rights":  # an fd in flight in the queue
    a, b = socket.socketpair()
    b.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        struct.pack("i", sys.stdin.fileno()))])
    keep.extend([a, b])
    info["fd"] = a.fileno()
elif kind == "passcred":    # unread data whose sender's credentials go with it
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    b.send(b"x")
    keep.extend([a, b])
    info["fd"] = a.fileno()
elif kind == "tcp":         # an established connection (to itself)
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # (its connections linger after the dump's kill: bound again only with reuse)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    s = socket.create_connection(lst.getsockname())
    acc, _ = lst.accept()
    keep.extend([lst, s, acc])
    info["fd"] = s.fileno()
elif kind == "netlink":     # a reply not read yet
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    # RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, then an rtgenmsg (AF_UNSPEC)
    s.send(struct.pack("=IHHII", 20, 18, 0x301, 1, 0) + b"\0\0\0\0")
    time.sleep(0.05)
    keep.append(s)
    info["fd"] = s.fileno()
elif kind == "packet":
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    keep.append(s)
    info["fd"] = s.fileno()
elif kind == "pidfd":
    info["fd"] = os.pidfd_open(os.getpid())
elif kind == "fanotify":
    info["fd"] = libc.fanotify_init(0, os.O_RDONLY)
elif kind == "io_uring":
    params = ctypes.create_string_buffer(120)
    info["fd"] = libc.syscall(425, 4, params)
elif kind == "userfaultfd":
    info["fd"] = libc.syscall(323, os.O_CLOEXEC)
elif kind == "chardev":
    info["fd"] = os.open("/dev/kmsg", os.O_RDONLY)
elif kind == "shmem":
    m = mmap.mmap(-1, 4096, mmap.MAP_SHARED)
    keep.append(m)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    line = [ln for ln in open("/proc/self/maps") if ln.startswith(f"{addr:x}-")][0]
    info["fd"] = os.open(f"/proc/self/map_files/{line.split()[0]}", os.O_RDWR)
elif kind == "sysvshm":
    libc.shmat.restype = ctypes.c_void_p
    shmid = libc.shmget(0, 4096, 0o600 | 0o1000)  # IPC_PRIVATE, IPC_CREAT
    addr = libc.shmat(shmid, None, 0)
    libc.shmctl(shmid, 0, None)  # IPC_RMID: gone once detached
    line = [ln for ln in open("/proc/self/maps") if ln.startswith(f"{addr:x}-")][0]
    info["fd"] = os.open(f"/proc/self/map_files/{line.split()[0]}", os.O_RDWR)
elif kind == "procfs-other":
    info["fd"] = os.open("/proc/1/stat", os.O_RDONLY)
elif kind == "inotify-queued":
    ifd = libc.inotify_init1(0)
    libc.inotify_add_watch(ifd, d.encode(), 0x100)
    open(os.path.join(d, "x"), "w").close()
    info["fd"] = ifd
elif kind == "inotify-deleted":
    ifd = libc.inotify_init1(0)
    os.mkdir(os.path.join(d, "gone"))
    libc.inotify_add_watch(ifd, os.path.join(d, "gone").encode(), 0x100)
    hold = os.open(os.path.join(d, "gone"), os.O_RDONLY)
    os.rmdir(os.path.join(d, "gone"))  # the watch stays while we hold the inode
    info["fd"], info["hold"] = ifd, hold
elif kind == "deleted-cwd":
    os.mkdir(os.path.join(d, "cwd"))
    os.chdir(os.path.join(d, "cwd"))
    os.rmdir(os.path.join(d, "cwd"))
elif kind == "deleted-dir":
    os.mkdir(os.path.join(d, "gone"))
    info["fd"] = os.open(os.path.join(d, "gone"), os.O_RDONLY | os.O_DIRECTORY)
    os.rmdir(os.path.join(d, "gone"))
elif kind == "lease":
    fd = os.open(os.path.join(d, "leased"), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.fcntl(fd, 1024, fcntl.F_RDLCK)  # F_SETLEASE
    info["fd"] = fd
elif kind == "hugetlb-memfd":
    info["fd"] = os.memfd_create("huge", os.MFD_HUGETLB)
elif kind == "epoll-orphan":
    ep = select.epoll()
    keep.append(ep)
    r, w = os.pipe()
    ep.register(r, select.EPOLLIN)
    info.update(fd=ep.fileno(), pipe=r)  # the test takes the pipe and we close it
else:
    sys.exit(f"unknown kind {kind}")

print("READY " + json.dumps(info), flush=True)
for line in sys.stdin:
    if line.startswith("close "):
        os.close(int(line.split()[1]))
        print("CLOSED", flush=True)
        continue
    problems.clear()
    try:
        check()
    except Exception as exc:  # a broken fd shows here
        problems.append(f"{type(exc).__name__}: {exc}")
    print("STATE " + ("ok" if not problems else "bad " + "; ".join(problems)), flush=True)
