"""A user with CAP_CHECKPOINT_RESTORE and no other privilege dumps and
restores their own processes (CRIU's --unprivileged); without it, what each
restore mode needs is named in one line (docs/restore.md, "PIDs").

The engine runs as uid 1000 under Debian's /usr/bin/python3 (the venv's
interpreter lives under /root, which that user cannot enter), with this
checkout and the venv's packages on its path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = next((ROOT / ".venv" / "lib").glob("python3.*")) / "site-packages"
PY = "/usr/bin/python3"

SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, time
    sys.path[:0] = [{root!r}, {site!r}]
    import checkpoint
    from checkpoint.errors import CheckpointError
    work = sys.argv[1]
    for exe, mode in (("sleep", "same"), ("tail", "same"), ("sleep", "new"), ("tail", "new")):
        argv = ["sleep", "30"] if exe == "sleep" else ["tail", "-f", "/dev/null"]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(0.2)
        d = os.path.join(work, exe + mode)
        try:
            with checkpoint.Checkpointer(p.pid, d, progress=False) as ck:
                ck.pre_dump()
                ck.dump()
            p.wait()
            r = checkpoint.restore(d, new_pids=mode == "new", inherit_stdio=False)
            same = r.pid == p.pid
            exe_link = os.path.basename(os.readlink(f"/proc/{{r.pid}}/exe"))
            r.kill(); r.wait()
            print(exe, mode, "ok", "same-pid" if same else "new-pid", exe_link, flush=True)
        except CheckpointError as e:
            p.kill(); p.wait()
            print(exe, mode, "refused", str(e).replace(chr(10), " "), flush=True)
""")


@pytest.fixture
def tmp_path():
    """A directory uid 1000 can reach (pytest's own is under a 0700 one)."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="ckpt-unpriv-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run_as_user(tmp_path, caps: bool) -> dict[tuple[str, str], str]:
    work = tmp_path / ("caps" if caps else "plain")
    work.mkdir()
    os.chmod(work, 0o777)
    script = work / "s.py"
    script.write_text(SCRIPT.format(root=str(ROOT), site=str(SITE)))
    os.chmod(script, 0o644)
    argv = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]
    if caps:
        argv += ["--inh-caps", "+checkpoint_restore", "--ambient-caps", "+checkpoint_restore"]
    r = subprocess.run([*argv, PY, str(script), str(work)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        exe, mode, rest = line.split(" ", 2)
        out[(exe, mode)] = rest
    return out


@pytest.fixture(autouse=True)
def _need_a_python_for_others():
    v = subprocess.run([PY, "-c", "import sys; print(sys.version_info[:2])"],
                       capture_output=True, text=True)
    if v.returncode or v.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"needs {PY} of Python {sys.version_info[:2]} for a non-root engine "
                    f"(the venv's interpreter is not reachable by other users): {v.stdout}")
    if subprocess.run(["which", "setpriv"], capture_output=True).returncode:
        pytest.skip("needs setpriv (util-linux)")


def test_with_cap_checkpoint_restore_a_user_dumps_and_restores_its_own(tmp_path):
    out = _run_as_user(tmp_path, caps=True)
    for exe in ("sleep", "tail"):
        assert out[(exe, "same")] == f"ok same-pid {exe}", out
        assert out[(exe, "new")] == f"ok new-pid {exe}", out


def test_without_privilege_what_is_missing_is_named(tmp_path):
    out = _run_as_user(tmp_path, caps=False)
    # the placeholder's own binary needs no exe link change: --new-pids works
    assert out[("sleep", "new")] == "ok new-pid sleep", out
    # the same PIDs need clone3 set_tid; another binary needs the exe link
    assert out[("sleep", "same")].startswith("refused") and \
        "CAP_CHECKPOINT_RESTORE" in out[("sleep", "same")], out
    assert out[("tail", "new")].startswith("refused") and \
        "CAP_CHECKPOINT_RESTORE" in out[("tail", "new")], out
