"""Files written whole and locked: what a bank, an exported vector and a batch's output share."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it once written whole: a run stopped while writing (an error,
    Ctrl-C, a kill) leaves the earlier file or none, never half of one for a bank or ``--vector`` to trip on. A
    device or a pipe (/dev/null, /dev/stdout, a FIFO) is written to as it is: replacing it would put a plain file in
    its place (as root, in place of /dev/null)."""
    if path.exists() and not path.is_file() and not path.is_dir():
        yield path
        return
    path = path.resolve()  # a link's file is the one replaced, not the link
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        if path.exists():
            shutil.copymode(path, temporary)  # a transcript kept private stays so
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def try_lock(handle) -> bool:
    """Take an advisory exclusive lock (flock) on an open file, dropped when it is closed or its process ends; False
    where another holds it. Where the system (Windows) or the file system (some NFS) has no locks: True, and the
    caller goes on unlocked."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True
