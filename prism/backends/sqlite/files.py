"""An SQLite namespace's file is the service's alone: created 0600, in
directories created 0700, whatever the umask (a umask of 000 or 022 would
otherwise give 0644 files and 0755 directories: anyone on the machine could
read every namespace's data). SQLite creates the ``-wal`` and ``-shm``
files with the database file's mode, so they follow.

A file or directory that already exists is left as it is: it is the
operator's (it may be shared on purpose, say with a backup user's group);
``prism serve`` warns, one line each, when one is open to group or others
(``prism.server.permission_warnings``).
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def create_private(path: Path) -> None:
    """Create ``path``'s missing parent directories (0700) and the empty file
    itself (0600) if it does not exist; SQLite takes an empty file as a new
    database."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # another worker of the tenant made it meanwhile
        os.chmod(directory, DIR_MODE)  # exactly, whatever the umask took away
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def open_to_others(path: Path) -> str | None:
    """The warning for an existing database file (or its -wal, -shm) that
    group or others may use; None if there is none."""
    for candidate in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = os.stat(candidate).st_mode & 0o777
        except OSError:
            continue
        if mode & 0o077:
            return (
                f"{candidate} is open to group or others (mode {mode:04o}); left as it is, "
                f"but `chmod 600 {path}*` keeps the namespace's data to the service's user"
            )
    return None
