"""Signal dispositions (read by injected rt_sigaction) and the process-wide
queue of pending signals (PTRACE_PEEKSIGINFO)."""

from __future__ import annotations

import struct

from ..images.pb import signals_pb2
from ..inject import Injector
from ..kernel import procfs
from ..kernel import ptrace as pt

KSIGACTION = struct.Struct("<QQQQ")  # handler, flags, restorer, mask (struct kernel_sigaction)
SIGKILL, SIGSTOP = 9, 19
NSIG = 64


def dump_signals(remote: Injector) -> signals_pb2.SignalsEntry:
    pid = remote.proc.pid
    st = procfs.read_status(pid)
    ent = signals_pb2.SignalsEntry(pid=pid)
    scratch = remote.scratch
    # only signals with a handler or ignored can differ from SIG_DFL/no flags
    interesting = st.sig_cgt | st.sig_ign
    for sig in range(1, NSIG + 1):
        if sig in (SIGKILL, SIGSTOP) or not interesting >> (sig - 1) & 1:
            continue
        remote.call("rt_sigaction", sig, 0, scratch, 8)
        handler, flags, restorer, mask = KSIGACTION.unpack(remote.read(scratch, KSIGACTION.size))
        ent.actions.add(sig=sig, handler=handler, flags=flags, restorer=restorer, mask=mask)
    ent.shared_pending_siginfo = b"".join(pt.peeksiginfo(pid, shared=True))
    return ent
