"""The config file on disk: replacing it whole, and telling one version from another.

``POST /v1/config`` writes the file the server was started with, then asks
for a reload (SIGHUP). A reload must never read half a file, so the new
text goes to a temporary file in the same directory, is flushed to disk,
and is renamed over the old one (atomic on POSIX): a reader opens either
the old file or the new one. The file keeps its mode (and, where this
process may set it, its owner and group). A config file that is a symbolic
link is written where the link points, so the link stays.

``file_identity`` names one version of the file: its inode, modification
time and size. Every write makes a new inode, so the supervisor, noting the
identity of the file each reload read (before reading it), tells the admin
process which reload read the file it wrote.
"""

from __future__ import annotations

import os
import stat
import tempfile

__all__ = ["file_identity", "replace_file"]


def file_identity(path: str) -> str:
    """``"INODE:MTIME_NS:SIZE"`` of the file at ``path`` now, or ``""`` if there is none."""
    if not path:
        return ""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def replace_file(path: str, data: bytes) -> str:
    """Replace the file at ``path`` (a link: its target) with ``data``, atomically and durably;
    return the new file's identity. Raises OSError, the file unchanged, if it cannot."""
    target = os.path.realpath(path)
    old = os.stat(target)
    st = write_atomically(target, data, mode=stat.S_IMODE(old.st_mode), owner=(old.st_uid, old.st_gid))
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def write_atomically(
    target: str, data: bytes, *, mode: int, owner: tuple[int, int] | None = None, durable: bool = True
) -> os.stat_result:
    """Replace ``target`` with ``data``, whole or not at all: a temporary file
    beside it (``mode``; ``owner`` where this process may give it), renamed
    over it; with ``durable``, the data and the rename fsynced. The new file's
    stat. Raises OSError, ``target`` unchanged."""
    directory = os.path.dirname(target)
    fd, temp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", dir=directory)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            if owner is not None:
                try:
                    os.fchown(fd, *owner)
                except PermissionError:
                    pass  # not ours to give away: the file's owner becomes this process's user
            if durable:
                os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.rename(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    if durable:
        _fsync_dir(directory)
    return st


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable (the directory entry)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
