"""Established TCP connections: dumped through TCP_REPAIR under the network
lock (--tcp-established), restored on the same host while their peer (the
test) keeps streaming through them; --tcp-close; refusal by name; the lock
never left behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.errors import UnsupportedObject
from checkpoint.restorer import restore
from tcp_helpers import ECHO_SERVER, Streamer, our_tables
from test_dump_restore import Channel, reaper  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="TCP_REPAIR needs CAP_NET_ADMIN")


@pytest.fixture(autouse=True)
def no_lock_left():
    before = set(our_tables())
    yield
    assert set(our_tables()) - before == set(), "a network lock was left behind"


def _echo(reaper, family="4", host="127.0.0.1"):
    ch = Channel()
    p = ch.popen([sys.executable, "-c", ECHO_SERVER, family, host])
    reaper.append(p.pid)
    port = int(ch.expect("READY").split()[1])
    fam = socket.AF_INET6 if family == "6" else socket.AF_INET
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.connect((host, port))
    return ch, p, Streamer(c)


@pytest.mark.parametrize("family,host", [("4", "127.0.0.1"), ("6", "::1")])
def test_connection_survives_dump_kill_restore(tmp_path, reaper, family, host):
    """A client streams through an echo server while the server is dumped
    (killed) and restored: the client sees no error and no reset, every
    byte comes back once, in order; the server's queues (unread input,
    unsent output) were carried over; no lock is left."""
    ch, p, st = _echo(reaper, family, host)
    st.progress(1 << 20)
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img", tcp="established") as ck:
        ck.dump()
    p.wait(10)
    assert our_tables(), "the dump's lock should hold until the restore"
    sent_at_dump = st.sent
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    assert our_tables() == [], "the restore releases the lock"
    st.progress(2 << 20)
    assert st.sent > sent_at_dump
    total = st.finish()
    assert ch.expect("EOF") == f"EOF {total} 1"
    r.wait(10)
    ch.close()


def test_refused_by_name_without_an_option(tmp_path, reaper):
    """Without --tcp-established or --tcp-close the dump fails naming the
    connection and both options; the server and its client go on."""
    ch, p, st = _echo(reaper)
    st.progress(1 << 16)
    with pytest.raises(UnsupportedObject) as ei:
        with Checkpointer(p.pid, tmp_path / "img") as ck:
            ck.dump()
    msg = str(ei.value)
    assert "TCP connection" in msg and "127.0.0.1:" in msg and "ESTABLISHED" in msg
    assert "--tcp-established" in msg and "--tcp-close" in msg
    st.progress(1 << 20)
    total = st.finish()
    assert ch.expect("EOF") == f"EOF {total} 1"
    ch.close()


def test_leave_running_and_a_failed_dump_give_the_connection_back(tmp_path, reaper):
    """dump -R with --tcp-established, and a dump that fails after the
    connection was repaired (a post-dump action script exits 1): the
    connection leaves repair mode, its lock goes, the stream goes on."""
    ch, p, st = _echo(reaper)
    st.progress(1 << 18)
    with Checkpointer(p.pid, tmp_path / "img", tcp="established") as ck:
        ck.dump(leave_running=True)
    assert our_tables() == []
    st.progress(1 << 20)
    fail = tmp_path / "fail.sh"
    fail.write_text('#!/bin/sh\n[ "$CHECKPOINT_ACTION" != post-dump ]\n')
    fail.chmod(0o700)
    with pytest.raises(Exception, match="post-dump"):
        with Checkpointer(p.pid, tmp_path / "img2", tcp="established",
                          action_scripts=[str(fail)]) as ck:
            ck.dump()
    assert our_tables() == []
    st.progress(1 << 20)
    total = st.finish()
    assert ch.expect("EOF") == f"EOF {total} 1"
    ch.close()


CLOSE_SERVER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # the closed connection lingers
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print("READY", srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.recv(10)
print("CONNECTED", flush=True)
sys.stdin.readline()
try:
    conn.sendall(b"x")
    print("SENT", flush=True)
except OSError as exc:
    print("ERR", exc.errno, flush=True)
"""


def test_tcp_close_restores_it_closed(tmp_path, reaper):
    """--tcp-close: no lock, no repair; the restored program holds a
    socket that is not connected (a write fails: EPIPE or ENOTCONN)."""
    import errno
    ch = Channel()
    p = ch.popen([sys.executable, "-c", CLOSE_SERVER])
    reaper.append(p.pid)
    port = int(ch.expect("READY").split()[1])
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"hi")
    ch.expect("CONNECTED")
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img", tcp="close") as ck:
        ck.dump()
    p.wait(10)
    assert our_tables() == []
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    ch.send("go\n")
    assert ch.expect("ERR") in (f"ERR {errno.EPIPE}", f"ERR {errno.ENOTCONN}")
    c.close()
    r.wait(10)
    ch.close()


def test_cli_names_the_options(tmp_path, reaper):
    ch, p, st = _echo(reaper)
    st.progress(1 << 16)
    exe = os.path.join(os.path.dirname(sys.executable), "checkpoint")
    res = subprocess.run([exe, "dump", "-t", str(p.pid), "-D", str(tmp_path / "img")],
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "--tcp-established" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    st.progress(1 << 18)
    st.finish()
    ch.close()
