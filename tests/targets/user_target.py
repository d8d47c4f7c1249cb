"""A target meant to run as an unprivileged user (uid 1000), driven over stdin.

argv[1]: a directory it owns. It opens there: own.txt (O_RDWR, "mine"), a
FIFO (both ends, 9 bytes unread), a set-uid copy of /usr/bin/id that it then
unlinks (a deleted set-uid file held open), and /dev/null.
Prints "READY {json: name -> fd}".

"check"     -> "CHECK euid=E own=<own.txt content> fifo=<unread FIFO data>"
"exec NAME" -> runs the fd NAME (/proc/self/fd/N) with -u: "EUID <its euid>"
"""
import json
import os
import shutil
import subprocess
import sys

d = sys.argv[1]
fds = {}
with open(os.path.join(d, "own.txt"), "wb") as f:
    f.write(b"mine")
fds["own"] = os.open(os.path.join(d, "own.txt"), os.O_RDWR)
os.mkfifo(os.path.join(d, "fifo"), 0o600)
fds["fifo_r"] = os.open(os.path.join(d, "fifo"), os.O_RDONLY | os.O_NONBLOCK)
fds["fifo_w"] = os.open(os.path.join(d, "fifo"), os.O_WRONLY)
os.write(fds["fifo_w"], b"fifo data")
copy = os.path.join(d, "idcopy")
shutil.copyfile("/usr/bin/id", copy)
os.chmod(copy, 0o4755)
fds["suid"] = os.open(copy, os.O_RDONLY)
os.unlink(copy)
fds["null"] = os.open("/dev/null", os.O_WRONLY)
print("READY", json.dumps(fds), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "check":
        own = os.pread(fds["own"], 100, 0).decode()
        try:
            fifo = os.read(fds["fifo_r"], 100).decode()
        except BlockingIOError:
            fifo = ""
        print(f"CHECK euid={os.geteuid()} own={own} fifo={fifo}", flush=True)
    elif cmd[0] == "exec":
        res = subprocess.run([f"/proc/self/fd/{fds[cmd[1]]}", "-u"], capture_output=True,
                             text=True, pass_fds=(fds[cmd[1]],))
        print("EUID", res.stdout.strip() or f"failed:{res.returncode}:{res.stderr.strip()}",
              flush=True)
    elif cmd[0] == "quit":
        break
