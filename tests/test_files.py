"""Open files room: dump of real targets, restore into a live placeholder."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import stat
import sys

import pytest

from checkpoint.freezer import freeze
from checkpoint.images.pb import files_pb2
from checkpoint.inject import Injector
from checkpoint.kernel.syscalls import NR, raw_syscall
from checkpoint.objects.files import (RestoreError, UnsupportedObject, dump_files, opt,
                                      restore_files)

TARGETS = os.path.join(os.path.dirname(__file__), "targets")
TARGET = os.path.join(TARGETS, "files_target.py")
PLACEHOLDER = os.path.join(TARGETS, "files_placeholder.py")
PIPE_DATA = bytes((i * 7 + 3) % 256 for i in range(10 * 1024))
STDIO = {"fd0": 0, "fd1": 1, "fd2": 2}  # the placeholder keeps talking to us


def start_target(spawn, d, *cmds):
    t = spawn([sys.executable, TARGET])
    t.send(f"setup {d}\n")
    fds = json.loads(t.expect("ready").split(" ", 1)[1])
    for cmd in cmds:
        t.send(cmd + "\n")
        fds = json.loads(t.expect("ready").split(" ", 1)[1])
    return t, fds


def start_placeholder(spawn, *args):
    p = spawn([sys.executable, PLACEHOLDER, *args])
    p.expect("ready")
    return p


def report(p) -> dict:
    p.send("report\n")
    rep = json.loads(p.expect("report").split(" ", 1)[1])
    rep["fds"] = {int(k): v for k, v in rep["fds"].items()}
    return rep


def dump(pid, **kw) -> files_pb2.FilesEntry:
    with freeze(pid) as proc:
        return dump_files(proc, **kw)


def restore(pid, entry, **kw) -> None:
    with freeze(pid) as proc, Injector(proc) as r:
        restore_files(r, entry, **kw)


def by_fd(entry):
    return {e.fd: e for e in entry.fds}


DETAILS = ("content", "ghost", "external", "kind", "pipe_size", "dup_of", "same_inode_as",
              "memfd_name", "memfd_seals", "pty_master", "pty_index", "extra")


def details(e) -> dict:
    """The typed details an FdEntry carries (the fields set, by name)."""
    return {f.name: v for f, v in e.ListFields() if f.name in DETAILS}


# --------------------------------------------------------------------------
# dump


def test_dump_every_kind(spawn, tmp_path):
    d = str(tmp_path)
    t, fds = start_target(spawn, d)
    entry = dump(t.pid)
    e = by_fd(entry)
    assert entry.pid == t.pid and entry.cwd == d and entry.root == "/"
    assert entry.umask == 0o027

    ro, rw, app = e[fds["ro"]], e[fds["rw"]], e[fds["app"]]
    assert ro.type == files_pb2.FD_REG and ro.path == f"{d}/ro.txt"
    assert ro.pos == 100 and ro.flags & os.O_ACCMODE == os.O_RDONLY and ro.cloexec
    st = os.stat(f"{d}/ro.txt")
    assert (ro.dev, ro.inode, ro.file_size, ro.file_mtime_ns) == (
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    assert stat.S_ISREG(ro.mode)
    assert rw.pos == 200 and rw.flags & os.O_ACCMODE == os.O_RDWR and not rw.cloexec
    assert details(e[fds["rw_dup"]]) == {"dup_of": fds["rw"]}
    assert details(ro) == details(rw) == {} and opt(rw, "dup_of") is None
    assert app.flags & os.O_APPEND and app.flags & os.O_ACCMODE == os.O_WRONLY
    assert app.pos == 16

    ghost = e[fds["ghost"]]
    assert ghost.type == files_pb2.FD_REG and ghost.path == f"{d}/ghost.txt (deleted)"
    assert ghost.ghost and ghost.content == b"ghost content " * 10 and ghost.pos == 5

    pr, pw = e[fds["pipe_r"]], e[fds["pipe_w"]]
    assert pr.type == pw.type == files_pb2.FD_PIPE
    assert pr.pipe_id == pw.pipe_id and pr.path == f"pipe:[{pr.pipe_id}]"
    assert pr.pipe_data == PIPE_DATA and pw.pipe_data == b""
    assert pr.pipe_size == pw.pipe_size == 128 * 1024
    assert pw.flags & os.O_NONBLOCK and pw.flags & os.O_ACCMODE == os.O_WRONLY
    assert e[fds["lone_r"]].pipe_data == b"tail data"

    fr, fw = e[fds["fifo_r"]], e[fds["fifo_w"]]
    assert fr.type == fw.type == files_pb2.FD_FIFO and fr.path == f"{d}/fifo"
    assert fr.pipe_id == fw.pipe_id == os.stat(f"{d}/fifo").st_ino
    assert fr.pipe_data == b"fifo data"

    assert e[fds["swap_w"]].pipe_data == b"swap" and e[fds["swap_r"]].pipe_data == b""
    assert e[fds["opath"]].type == files_pb2.FD_REG and e[fds["opath"]].flags & os.O_PATH
    assert e[fds["null"]].type == files_pb2.FD_DEVNULL and e[fds["null"]].path == "/dev/null"
    m, s = e[fds["pty_m"]], e[fds["pty_s"]]
    assert m.type == s.type == files_pb2.FD_TTY
    assert m.pty_master and not s.pty_master and m.HasField("pty_index")
    assert s.path == f"/dev/pts/{m.pty_index}" and opt(s, "pty_index") == m.pty_index

    mfd = e[fds["memfd"]]
    assert mfd.type == files_pb2.FD_MEMFD and mfd.path == "/memfd:files-test (deleted)"
    assert mfd.memfd_name == "files-test" and mfd.content == b"memfd content" and mfd.pos == 3
    assert mfd.memfd_seals & 0x0002  # F_SEAL_SHRINK

    dr = e[fds["dir"]]
    assert dr.type == files_pb2.FD_DIR and dr.path == d and stat.S_ISDIR(dr.mode)

    # other descriptions of an inode name the first fd; nothing goes to extra
    assert details(e[fds["opath"]]) == {"same_inode_as": fds["ro"]}
    assert opt(fw, "same_inode_as") == fds["fifo_r"] and opt(fr, "same_inode_as") is None
    assert opt(pw, "same_inode_as") == fds["pipe_r"] and not pw.HasField("dup_of")
    assert all(x.extra == b"" for x in entry.fds)

    # tee(2) copied the pipe: the target reads exactly its data, nothing more
    t.send("readpipe\n")
    assert t.expect("pipe") == f"pipe {len(PIPE_DATA)} {hashlib.sha256(PIPE_DATA).hexdigest()}" \
                               " extra 0"


def test_fd_references_keep_fd_0():
    """dup_of / same_inode_as / pty_index use explicit presence: 0 is a value, not "none"."""
    e = files_pb2.FdEntry(fd=5, dup_of=0, same_inode_as=0, pty_index=0)
    back = files_pb2.FdEntry.FromString(e.SerializeToString())
    assert (opt(back, "dup_of"), opt(back, "same_inode_as"), opt(back, "pty_index")) == (0, 0, 0)
    bare = files_pb2.FdEntry.FromString(files_pb2.FdEntry(fd=5).SerializeToString())
    assert (opt(bare, "dup_of"), opt(bare, "same_inode_as"), opt(bare, "pty_index")) == (
        None, None, None)


def test_dump_unsupported(spawn, tmp_path):
    t, fds = start_target(spawn, str(tmp_path), "unsupported")
    sock, efd = fds["sock"], fds["pidfd"]
    with pytest.raises(UnsupportedObject) as exc:
        dump(t.pid)
    link = os.readlink(f"/proc/{t.pid}/fd/{sock}")
    assert str(exc.value).startswith(f"fd {sock} is a socket ({link}): sockets are not")
    assert "--external-fds" in str(exc.value) and exc.value.exit_code == 6
    with pytest.raises(UnsupportedObject, match=rf"fd {efd} is a pidfd \(anon_inode:"):
        dump(t.pid, exclude_fds={sock, sock + 1})

    entry = dump(t.pid, external=True)
    for fd, kind in ((sock, "socket"), (efd, "pidfd")):
        e = by_fd(entry)[fd]
        assert e.type == files_pb2.FD_UNKNOWN and e.path == os.readlink(f"/proc/{t.pid}/fd/{fd}")
        assert e.external and e.kind == kind and e.extra == b""


def test_dump_content_cap(spawn, tmp_path):
    t, fds = start_target(spawn, str(tmp_path))
    with pytest.raises(UnsupportedObject, match=rf"fd {fds['ghost']} is a deleted file .* 140 "):
        dump(t.pid, max_content=100)


# --------------------------------------------------------------------------
# restore


def test_restore_into_placeholder(spawn, tmp_path):
    d = str(tmp_path / "work")
    os.mkdir(d)
    ghosts = tmp_path / "ghosts"
    ghosts.mkdir()
    t, fds = start_target(spawn, d)
    entry = dump(t.pid)
    t.stop()  # as in a real restore: the original is gone (its FIFO empties)

    p = start_placeholder(spawn)
    restore(p.pid, entry, inherit=STDIO, ghost_dir=str(ghosts))
    assert list(ghosts.iterdir()) == []  # ghost files are unlinked once opened
    rep = report(p)
    got = rep["fds"]
    assert rep["cwd"] == d and rep["umask"] == 0o027
    assert set(got) == {e.fd for e in entry.fds}  # the placeholder's own fds are gone
    assert [got[i]["link"] for i in (0, 1, 2)] == [
        os.readlink(f"/proc/{p.pid}/fd/{i}") for i in (0, 1, 2)]

    for e in entry.fds:
        if e.fd > 2:
            assert got[e.fd]["cloexec"] == e.cloexec, e
            assert got[e.fd]["flags"] & ~0o100000 == e.flags & ~0o100000, e
    ro, rw, dup, app = (got[fds[k]] for k in ("ro", "rw", "rw_dup", "app"))
    assert ro["link"] == f"{d}/ro.txt" and ro["pos"] == 100
    assert bytes.fromhex(ro["data"]) == b"r" * 1000
    assert rw["pos"] == dup["pos"] == 200 and not rw["cloexec"] and dup["cloexec"]
    kcmp = raw_syscall(NR["kcmp"], p.pid, p.pid, 0, fds["rw"], fds["rw_dup"])
    assert kcmp == 0  # one open file description again
    assert app["pos"] == 16 and app["flags"] & os.O_APPEND

    ghost = got[fds["ghost"]]
    # a nameless (O_TMPFILE) file in the ghost directory: "#inode (deleted)"
    assert ghost["link"].startswith(f"{ghosts}/#") and ghost["link"].endswith(" (deleted)")
    assert os.listdir(ghosts) == []  # it never had a name there
    assert bytes.fromhex(ghost["data"]) == b"ghost content " * 10 and ghost["pos"] == 5

    pr, pw = got[fds["pipe_r"]], got[fds["pipe_w"]]
    assert pr["link"] == pw["link"] and pr["link"].startswith("pipe:")
    assert bytes.fromhex(pr["data"]) == PIPE_DATA and not pr["hup"]
    assert pr["pipe_size"] == 128 * 1024 and pw["flags"] & os.O_NONBLOCK
    lone = got[fds["lone_r"]]
    assert bytes.fromhex(lone["data"]) == b"tail data" and lone["hup"]  # no writer left

    fr, fw = got[fds["fifo_r"]], got[fds["fifo_w"]]
    assert fr["link"] == fw["link"] == f"{d}/fifo"
    assert bytes.fromhex(fr["data"]) == b"fifo data"

    sr, sw = got[fds["swap_r"]], got[fds["swap_w"]]
    assert sr["link"] == sw["link"] and bytes.fromhex(sr["data"]) == b"swap"
    assert sw["flags"] & os.O_ACCMODE == os.O_WRONLY and sw["cloexec"] is False
    assert got[fds["opath"]]["link"] == f"{d}/ro.txt" and got[fds["opath"]]["flags"] & os.O_PATH
    assert got[fds["null"]]["link"] == "/dev/null"
    m, s = got[fds["pty_m"]], got[fds["pty_s"]]
    assert s["link"] == f"/dev/pts/{m['pty_index']}"  # a new pair, still a pair

    mfd = got[fds["memfd"]]
    assert mfd["link"] == "/memfd:files-test (deleted)" and mfd["pos"] == 3
    assert bytes.fromhex(mfd["data"]) == b"memfd content" and mfd["seals"] & 0x0002
    assert got[fds["dir"]]["link"] == d


def test_restore_refuses_a_replaced_file(spawn, tmp_path):
    d = str(tmp_path)
    t, fds = start_target(spawn, d)
    entry = dump(t.pid)
    os.unlink(f"{d}/rw.txt")
    with open(f"{d}/rw.txt", "wb") as f:
        f.write(b"w" * 1000)
    p = start_placeholder(spawn)
    before = sorted(os.listdir(f"/proc/{p.pid}/fd"))
    with pytest.raises(RestoreError, match=rf"fd {fds['rw']} \({d}/rw.txt\): .* not the file"
                                           r" that was dumped.* inode"):
        restore(p.pid, entry, inherit=STDIO)
    assert sorted(os.listdir(f"/proc/{p.pid}/fd")) == before  # refused before any change


def test_restore_refuses_a_shrunk_file(spawn, tmp_path):
    d = str(tmp_path)
    t, fds = start_target(spawn, d)
    entry = dump(t.pid)
    os.truncate(f"{d}/ro.txt", 50)
    p = start_placeholder(spawn)
    with pytest.raises(RestoreError, match=rf"fd {fds['ro']} .*ro.txt shrank: 50 bytes .* 100"):
        restore(p.pid, entry, inherit=STDIO)


def test_restore_external_fds_need_inherit(spawn, tmp_path):
    t, fds = start_target(spawn, str(tmp_path), "unsupported")
    entry = dump(t.pid, external=True)
    sock, efd = fds["sock"], fds["pidfd"]
    link = by_fd(entry)[sock].path
    p = start_placeholder(spawn)
    with pytest.raises(RestoreError, match=rf"fd {sock} \({re.escape(link)}\): was left external"):
        restore(p.pid, entry, inherit=STDIO)
    # the restorer hands in stand-ins: by link, or by fd number
    others = [e.fd for e in entry.fds if e.external and e.fd != sock]
    assert efd in others
    restore(p.pid, entry, inherit={**STDIO, link: 3, **{f"fd{fd}": 4 for fd in others}})
    got = report(p)["fds"]
    assert {got[fd]["link"] for fd in [sock, *others]} == {"/dev/null"}


def test_restore_keeps_the_placeholders_tty(spawn, tmp_path):
    m1, s1 = pty.openpty()
    m2, s2 = pty.openpty()
    try:
        t, _ = start_target(spawn, str(tmp_path), f"stderr {os.ttyname(s1)}")
        entry = dump(t.pid)
        assert by_fd(entry)[2].type == files_pb2.FD_TTY
        assert by_fd(entry)[2].path == os.ttyname(s1)
        p = start_placeholder(spawn, os.ttyname(s2))
        restore(p.pid, entry, inherit={"fd0": 0, "fd1": 1})
        assert report(p)["fds"][2]["link"] == os.ttyname(s2)
    finally:
        for fd in (m1, s1, m2, s2):
            os.close(fd)


# --------------------------------------------------------------------------
# show


def test_show_prints_the_fd_table(tmp_path, monkeypatch, capsys):
    from checkpoint import cli
    from checkpoint.images.pb import pstree_pb2
    from checkpoint.images.writer import LayerWriter, LocalSink

    files = files_pb2.FilesEntry(pid=7, cwd="/", root="/", umask=0o22, fds=[
        files_pb2.FdEntry(fd=0, type=files_pb2.FD_DEVNULL, path="/dev/null"),
        files_pb2.FdEntry(fd=3, type=files_pb2.FD_REG, path="/etc/hosts", pos=12,
                          flags=os.O_RDWR | os.O_APPEND),
        files_pb2.FdEntry(fd=4, type=files_pb2.FD_REG, path="/etc/hosts", dup_of=3),
        files_pb2.FdEntry(fd=5, type=files_pb2.FD_UNKNOWN, path="socket:[9]", external=True,
                          kind="socket")])
    d = tmp_path / "img"
    with LayerWriter(LocalSink(d, 0), index=0, kind="dump", tracker="full") as w:
        w.add_record("pstree", pstree_pb2.PstreeEntry(pid=7, ppid=1, threads=[7]))
        w.add_record("files", files)
        w.add_pages(7, 0x10000, memoryview(b"x" * 4096))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["checkpoint.commands.images"])

    assert cli.main(["show", "-D", str(d), "--json"]) == 0
    proc = json.loads(capsys.readouterr().out)["processes"][0]
    assert proc["pid"] == 7 and proc["fds"] == [
        {"fd": 0, "type": "devnull", "path": "/dev/null", "pos": 0, "flags": 0},
        {"fd": 3, "type": "reg", "path": "/etc/hosts", "pos": 12,
         "flags": os.O_RDWR | os.O_APPEND},
        {"fd": 4, "type": "reg", "path": "/etc/hosts", "pos": 0, "flags": 0},
        {"fd": 5, "type": "unknown", "path": "socket:[9]", "pos": 0, "flags": 0}]

    assert cli.main(["show", "-D", str(d)]) == 0       # the summary counts them
    assert "4 fds" in capsys.readouterr().out
    assert cli.main(["show", "-D", str(d), "--files"]) == 0
    out = capsys.readouterr().out
    assert "process 7 fds:" in out
    assert re.search(r"fd +3 reg +pos 12 +flags 0o2002 /etc/hosts", out)
