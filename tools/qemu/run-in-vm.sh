#!/bin/sh
# Run CMD... as root in a throwaway qemu VM (Debian 6.12 kernel, software
# emulation, this machine's / shared read-only, tmpfs on /tmp); prints its
# output, exits with its status (124 timeout, 125 VM broken). Options go
# before "--": --timeout S, --cwd DIR, --env K=V, --out DIR (see vm.py).
# Prepare once with tools/qemu/setup.sh.
case "${1:-}" in
-*) ;;
*) set -- -- "$@" ;;
esac
exec python3 "$(dirname "$0")/vm.py" run "$@"
