"""The fd room moved to ``checkpoint.objects.fds`` (one module per kind of
fd); this name stays for the callers that import it."""

from .fds import (KINDS, RestoreError, UnsupportedObject, dump_files, fd_keys,  # noqa: F401
                  open_path, opt, premake_memfds, pull_tree_fds, restore_files)
from .fds.base import FdEntry, FilesEntry, MAX_CONTENT  # noqa: F401
