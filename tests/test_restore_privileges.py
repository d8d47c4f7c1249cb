"""A restore never grants more than the caller has, nor more than the dumped
process had: real unprivileged targets dumped and restored by root, images
hand-edited through the image API, a target that proves its own security
state (capabilities, bounding set, ambient, securebits, no_new_privs,
seccomp, parent-death signal) after dump -> kill -> restore."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.errors import RestoreError
from checkpoint.freezer import freeze
from checkpoint.images import open_chain
from checkpoint.images.pb import files_pb2
from checkpoint.kernel import procfs
from checkpoint.objects.threads import seccomp_filters
from checkpoint.restorer import restore
from conftest import build_target, proc_state, tracer_of
from image_edit import edited_copy, one
from test_dump_restore import Channel, _children

TARGETS = os.path.join(os.path.dirname(__file__), "targets")
USER = 1000
AS_USER = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]
CLI = [sys.executable, "-m", "checkpoint"]


@pytest.fixture
def reaper():
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


@pytest.fixture
def userdir():
    """A directory under /tmp owned by the unprivileged user (pytest's
    tmp_path is root's 0700)."""
    d = tempfile.mkdtemp(prefix="ck-user-", dir="/tmp")
    os.chown(d, USER, USER)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def secret(tmp_path):
    """A root-only file, and its content to check it was not touched."""
    d = tempfile.mkdtemp(prefix="ck-root-", dir="/tmp")
    os.chmod(d, 0o755)
    path = os.path.join(d, "secret")
    with open(path, "wb") as f:
        f.write(b"root only\n")
    os.chmod(path, 0o600)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def user_python() -> str:
    """A Python the unprivileged user may open (the restore reopens every
    mapped file as that user; a pyenv build under root's 0700 home is not)."""
    for exe in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        if exe and os.path.exists(exe) and subprocess.run(
                [*AS_USER, "sh", "-c", f"test -r {os.path.realpath(exe)}"]).returncode == 0:
            return exe
    pytest.skip(f"no Python readable by uid {USER} here: the unprivileged target cannot run")


def start_user_target(userdir, reaper):
    ch = Channel()
    p = ch.popen([*AS_USER, user_python(), "-S", os.path.join(TARGETS, "user_target.py"),
                  userdir])
    reaper.append(p.pid)
    fds = json.loads(ch.expect("READY").split(" ", 1)[1])
    assert procfs.read_status(p.pid).uid == (USER,) * 4
    return p, ch, fds


def dump_and_kill(p, images) -> None:
    with Checkpointer(p.pid, images) as ck:
        ck.dump()
    p.wait(10)
    assert proc_state(p.pid) == ""


def fd_entry(records, fd: int):
    return [e for e in one(records, "files").fds if e.fd == fd][0]


def assert_refused_cleanly(images, pid: int, match: str) -> None:
    """Library: RestoreError and no process left; CLI: one line, exit 7."""
    before = _children()
    with pytest.raises(RestoreError, match=match):
        restore(images, stdio="null")
    assert _children() == before and proc_state(pid) == ""
    res = subprocess.run([*CLI, "restore", "-D", images, "--stdio", "null"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 7, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("checkpoint: error: "), \
        res.stderr
    assert proc_state(pid) == ""


# --------------------------------------------------------------------------
# opening on the restored process's behalf


def test_unprivileged_process_comes_back_unprivileged(userdir, reaper, tmp_path):
    """The control: an unedited image of a uid-1000 process restores, with
    its uids, its files, its FIFO data; the restored process is its user's
    (dumpable again: /proc/PID is the user's)."""
    p, ch, fds = start_user_target(userdir, reaper)
    inherit = ch.inherit(p.pid)
    dump_and_kill(p, tmp_path / "img")
    r = restore(tmp_path / "img", inherit=inherit, inherit_stdio=False)
    reaper.append(r.pid)
    st = procfs.read_status(r.pid)
    assert st.uid == (USER,) * 4 and st.gid == (USER,) * 4 and st.cap_eff == 0
    assert os.stat(f"/proc/{r.pid}").st_uid == USER  # dumpable as it was
    assert ch.ask("check", "CHECK") == f"CHECK euid={USER} own=mine fifo=fifo data"
    ch.close()


@pytest.mark.parametrize("kind", ["regular", "fifo-with-data"])
def test_edited_fd_cannot_reach_a_root_only_file(userdir, secret, reaper, tmp_path, kind):
    """An fd entry edited to name a root-only file (its real device and
    inode, so only the open itself can stop it): opened as the dumped uid
    it is refused; as a FIFO with pipe data it is refused before anything
    is written; the file is untouched and nothing is left running."""
    p, ch, fds = start_user_target(userdir, reaper)
    dump_and_kill(p, tmp_path / "img")
    st = os.stat(secret)

    def edit(records):
        e = fd_entry(records, fds["own"] if kind == "regular" else fds["fifo_r"])
        e.path, e.dev, e.inode = secret, st.st_dev, st.st_ino
        e.file_size, e.file_mtime_ns = st.st_size, st.st_mtime_ns
        if kind == "fifo-with-data":
            e.pipe_data = b"written by the restore\n"
            e.flags = os.O_WRONLY  # and the image says: a FIFO's write end
    edited = edited_copy(tmp_path / "img", tmp_path / "edited", edit)
    match = "Permission denied" if kind == "regular" else "is a regular file, the image says FD_FIFO"
    assert_refused_cleanly(edited, p.pid, match)
    with open(secret, "rb") as f:
        assert f.read() == b"root only\n"
    assert os.stat(secret).st_mtime_ns == st.st_mtime_ns
    ch.close()


def test_edited_fifo_entry_also_refused_as_its_own_user(userdir, reaper, tmp_path):
    """The type check does not depend on permissions: a FIFO entry naming a
    regular file the user may write is refused too (nothing written)."""
    p, ch, fds = start_user_target(userdir, reaper)
    dump_and_kill(p, tmp_path / "img")
    own = os.path.join(userdir, "own.txt")
    st = os.stat(own)

    def edit(records):
        e = fd_entry(records, fds["fifo_w"])
        e.path, e.dev, e.inode = own, st.st_dev, st.st_ino
        e.pipe_data = b"XXXX"
    edited = edited_copy(tmp_path / "img", tmp_path / "edited", edit)
    assert_refused_cleanly(edited, p.pid, "is a regular file, the image says FD_FIFO")
    with open(own, "rb") as f:
        assert f.read() == b"mine"
    ch.close()


def test_edited_vma_cannot_map_shadow(userdir, reaper, tmp_path):
    """A file VMA edited to map /etc/shadow (identity, size and mtime made
    to match, so the pre-checks pass): mapping it as the dumped uid fails."""
    if not os.path.exists("/etc/shadow") or os.stat("/etc/shadow").st_mode & 0o004:
        pytest.skip("no root-only /etc/shadow on this machine")
    p, ch, fds = start_user_target(userdir, reaper)
    dump_and_kill(p, tmp_path / "img")
    st = os.stat("/etc/shadow")

    def edit(records):
        mm = one(records, "mm")
        v = next(v for v in mm.vmas if v.path.endswith(".so") or ".so." in v.path)
        v.path, v.dev, v.inode = "/etc/shadow", st.st_dev, st.st_ino
        v.file_size, v.file_mtime_ns = st.st_size, st.st_mtime_ns
    edited = edited_copy(tmp_path / "img", tmp_path / "edited", edit)
    assert_refused_cleanly(edited, p.pid, "mapped file /etc/shadow as the dumped process"
                                          ".*Permission denied")
    ch.close()


def test_edited_devnull_entry_cannot_open_another_device(userdir, reaper, tmp_path):
    """/dev/null & co. are reopened only if they are null, zero, full,
    random or urandom: an entry naming /dev/mem, /dev/port or /dev/kmsg
    (the same driver) is refused before it is opened."""
    p, ch, fds = start_user_target(userdir, reaper)
    dump_and_kill(p, tmp_path / "img")

    dev = next((d for d in ("/dev/mem", "/dev/port", "/dev/kmsg") if os.path.exists(d)
                and os.major(os.stat(d).st_rdev) == 1), None)
    if dev is None:
        pytest.skip("no /dev/mem, /dev/port or /dev/kmsg here")

    def edit(records):
        e = fd_entry(records, fds["null"])
        e.path, e.rdev = dev, os.stat(dev).st_rdev
    edited = edited_copy(tmp_path / "img", tmp_path / "edited", edit)
    assert_refused_cleanly(edited, p.pid, "is not /dev/null, zero, full, random or urandom")
    ch.close()


def test_symlink_planted_at_a_dumped_path_is_not_followed(userdir, secret, reaper, tmp_path):
    """The user replaces its own file by a symlink to a root-only file
    between dump and restore: the restore does not follow it."""
    p, ch, fds = start_user_target(userdir, reaper)
    dump_and_kill(p, tmp_path / "img")
    own = os.path.join(userdir, "own.txt")
    os.unlink(own)
    os.symlink(secret, own)
    # (the symlink may even reuse the freed inode number: then its type gives it away)
    assert_refused_cleanly(tmp_path / "img", p.pid,
                           "is not the file that was dumped|is a symbolic link, the image says")
    ch.close()


# --------------------------------------------------------------------------
# deleted set-uid files


@pytest.mark.parametrize("claim_root", [False, True])
def test_deleted_setuid_copy_does_not_come_back_setuid_root(userdir, reaper, tmp_path,
                                                            claim_root):
    """A uid-1000 process holding an unlinked set-uid copy of id(1): after a
    root dump and restore the ghost belongs to uid 1000 (set-uid 1000 is
    what it was), exec'ing it gives euid 1000, never 0. With the image
    edited to claim the file was root's, it is not set-uid at all."""
    p, ch, fds = start_user_target(userdir, reaper)
    assert ch.ask("exec suid", "EUID") == f"EUID {USER}"
    inherit = ch.inherit(p.pid)
    dump_and_kill(p, tmp_path / "img")
    images = tmp_path / "img"
    with open_chain(images) as chain:
        e = [e for e in one(dict(_group(chain.records())), "files").fds
             if e.fd == fds["suid"]][0]
    assert e.ghost and e.has_owner and (e.uid, e.gid) == (USER, USER)
    assert stat.S_IMODE(e.mode) == 0o4755
    if claim_root:
        def edit(records):
            g = fd_entry(records, fds["suid"])
            g.uid = g.gid = 0
        images = edited_copy(images, tmp_path / "edited", edit)
    r = restore(images, inherit=inherit, inherit_stdio=False)
    reaper.append(r.pid)
    st = os.stat(f"/proc/{r.pid}/fd/{fds['suid']}")
    assert st.st_uid == USER and st.st_nlink == 0
    assert not (st.st_mode & stat.S_ISUID and st.st_uid == 0)
    if claim_root:
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID)
    else:
        assert stat.S_IMODE(st.st_mode) == 0o4755  # exactly what it was: set-uid 1000
    assert ch.ask("exec suid", "EUID") == f"EUID {USER}"
    ch.close()


def _group(pairs):
    out: dict = {}
    for kind, msg in pairs:
        out.setdefault(kind, []).append(msg)
    return out.items()


# --------------------------------------------------------------------------
# credentials validation


@pytest.fixture
def sleeper_image(tmp_path, reaper):
    p = subprocess.Popen(["sleep", "30"])
    reaper.append(p.pid)
    time.sleep(0.1)
    dump_and_kill(p, tmp_path / "img")
    return p.pid, tmp_path / "img"


def _set(field):
    def edit(records):
        field(one(records, "process"), records)
    return edit


EDITS = {
    "no uids": (lambda p, r: p.creds.ClearField("uid"), "process.creds.uid: 0 values"),
    "short uids": (lambda p, r: (p.creds.ClearField("uid"), p.creds.uid.extend([1000])),
                   "process.creds.uid: 1 values"),
    "three gids": (lambda p, r: p.creds.gid.pop(), "process.creds.gid: 3 values"),
    "uid -1": (lambda p, r: p.creds.uid.__setitem__(1, 0xFFFFFFFF), "process.creds.uid: holds"),
    "too many groups": (lambda p, r: p.creds.groups.extend(range(65537)),
                        "process.creds.groups: 65537 groups"),
    "unknown cap": (lambda p, r: setattr(p.creds, "cap_eff", 1 << 63),
                    "process.creds.cap_eff: bits"),
    "eff not permitted": (lambda p, r: (setattr(p.creds, "cap_prm", 0),
                                        setattr(p.creds, "cap_eff", 1)),
                          "process.creds.cap_eff: CAP_CHOWN effective but not permitted"),
    "rlimit soft above hard": (lambda p, r: (setattr(p.rlimits[0], "cur", 10),
                                             setattr(p.rlimits[0], "max", 5)),
                               "process.rlimits: resource 0: soft limit 10 above"),
    "rlimit twice": (lambda p, r: p.rlimits.add(resource=p.rlimits[0].resource),
                     "process.rlimits: resource 0 given twice"),
    "personality": (lambda p, r: setattr(p, "personality", 0x77), "process.personality"),
    "pdeath signal": (lambda p, r: setattr(p, "pdeath_signal", 99), "process.pdeath_signal"),
    "seccomp mode": (lambda p, r: setattr(r["core"][0], "seccomp_mode", 7),
                     "seccomp mode 7 is none of"),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_bad_credentials_fail_before_anything_starts(sleeper_image, tmp_path, name):
    pid, images = sleeper_image
    fn, match = EDITS[name]
    edited = edited_copy(images, tmp_path / "edited", _set(fn))
    assert_refused_cleanly(edited, pid, match)


def test_seccomp_user_notification_filter_is_refused(sleeper_image, tmp_path):
    pid, images = sleeper_image
    import struct

    def edit(records):
        core = records["core"][0]
        core.seccomp_mode = 2
        core.seccomp_filters.add(insns=struct.pack("<HBBI", 0x06, 0, 0, 0x7FC00000))
    edited = edited_copy(images, tmp_path / "edited", edit)
    assert_refused_cleanly(edited, pid, "returns SECCOMP_RET_USER_NOTIF")


# --------------------------------------------------------------------------
# capabilities, bounding set, ambient, securebits, no_new_privs, seccomp


def _start_privs(reaper):
    ch = Channel()
    p = ch.popen([build_target("privs_target")])
    reaper.append(p.pid)
    line = ch.expect("READY")
    return p, ch, int(line.split()[1])


def test_security_state_comes_back_exactly(reaper, tmp_path):
    p, ch, tid2 = _start_privs(reaper)
    assert ch.ask("check", "CHECK") == "CHECK ok"
    with freeze(p.pid):
        want_filters = {t: seccomp_filters(t) for t in (p.pid, tid2)}
    want_status = {t: _sec_status(p.pid, t) for t in (p.pid, tid2)}
    assert want_status[p.pid]["CapEff"] == "0000000000000420"  # KILL, NET_BIND_SERVICE
    assert want_status[tid2]["Seccomp_filters"] == "2"
    inherit = ch.inherit(p.pid)
    dump_and_kill(p, tmp_path / "img")
    r = restore(tmp_path / "img", inherit=inherit, inherit_stdio=False)
    reaper.append(r.pid)
    assert tracer_of(r.pid) == 0
    assert ch.ask("check", "CHECK") == "CHECK ok"  # the program's own verdict
    for t in (p.pid, tid2):  # every thread, as the kernel shows it
        assert _sec_status(r.pid, t) == want_status[t]
    with freeze(r.pid):
        for t in (p.pid, tid2):  # the same programs, in the same order, same flags
            assert seccomp_filters(t) == want_filters[t]
    ch.send("quit\n")
    assert r.wait(10) == 0
    ch.close()


def _sec_status(pid: int, tid: int) -> dict:
    raw = procfs.read_status(pid, tid).raw
    return {k: raw.get(k) for k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff",
                                    "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
                                    "Seccomp_filters")}


def test_a_capability_the_caller_lacks_is_refused_by_name(reaper, tmp_path):
    """A restorer without CAP_NET_BIND_SERVICE (dropped from its bounding
    set) refuses an image whose process had it, naming it."""
    p, ch, _ = _start_privs(reaper)
    dump_and_kill(p, tmp_path / "img")
    res = subprocess.run(["setpriv", "--bounding-set=-net_bind_service", *CLI, "restore",
                          "-D", tmp_path / "img", "--no-inherit-stdio"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 7, res.stderr
    assert res.stderr.count("\n") == 1 and "CAP_NET_BIND_SERVICE" in res.stderr, res.stderr
    assert proc_state(p.pid) == ""
    ch.close()


def test_root_that_dropped_every_capability_gets_none_back(reaper, tmp_path):
    """A root process (uid 0) with empty capability sets comes back with
    empty sets, still uid 0."""
    ch = Channel()
    p = ch.popen(["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                  sys.executable, "-c",
                  "import os,sys; print('READY', flush=True); sys.stdin.readline();"
                  "print('CAPS', open('/proc/self/status').read().split('CapEff:')[1].split()[0],"
                  " os.geteuid(), flush=True)"])
    reaper.append(p.pid)
    ch.expect("READY")
    st = procfs.read_status(p.pid)
    assert st.uid == (0,) * 4 and st.cap_eff == 0
    inherit = ch.inherit(p.pid)
    dump_and_kill(p, tmp_path / "img")
    r = restore(tmp_path / "img", inherit=inherit, inherit_stdio=False)
    reaper.append(r.pid)
    assert _sec_status(r.pid, r.pid)["CapBnd"] == "0000000000000000"
    assert ch.ask("go", "CAPS") == "CAPS 0000000000000000 0"
    assert r.wait(10) == 0
    ch.close()


def test_strict_seccomp_is_restored(tmp_path, reaper):
    """Strict mode (its dump needs a freezer that suspends seccomp, see
    docs/restore.md): the image of a plain program edited to strict mode
    restores into a thread that may only read and write: it echoes, and
    dies of SIGKILL at its next other syscall."""
    prog = ("import os\n"
            "os.write(1, b'READY\\n')\n"
            "while True:\n"
            "    line = os.read(0, 100)\n"
            "    if line.startswith(b'pid'):\n"
            "        os.getpid()\n"
            "    os.write(1, b'ECHO ' + line)\n")
    ch = Channel()
    p = ch.popen([sys.executable, "-S", "-c", prog])
    reaper.append(p.pid)
    ch.expect("READY")
    inherit = ch.inherit(p.pid)
    dump_and_kill(p, tmp_path / "img")

    def edit(records):
        for core in records["core"]:
            core.seccomp_mode = 1
    edited = edited_copy(tmp_path / "img", tmp_path / "edited", edit)
    with open_chain(edited) as chain:
        assert len([1 for k, _ in chain.records() if k == "core"]) == 1  # one thread only
    r = restore(edited, inherit=inherit, inherit_stdio=False)
    reaper.append(r.pid)
    assert procfs.read_status(r.pid).raw["Seccomp"] == "1"
    assert ch.ask("hello", "ECHO") == "ECHO hello"
    ch.send("pid\n")
    assert r.wait(10) == -signal.SIGKILL
    ch.close()
