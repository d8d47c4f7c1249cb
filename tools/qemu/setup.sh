#!/usr/bin/env bash
# Prepare the soft-dirty test VM (idempotent): qemu-system-x86, a C compiler
# with static libc, Debian's 6.12 kernel (CONFIG_MEM_SOFT_DIRTY=y, 9p as
# modules) and a small initramfs, all in a git-ignored cache folder:
#   $CHECKPOINT_QEMU_CACHE, default <repo>/.qemu
# Exits 0 when tools/qemu/run-in-vm.sh can run, else non-zero with a one-line
# reason on stderr. Installs with apt-get (needs root) only what is missing.
set -uo pipefail
cd "$(dirname "$0")/../.."
CACHE=${CHECKPOINT_QEMU_CACHE:-$PWD/.qemu}
META=${CHECKPOINT_QEMU_KERNEL_META:-linux-image-6.12-amd64}
HERE=tools/qemu
t0=$(date +%s.%N)

note() { echo "qemu setup: $*"; }
fail() { echo "qemu setup: FAILED: $*" >&2; exit 1; }
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
updated=0
apt_update() {
	[ $updated = 1 ] && return 0
	note "apt-get update"
	apt-get update -qq >/dev/null || return 1
	updated=1
}
apt_install() {
	can_apt || fail "need to install $* but not root or no apt-get"
	apt_update || fail "apt-get update failed"
	note "apt-get install $*"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
		>/dev/null || fail "apt-get install $* failed"
}

# 1. tools
missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
	apt_install "${missing[@]}"
else
	note "qemu, cc, static libc, python3: present"
fi
command -v qemu-system-x86_64 >/dev/null 2>&1 || fail "qemu-system-x86_64 still missing"

# 2. the kernel package: resolved through the meta package (its ABI name changes)
resolve() {
	command -v apt-cache >/dev/null 2>&1 || return 1
	apt-cache depends "$META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
PKG=$(resolve)
if [ -z "$PKG" ]; then
	if [ -f "$CACHE/ready" ]; then
		PKG=$(cat "$CACHE/ready")   # no apt here: keep what was fetched before
	elif can_apt && apt_update; then
		PKG=$(resolve)
	fi
fi
[ -n "$PKG" ] || fail "cannot resolve $META to a kernel package (apt-cache depends)"

mkdir -p "$CACHE" || fail "cannot create $CACHE"
if [ -f "$CACHE/ready" ] && [ "$(cat "$CACHE/ready")" = "$PKG" ] \
	&& [ -f "$CACHE/vmlinuz" ] && [ -d "$CACHE/modules" ]; then
	note "kernel $PKG: cached in $CACHE"
else
	rm -f "$CACHE/ready"
	dl="$CACHE/download"
	rm -rf "$dl" "$CACHE/extract" && mkdir -p "$dl" "$CACHE/extract"
	note "apt-get download $PKG"
	if ! (cd "$dl" && apt-get download "$PKG" >/dev/null 2>&1); then
		can_apt && apt_update && PKG=$(resolve)
		(cd "$dl" && apt-get download "$PKG" >/dev/null 2>&1) \
			|| fail "apt-get download $PKG failed"
	fi
	deb=$(ls "$dl"/*.deb 2>/dev/null | head -1)
	[ -n "$deb" ] || fail "no .deb downloaded for $PKG"
	# only the kernel, its config and the modules for 9p over virtio
	dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$CACHE/extract" --wildcards \
		'*/boot/vmlinuz-*' '*/boot/config-*' '*/kernel/fs/9p/*' '*/kernel/net/9p/*' \
		'*/kernel/fs/netfs/*' '*/kernel/fs/fscache/*' '*/kernel/drivers/virtio/*' \
		2>/dev/null
	vmlinuz=$(ls "$CACHE"/extract/boot/vmlinuz-* 2>/dev/null | head -1)
	config=$(ls "$CACHE"/extract/boot/config-* 2>/dev/null | head -1)
	[ -n "$vmlinuz" ] && [ -n "$config" ] || fail "no vmlinuz/config in $deb"
	grep -qx 'CONFIG_MEM_SOFT_DIRTY=y' "$config" || fail "$PKG has no CONFIG_MEM_SOFT_DIRTY=y"
	grep -qx 'CONFIG_PROC_PAGE_MONITOR=y' "$config" || fail "$PKG has no CONFIG_PROC_PAGE_MONITOR"
	moddir=$(ls -d "$CACHE"/extract/*lib/modules/* "$CACHE"/extract/usr/lib/modules/* 2>/dev/null | head -1)
	[ -n "$moddir" ] || fail "no modules extracted from $deb"
	rm -rf "$CACHE/modules" && mv "$moddir" "$CACHE/modules" || fail "cannot move $moddir"
	mv "$vmlinuz" "$CACHE/vmlinuz" && mv "$config" "$CACHE/config" || fail "cannot move kernel"
	rm -rf "$dl" "$CACHE/extract" "$CACHE/initrd.img"
	echo "$PKG" >"$CACHE/ready"
	note "kernel $PKG: extracted to $CACHE (vmlinuz, config, 9p/virtio modules)"
fi

# 3. /init and the initramfs (rebuilt when their sources change)
if [ ! -f "$CACHE/init" ] || [ "$HERE/init.c" -nt "$CACHE/init" ]; then
	cc -static -Os -Wall -o "$CACHE/init.tmp" "$HERE/init.c" || fail "cannot build $HERE/init.c statically"
	mv "$CACHE/init.tmp" "$CACHE/init"
	rm -f "$CACHE/initrd.img"
	note "built $CACHE/init"
fi
if [ ! -f "$CACHE/initrd.img" ] || [ "$HERE/mkinitramfs.py" -nt "$CACHE/initrd.img" ]; then
	python3 "$HERE/mkinitramfs.py" "$CACHE/init" "$CACHE/modules" "$CACHE/initrd.img" \
		|| fail "cannot build the initramfs"
fi

# 4. a smoke boot once per kernel/initramfs: the VM runs a command and returns its status
stamp="$CACHE/booted"
if [ ! -f "$stamp" ] || [ "$CACHE/initrd.img" -nt "$stamp" ] || [ "$CACHE/ready" -nt "$stamp" ]; then
	rc=0
	out=$(python3 "$HERE/vm.py" run --timeout 60 -- sh -c 'uname -r; exit 7' 2>&1) || rc=$?
	[ $rc = 7 ] || fail "smoke boot failed (status $rc): $(echo "$out" | tail -3 | tr '\n' ' ')"
	touch "$stamp"
	note "smoke boot ok: guest kernel $(echo "$out" | head -1)"
fi
note "ready ($(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s): $CACHE"
