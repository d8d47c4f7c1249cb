#!/usr/bin/env python3
"""Run one command in a throwaway VM booted from Debian's 6.12 kernel (stdlib only).

    python3 tools/qemu/vm.py status
    python3 tools/qemu/vm.py run [--timeout S] [--cwd DIR] [--env K=V]... [--out DIR] -- CMD...

The guest's root is this machine's / shared read-only over 9p (every host
path, the checkout, its venv and pyenv are where they are on the host), with
tmpfs on /tmp, /run, /var/tmp and /dev/shm. The command runs as root with
/bin/sh in CWD (default: the current directory), HOME=/tmp,
CHECKPOINT_IN_VM=1 and the --env pairs; its stdout and stderr are copied to
this process's stdout as they come. The run directory (--out, default a new
folder under /tmp removed afterwards) is shared read-write at its host path:
files written there inside the guest are kept.

Exit status: the command's; 124 on timeout (the VM is killed); 125 when the
VM broke before the command finished (the console log is printed).
Software emulation only (-accel tcg): KVM on this kind of host hangs.
Prepared by tools/qemu/setup.sh; the cache folder is $CHECKPOINT_QEMU_CACHE,
default <repo>/.qemu.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"


def cache_dir() -> Path:
    return Path(os.environ.get("CHECKPOINT_QEMU_CACHE") or REPO / ".qemu")


def status(booted: bool = True) -> str | None:
    """None when a VM can be started (and, with ``booted``, setup's smoke
    boot passed), else why not. Never installs anything."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (run tools/qemu/setup.sh)"
    c = cache_dir()
    for name in ("ready", "vmlinuz", "initrd.img", "booted")[:4 if booted else 3]:
        if not (c / name).exists():
            return f"VM not prepared: {c / name} missing (run tools/qemu/setup.sh)"
    return None


def qemu_argv(out: Path, timeout_s: float) -> list[str]:
    c = cache_dir()
    for bad in (",", " "):
        for p in (out, REPO):
            if bad in str(p):
                raise ValueError(f"directory {str(p)!r} must not contain {bad!r} (qemu -virtfs)")
    append = " ".join([
        "console=ttyS0", *os.environ.get("CHECKPOINT_QEMU_APPEND", "quiet loglevel=4").split(), "panic=-1", "tsc=reliable",
        "transparent_hugepage=madvise",  # as on the host: exact per-page counts
        f"vmout={out}",
        f"vmrepo={REPO}",
    ])
    return [
        QEMU, "-accel", "tcg", "-cpu", os.environ.get("CHECKPOINT_QEMU_CPU", "max"), "-smp", "2", "-m", "2G",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{out}/console.log",
        "-kernel", str(c / "vmlinuz"), "-initrd", str(c / "initrd.img"),
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={out},mount_tag=vmout,security_model=none",
        # the repository again, read-only at its own path: a clone under /tmp
        # would otherwise be hidden by the guest's tmpfs on /tmp
        "-virtfs", f"local,path={REPO},mount_tag=vmrepo,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-append", append,
    ]


def run(cmd: list[str], *, timeout: float = 150, cwd: str | None = None,
        env: dict[str, str] | None = None, out: str | Path | None = None,
        stream=None) -> int:
    """Run ``cmd`` in a VM; returns its exit status (124 timeout, 125 broken VM)."""
    stream = stream or sys.stdout
    reason = status(booted=False)
    if reason:
        print(f"vm: {reason}", file=stream)
        return 125
    own = out is None
    outdir = Path(out or tempfile.mkdtemp(prefix="vmrun-")).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    for name in ("output", "exit-code", "console.log"):
        (outdir / name).unlink(missing_ok=True)
    lines = ["set -e", f"cd {shlex.quote(cwd or os.getcwd())} || exit 125",
             "export CHECKPOINT_IN_VM=1"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    lines += ["exec " + " ".join(shlex.quote(a) for a in cmd)]
    (outdir / "cmd.sh").write_text("\n".join(lines) + "\n")

    t0 = time.monotonic()
    boot = None
    pos = 0
    rc = None
    proc = subprocess.Popen(qemu_argv(outdir, timeout), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    qemu_msgs = b""
    try:
        outfile = outdir / "output"

        def drain() -> None:
            nonlocal pos, boot
            try:
                with open(outfile, "rb") as f:
                    if boot is None:
                        boot = time.monotonic() - t0
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                return
            if data:
                pos += len(data)
                stream.write(data.decode(errors="replace"))
                stream.flush()

        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            drain()
            if time.monotonic() - t0 > timeout:
                rc = 124
                print(f"\nvm: timeout after {timeout:.0f} s: VM killed", file=stream)
                break
        drain()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        qemu_msgs = proc.communicate()[0] or b""
    total = time.monotonic() - t0
    if rc is None:
        try:
            rc = int((outdir / "exit-code").read_text())
        except (FileNotFoundError, ValueError):
            rc = 125
    if rc in (124, 125):
        console = (outdir / "console.log").read_bytes() if (outdir / "console.log").exists() else b""
        tail = (qemu_msgs + console).decode(errors="replace").replace("\r", "").splitlines()[-25:]
        tail = [line for line in tail if line.strip()] or ["(nothing: kernel booted with quiet)"]
        print("vm: console (last lines):\n  " + "\n  ".join(tail), file=stream)
    print(f"vm: exit={rc} boot_to_command={boot if boot is None else round(boot, 1)}s "
          f"total={total:.1f}s", file=stream)
    stream.flush()
    if own:
        shutil.rmtree(outdir, ignore_errors=True)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="op", required=True)
    sub.add_parser("status", help="say whether a VM can be started")
    r = sub.add_parser("run", help="run CMD in a VM")
    r.add_argument("--timeout", type=float, default=150)
    r.add_argument("--cwd")
    r.add_argument("--env", action="append", default=[], metavar="K=V")
    r.add_argument("--out", help="run directory to keep (shared read-write)")
    r.add_argument("cmd", nargs="+")
    a = ap.parse_args()
    if a.op == "status":
        reason = status()
        print(reason or f"ready: {cache_dir()}")
        return 1 if reason else 0
    env = dict(kv.split("=", 1) for kv in a.env)
    return run(a.cmd, timeout=a.timeout, cwd=a.cwd, env=env, out=a.out)


if __name__ == "__main__":
    sys.exit(main())
