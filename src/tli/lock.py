"""Directory locks: one tli process at a time writes into an output directory.

Every command that writes a directory (run, scan, train, evaluate, probe, sweep) holds
:data:`LOCK` inside it while it works (:func:`locked_dir`). The lock records the holder's pid,
host and command; it is created whole (written to a temporary, then hard-linked into place), and
the check-and-take runs under an ``flock`` on the directory, so two processes never both take a
stale lock. A lock whose process is gone is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tli.errors import TLIError
from tli.io import ensure_dir, is_leftover

log = logging.getLogger("tli")

#: The lock file of an output directory.
LOCK = "run.lock"


def _pid_alive(pid: int) -> bool:
    if not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _lock_mutex(directory: Path) -> Iterator[None]:
    """Serialise lock checks between tli processes on this host (flock on the directory).

    Without it two processes could both find the same stale lock and both take it over.
    Where ``fcntl`` is missing (Windows) the check runs unserialised.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError, RecursionError):
        return {}
    return holder if isinstance(holder, dict) else {}


def live_holder(lock: Path) -> tuple[int, str] | None:
    """``(pid, command)`` of the live process on this host that holds ``lock``, else None."""
    holder = _holder(lock)
    pid = holder.get("pid")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else 0
    if pid and holder.get("host") == socket.gethostname() and _pid_alive(pid):
        command = holder.get("command")
        return pid, command if isinstance(command, str) and command.isidentifier() else "run"
    return None


def _busy(directory: Path, pid: int, command: str) -> TLIError:
    return TLIError(
        f"{directory}: another tli {command} (pid {pid}) is using this directory; "
        "wait for it or choose another --out"
    )


def _check_neighbours(directory: Path) -> None:
    """Refuse when a live process other than this one holds a directory above or just below.

    ``tli train --resume RUN/train`` must not write into a run that ``tli run`` is writing,
    nor ``tli run --resume RUN`` into a training directory that ``tli train`` is writing.
    """
    me = os.getpid()
    above = [p / LOCK for p in directory.absolute().parents]
    below = list(directory.glob(f"*/{LOCK}"))
    for lock in above + below:
        found = live_holder(lock) if lock.is_file() else None
        if found and found[0] != me:
            raise _busy(lock.parent, *found)


def acquire_lock(directory: Path, command: str = "run") -> Path:
    """Take :data:`LOCK` in ``directory``; refuse if a live process holds it; take over a stale one.

    Args:
        directory: An existing directory.
        command: The tli command taking it (named in the message a second process gets).

    Raises:
        TLIError: A live tli process holds the directory, one directly above it or one of its
            subdirectories; or the lock cannot be written.
    """
    directory = Path(directory)
    lock = directory / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "since": time.time()}  # fmt: skip
    _check_neighbours(directory)
    try:
        with _lock_mutex(directory):
            for _ in range(2):
                if _try_create(directory, lock, me):
                    return lock
                found = live_holder(lock)
                if found:
                    raise _busy(directory, *found) from None
                pid = _holder(lock).get("pid")
                log.warning("%s: taking over a stale lock (pid %s is gone)", directory, pid or "?")
                lock.unlink(missing_ok=True)
    except OSError as err:
        raise TLIError(f"{lock}: cannot write: {err.strerror or err}") from None
    raise TLIError(f"{directory}: cannot take the lock {lock}")


def _try_create(directory: Path, lock: Path, me: dict) -> bool:
    """Create ``lock`` whole holding ``me``; False when it exists already."""
    tmp = directory / f".{LOCK}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(me))
        try:
            os.link(tmp, lock)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def release_lock(lock: Path) -> None:
    """Remove ``lock`` if this process still holds it."""
    if _holder(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def has_content(directory: Path) -> bool:
    """Whether ``directory`` holds anything but a lock and tli's own leftovers."""
    if not directory.is_dir():
        return False
    return any(c.name != LOCK and not is_leftover(c.name) for c in directory.iterdir())


@contextmanager
def locked_dir(directory: Path | str, command: str) -> Iterator[Path]:
    """Create ``directory`` if needed and hold its lock for the block.

    A directory this call created is removed again (with the parents it created) when the
    block leaves nothing in it but the lock and temporaries, e.g. after an error: a failed
    command leaves no empty ``--out`` behind.

    Yields:
        The directory.
    """
    directory = Path(directory)
    if _secondary_rank():
        ensure_dir(directory)  # rank 0 of this launch holds the lock for all its processes
        yield directory
        return
    first_new = None
    for candidate in (directory, *directory.absolute().parents):
        if candidate.exists():
            break
        first_new = candidate
    ensure_dir(directory)
    lock = acquire_lock(directory, command)
    try:
        yield directory
    finally:
        release_lock(lock)
        if first_new is not None and not has_content(directory):
            _remove_created(directory, Path(first_new))


def _secondary_rank() -> bool:
    """Whether this is a process other than rank 0 of a distributed launch (accelerate, torchrun).

    The processes of one launch work on one directory together; rank 0 holds its lock.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return False
    return world > 1 and rank != 0


def _remove_created(directory: Path, first_new: Path) -> None:
    """Remove ``directory`` (only temporaries left in it) and its empty parents up to first_new."""
    shutil.rmtree(directory, ignore_errors=True)
    current = directory.absolute().parent
    stop = first_new.absolute()
    while current != stop.parent and (current == stop or stop in current.parents):
        try:
            current.rmdir()
        except OSError:
            return
        current = current.parent
