"""`checkpoint check` against this machine's kernel and its own config."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from checkpoint import kerndat

CLI = [sys.executable, "-m", "checkpoint"]


def kernel_config() -> dict[str, str] | None:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def test_check_json_reports_every_feature():
    res = subprocess.run([*CLI, "check", "--json"], capture_output=True, text=True, check=True)
    d = json.loads(res.stdout)
    for key in ("pagemap_scan", "pagemap_scan_guard", "uffd_wp_async", "soft_dirty",
                "ptrace_seize", "pidfd_getfd", "clone3_set_tid"):
        assert isinstance(d[key], bool), key
        if not d[key]:
            assert d["reasons"][key], f"{key} missing without a reason"
    assert d["kernel"] == os.uname().release
    assert d["trackers"][-2:] == ["hash", "full"]
    assert ("uffd-wp" in d["trackers"]) == (d["pagemap_scan"] and d["uffd_wp_async"])
    assert ("soft-dirty" in d["trackers"]) == d["soft_dirty"]


def test_check_agrees_with_kernel_config():
    cfg = kernel_config()
    if cfg is None:
        pytest.skip("/proc/config.gz absent: cannot cross-check the probes against the config")
    kd = kerndat.probe_all()
    assert kd.soft_dirty == (cfg.get("CONFIG_MEM_SOFT_DIRTY") == "y")
    uffd_wp = (cfg.get("CONFIG_USERFAULTFD") == "y"
               and cfg.get("CONFIG_PTE_MARKER_UFFD_WP") == "y")
    # WP_ASYNC also needs the PAGEMAP_SCAN era (6.7+), which pagemap_scan proves
    assert kd.uffd_wp_async == (uffd_wp and kd.pagemap_scan)
    if not kd.soft_dirty:
        assert "CONFIG_MEM_SOFT_DIRTY" in kd.reasons["soft_dirty"]


def test_this_machine():
    """The facts shared/KERNEL.md records for the project's machine."""
    kd = kerndat.probe_all()
    if not os.uname().release.startswith("6.18"):
        pytest.skip(f"not the project's 6.18 machine ({os.uname().release})")
    assert kd.pagemap_scan and kd.uffd_wp_async and kd.ptrace_seize and kd.pidfd_getfd
    assert kd.trackers[0] == "uffd-wp"


def test_check_human_output():
    res = subprocess.run([*CLI, "check"], capture_output=True, text=True, check=True)
    assert "pagemap_scan" in res.stdout and "trackers:" in res.stdout


def test_probes_leave_no_children_behind():
    kerndat.probe_all()
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
