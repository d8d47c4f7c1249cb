"""Thin, typed bindings to the kernel interfaces the engine uses, named as
the kernel names them (ptrace, PAGEMAP_SCAN, userfaultfd, pidfd, procfs)."""
