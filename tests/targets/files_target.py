"""A target holding one fd of every kind the files room knows, driven over stdin.

"setup DIR"  -> opens everything under DIR, chdir DIR, umask 027;
                prints "ready {json: name -> fd}" (+ "data" keys, hex)
"unsupported" -> also opens two packet sockets and a pidfd; prints "ready {json}"
"stderr TTY" -> puts fd 2 on the tty TTY; prints "ready {json}"
"readpipe"   -> reads the pipe's 10 KiB; prints "pipe <len> <sha256>"
"""
import fcntl
import hashlib
import json
import os
import socket
import sys

PIPE_DATA = bytes((i * 7 + 3) % 256 for i in range(10 * 1024))
fds: dict[str, int] = {}
keep = []


def setup(d: str) -> None:
    def write(name, data):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)

    write("ro.txt", b"r" * 1000)
    write("rw.txt", b"w" * 1000)
    write("app.txt", b"a" * 10)
    fds["ro"] = os.open(os.path.join(d, "ro.txt"), os.O_RDONLY)
    os.lseek(fds["ro"], 100, os.SEEK_SET)
    fds["rw"] = os.open(os.path.join(d, "rw.txt"), os.O_RDWR)
    os.lseek(fds["rw"], 200, os.SEEK_SET)
    os.set_inheritable(fds["rw"], True)  # no O_CLOEXEC
    fds["rw_dup"] = os.dup(fds["rw"])  # shares the description (and offset)
    fds["app"] = os.open(os.path.join(d, "app.txt"), os.O_WRONLY | os.O_APPEND)
    os.write(fds["app"], b"append")
    fds["ghost"] = os.open(os.path.join(d, "ghost.txt"), os.O_RDWR | os.O_CREAT, 0o640)
    os.write(fds["ghost"], b"ghost content " * 10)
    os.lseek(fds["ghost"], 5, os.SEEK_SET)
    os.unlink(os.path.join(d, "ghost.txt"))
    fds["pipe_r"], fds["pipe_w"] = os.pipe()
    fcntl.fcntl(fds["pipe_w"], fcntl.F_SETPIPE_SZ, 128 * 1024)
    os.set_blocking(fds["pipe_w"], False)
    os.write(fds["pipe_w"], PIPE_DATA)
    r2, w2 = os.pipe()
    os.write(w2, b"tail data")
    os.close(w2)
    fds["lone_r"] = r2  # a read end whose write end nobody holds
    a, b = os.pipe()
    fds["swap_r"] = os.dup(a)  # a pipe whose write end has the lower number
    os.dup2(b, a)
    os.close(b)
    fds["swap_w"] = a
    os.write(a, b"swap")
    fds["opath"] = os.open(os.path.join(d, "ro.txt"), os.O_PATH)
    os.mkfifo(os.path.join(d, "fifo"))
    fds["fifo_r"] = os.open(os.path.join(d, "fifo"), os.O_RDONLY | os.O_NONBLOCK)
    fds["fifo_w"] = os.open(os.path.join(d, "fifo"), os.O_WRONLY)
    os.write(fds["fifo_w"], b"fifo data")
    fds["null"] = os.open("/dev/null", os.O_WRONLY)
    fds["pty_m"], fds["pty_s"] = os.openpty()
    fds["memfd"] = os.memfd_create("files-test", os.MFD_ALLOW_SEALING)
    os.write(fds["memfd"], b"memfd content")
    os.lseek(fds["memfd"], 3, os.SEEK_SET)
    fcntl.fcntl(fds["memfd"], fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    fds["dir"] = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.chdir(d)
    os.umask(0o027)


def main() -> None:
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "setup":
            setup(args[0])
            print("ready " + json.dumps(fds), flush=True)
        elif cmd == "unsupported":
            # packet sockets: still refused (unix, netlink and idle TCP ones are restored)
            a, b = (socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) for _ in range(2))
            keep.extend([a, b])
            fds["sock"] = a.fileno()
            fds["pidfd"] = os.pidfd_open(os.getpid())  # still unsupported (eventfd is not)
            print("ready " + json.dumps(fds), flush=True)
        elif cmd == "stderr":  # put fd 2 on the tty args[0]
            tty = os.open(args[0], os.O_RDWR | os.O_NOCTTY)
            os.dup2(tty, 2)
            os.close(tty)
            print("ready " + json.dumps(fds), flush=True)
        elif cmd == "readpipe":
            got = b""
            while len(got) < len(PIPE_DATA):
                got += os.read(fds["pipe_r"], len(PIPE_DATA) - len(got))
            os.set_blocking(fds["pipe_r"], False)
            try:
                extra = os.read(fds["pipe_r"], 65536)
            except BlockingIOError:
                extra = b""
            print(f"pipe {len(got)} {hashlib.sha256(got).hexdigest()} extra {len(extra)}",
                  flush=True)


if __name__ == "__main__":
    main()
