"""The soft-dirty tracker for real, on a second kernel.

This host's kernel has CONFIG_MEM_SOFT_DIRTY off, so the soft-dirty tests
skip here. ``test_soft_dirty_under_qemu`` boots Debian's 6.12 kernel (soft-dirty
compiled in) under qemu in software emulation with this machine's root shared
read-only (tools/qemu/, prepared by tools/qemu/setup.sh) and runs inside it:

- the soft-dirty tests of tests/test_trackers.py (``-k soft_dirty``);
- the tests below that need a soft-dirty kernel: the probe says yes, and the
  random-writes property test (reported == written, nothing lost) for both
  reading paths, PAGEMAP_SCAN ``PAGE_IS_SOFT_DIRTY`` and /proc/PID/pagemap
  bit 55.

The VM test checks the guest's JUnit report: every one of them must have
passed there (a skip inside the VM is a failure). It skips, with the reason,
only when the VM is not prepared (qemu could not be installed).
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from checkpoint.errors import KernelFeatureError
from checkpoint.tracking.base import choose_tracker
from checkpoint.tracking.scan import probe_pagemap_scan
from checkpoint.tracking.softdirty import SoftDirtyTracker, soft_dirty_probe
from conftest import build_target
from test_scan import target  # noqa: F401  (fixture)
from test_trackers import PS, run_round

REPO = Path(__file__).resolve().parents[1]
IN_VM = os.environ.get("CHECKPOINT_IN_VM") == "1"
#: rounds of the property test (the issue asks for 100; in the VM they take ~5 s a path)
ROUNDS = int(os.environ.get("SOFTDIRTY_ROUNDS", "100"))
VM_ROUNDS = int(os.environ.get("SOFTDIRTY_VM_ROUNDS", "100"))
VM_TIMEOUT = float(os.environ.get("SOFTDIRTY_VM_TIMEOUT", "300"))  # ~55 s quiet; margin for load

#: what must have passed inside the VM
REQUIRED_IN_VM = {
    "test_soft_dirty_real_kernel",
    "test_soft_dirty_probe_in_vm",
    "test_soft_dirty_random_rounds[pagemap-scan]",
    "test_soft_dirty_random_rounds[pagemap-bit55]",
}


def need_soft_dirty() -> None:
    reason = soft_dirty_probe()
    if reason is not None:
        print(f"soft-dirty unavailable: {reason}")
        pytest.skip(f"soft-dirty unavailable on this kernel: {reason} "
                    "(test_soft_dirty_under_qemu runs this in a VM)")


# --------------------------------------------------------------------------
# tests that need a soft-dirty kernel (skip on this host, run in the VM)


def test_soft_dirty_probe_in_vm():
    if not IN_VM:
        pytest.skip("checks the VM's kernel: runs inside test_soft_dirty_under_qemu")
    assert soft_dirty_probe() is None
    assert SoftDirtyTracker.probe() is None
    assert choose_tracker("soft-dirty") is SoftDirtyTracker
    probe_pagemap_scan()  # 6.12: PAGEMAP_SCAN exists, so both paths are tested
    assert SoftDirtyTracker().use_ioctl is True


@pytest.mark.parametrize("use_ioctl", [True, False], ids=["pagemap-scan", "pagemap-bit55"])
def test_soft_dirty_random_rounds(target, use_ioctl):
    """Random writes each round: the pages reported are exactly the pages
    written (none lost, none extra), none reported as zero."""
    need_soft_dirty()
    if use_ioctl:
        try:
            probe_pagemap_scan()
        except KernelFeatureError as exc:
            pytest.skip(f"no PAGEMAP_SCAN here: {exc}")
    rng = random.Random(1234 + use_ioctl)
    d = target()
    n = 10_000
    mid, base = d.map("anon", n)
    d.cmd(f"w {mid} 0 {n}")
    t = SoftDirtyTracker(use_ioctl=use_ioctl, vec_len=64)  # small vector: paginates
    data, zero = run_round(t, d.pid, base, base + n * PS)
    assert data == set(range(n)) and not zero          # first round: full
    assert run_round(t, d.pid, base, base + n * PS) == (set(), set())
    t0 = time.monotonic()
    for i in range(ROUNDS):
        # up to 600 scattered pages: past the kernel's 512-region bounce buffer
        written = set(rng.sample(range(n), rng.randint(1, 600)))
        d.write(mid, sorted(written))
        data, zero = run_round(t, d.pid, base, base + n * PS)
        assert data == written, (i, sorted(data ^ written)[:10])
        assert not zero
    print(f"{ROUNDS} rounds in {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------
# the VM run (host side)


def _vm_module():
    spec = importlib.util.spec_from_file_location("checkpoint_qemu_vm", REPO / "tools/qemu/vm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_soft_dirty_under_qemu(tmp_path):
    if IN_VM:
        pytest.skip("already inside the VM")
    vm = _vm_module()
    reason = vm.status()
    if reason is not None:
        print(f"soft-dirty VM test skipped: {reason}")
        pytest.skip(f"soft-dirty VM test: {reason}")
    build_target("scan_target")  # the guest's root is read-only: build it here
    junit = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-k", "soft_dirty and not under_qemu",
           "tests/test_trackers.py", "tests/test_softdirty_qemu.py"]
    for attempt in (1, 2):
        t0 = time.monotonic()
        rc = vm.run(cmd, cwd=str(REPO), out=tmp_path, timeout=VM_TIMEOUT,
                    env={"SOFTDIRTY_ROUNDS": str(VM_ROUNDS), "PYTHONDONTWRITEBYTECODE": "1"})
        print(f"VM run {attempt}: {time.monotonic() - t0:.1f} s, status {rc}")
        if rc != 125:  # 125: the VM itself broke (seen once in ~15 boots), not pytest
            break
    assert rc == 0, f"pytest in the VM exited {rc} (output above)"
    suite = ET.parse(junit).getroot()
    outcome = {}
    for case in suite.iter("testcase"):
        kids = {c.tag for c in case}
        outcome[case.get("name")] = ("failed" if kids & {"failure", "error"} else
                                     "skipped" if "skipped" in kids else "passed")
    missing = REQUIRED_IN_VM - {n for n, o in outcome.items() if o == "passed"}
    assert not missing, f"did not pass in the VM: {sorted(missing)}; all: {outcome}"
    assert all(o == "passed" for o in outcome.values()), outcome
