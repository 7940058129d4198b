"""Files written whole and locked: what a bank, an exported vector and a batch's output share."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def xdg_home(variable: str, fallback: str) -> Path:
    """``$XDG_..._HOME``, or ``~/fallback`` where it is unset or relative, as the XDG spec says (``~/st`` made a
    folder named ~ in the current one, whose files the next command in another folder did not find)."""
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / fallback


def write_new(folder: Path, name: Callable[[int], str], text: str) -> Path:
    """``text`` in a new file of ``folder``, readable by its owner alone, named ``name(1)``, else ``name(2)``...:
    written to a temporary file, then linked in, so that no name is taken empty (a kill in between left a file no
    resume could read) nor by two writers (checking, then writing, gave two chats left in one second one file)."""
    temporary = folder / f".new.{os.getpid()}.tmp"
    try:
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as out:
            out.write(text)
        for count in itertools.count(1):
            try:
                os.link(temporary, folder / name(count))
                return folder / name(count)
            except FileExistsError:
                continue
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it once written whole: a run stopped while writing (an error,
    Ctrl-C, a kill) leaves the earlier file or none, never half of one for a bank or ``--vector`` to trip on. A
    device or a pipe (/dev/null, /dev/stdout, a FIFO) gets the whole file written into it once it is made: replacing
    it would put a plain file in its place (as root, in place of /dev/null; /dev/stdout's file when redirected)."""
    if _a_stream(path):
        handle, made = tempfile.mkstemp(prefix="eqz-")
        os.close(handle)
        try:
            yield Path(made)
            with open(made, "rb") as written, open(path, "ab") as stream:  # at the end of /dev/stdout's file
                shutil.copyfileobj(written, stream)  # seekable or not, as any other program writes to it
        finally:
            os.unlink(made)
        return
    try:
        path = path.resolve()  # a link's file is the one replaced, not the link
    except RuntimeError:  # a loop of links (Python 3.11; later ones raise OSError themselves)
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        if path.exists():
            shutil.copymode(path, temporary)  # a transcript kept private stays so
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _a_stream(path: Path) -> bool:
    """A device or a pipe, or a link in /dev or /proc to one's file: /dev/stdout where stdout is redirected to a
    file (not a plain file in /dev/shm)."""
    if not path.exists() or path.is_dir():
        return False
    return not path.is_file() or (path.is_symlink() and path.absolute().parts[1:2] in (("dev",), ("proc",)))


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
