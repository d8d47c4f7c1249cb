#!/usr/bin/env python3
"""Build the test VM's initramfs (stdlib only; called by tools/qemu/setup.sh).

    mkinitramfs.py INIT MODTREE OUT

INIT: the static /init binary. MODTREE: an extracted lib/modules/<ver> tree
(partial is fine). The modules needed for a 9p root over virtio (9p,
9pnet_virtio and what they depend on, plus virtio/virtio_pci where those are
modules) are decompressed, ordered by the "depends=" of their .modinfo and
put in /modules with /modules/order. OUT: a gzipped newc cpio.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import sys
from pathlib import Path

WANTED = ["virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
          "virtio_pci", "9pnet_virtio", "9p"]
OPTIONAL = {"virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
            "virtio_pci"}  # built in on Debian's 6.12


def modname(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def load(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import subprocess
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def depends(blob: bytes) -> list[str]:
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", blob)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",")]


def resolve(tree: Path) -> list[tuple[str, bytes]]:
    index = {modname(p): p for p in tree.rglob("*.ko*")}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in index:
            if name in OPTIONAL and not chain:
                return
            sys.exit(f"mkinitramfs: module {name} (needed by {' <- '.join(chain) or 'init'}) "
                     f"not found under {tree}")
        blob = load(index[name])
        for dep in depends(blob):
            visit(dep, (name, *chain))
        seen.add(name)
        order.append((name, blob))

    for name in WANTED:
        visit(name, ())
    return order


class Cpio:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nm = name.encode() + b"\x00"
        fields = [self.ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(nm), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.parts += [hdr, nm, b"\x00" * (-(len(hdr) + len(nm)) % 4),
                       data, b"\x00" * (-len(data) % 4)]

    def bytes(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    init, tree, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    mods = resolve(tree)
    c = Cpio()
    for d in ("dev", "proc", "sys", "newroot", "modules"):
        c.add(d, 0o040755)
    c.add("dev/console", 0o020600, rdev=(5, 1))
    c.add("dev/null", 0o020666, rdev=(1, 3))
    c.add("init", 0o100755, init.read_bytes())
    for name, blob in mods:
        c.add(f"modules/{name}.ko", 0o100644, blob)
    c.add("modules/order", 0o100644, "".join(f"{n}.ko\n" for n, _ in mods).encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(c.bytes(), compresslevel=1))
    os.replace(tmp, out)
    print(f"initramfs: {out} ({out.stat().st_size // 1024} KiB), modules: "
          f"{' '.join(n for n, _ in mods)}")


if __name__ == "__main__":
    main()
