"""Atomic file writes: a reader never sees a half-written file.

Every file tli writes goes through here: the content goes to a temporary file in the same
directory, is flushed to disk, and is renamed over the target (``os.replace``), which is atomic
on POSIX and Windows.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tli.errors import TLIError


def expand_user(path: Path | str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; unchanged when that user is unknown."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # "~nosuchuser/...": no home directory to expand to
        return Path(path)


def ensure_dir(path: Path | str) -> Path:
    """Create a directory (and parents); a clear TLIError if that is impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TLIError(f"{path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TLIError(f"{path}: cannot create directory: {err.strerror or err}") from None
    if not os.access(path, os.W_OK):
        raise TLIError(f"{path}: directory is not writable")
    return path


@contextmanager
def atomic_open(path: Path | str, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    The temporary file is named ``.NAME.XXXX.tmp``: a process killed mid-write leaves at most
    such a file behind, never a half-written ``NAME``. A replaced file keeps its permissions; a
    new one gets those of a plain ``open()``. A failure of the file system (no space, a
    directory in the way, no permission) is a TLIError naming ``path``.
    """
    path = Path(path)
    try:
        ensure_dir(path.parent if str(path.parent) else Path("."))
    except TLIError as err:
        raise TLIError(f"{path}: cannot write: {err}") from None
    if path.is_dir():
        raise TLIError(f"{path}: is a directory, cannot write a file there")
    _check_replaceable(path)
    try:
        perms = path.stat().st_mode & 0o777 if path.is_file() else 0o666 & ~current_umask()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        raise TLIError(f"{path}: cannot write: {err.strerror or err}") from None
    handle: IO[Any] | None = None
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        # (or those of the file it replaces).
        os.chmod(tmp, perms)
        handle = os.fdopen(fd, mode, **kwargs)
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, path)
    except OSError as err:  # no space, a quota, an I/O error: one line, no temporary left
        _discard(handle, fd, tmp)
        raise TLIError(f"{path}: cannot write: {err.strerror or err}") from None
    except BaseException:
        _discard(handle, fd, tmp)
        raise


def _discard(handle: IO[Any] | None, fd: int, tmp: str) -> None:
    """Close a failed write's file (its buffered bytes cannot be written either) and remove it."""
    try:
        if handle is not None:
            handle.close()  # may raise again while flushing what could not be written
        else:
            os.close(fd)
    except OSError:
        pass
    Path(tmp).unlink(missing_ok=True)


#: Suffix of the temporary files of :func:`atomic_open` (see :func:`is_leftover`).
TMP_SUFFIX = ".tmp"


def is_leftover(name: str) -> bool:
    """Whether a file or folder name is a temporary that a killed tli process left behind.

    Atomic writes go through hidden temporaries: ``.NAME.XXXX.tmp`` files (:func:`atomic_open`)
    and ``.NAME.tmp-XXXX`` / ``.NAME.old`` folders (adapters, which
    are replaced as whole folders). None of them is ever a result.
    """
    return name.startswith(".") and (
        name.endswith(TMP_SUFFIX) or ".tmp-" in name or name.endswith(".old")
    )


def _check_creatable(path: Path, what: str) -> None:
    """Raise unless the nearest existing ancestor of ``path`` is a writable directory."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise TLIError(f"{path}: cannot create {what}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TLIError(f"{path}: cannot create {what}: {parent} is not writable")


def check_out_file(path: Path | str) -> None:
    """Fail early (before a model is loaded) if a file cannot be written at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise TLIError(f"{path}: is a directory, cannot write a file there")
    _check_replaceable(path)
    _check_creatable(path, "it")


def _check_replaceable(path: Path) -> None:
    """Refuse to put a file in place of a device, FIFO or socket (``--out /dev/full``)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # nothing there (or nothing readable): the write itself reports it
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise TLIError(f"{path}: exists and is not a regular file (a device, FIFO or socket); "
                       "tli replaces only regular files")


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order, NaN/inf as null)."""
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, ensure_ascii=False) + "\n")


def nan_from_null(obj: Any) -> Any:
    """JSON ``null`` (a NaN or infinity when written, see :func:`atomic_write_json`) back to NaN."""
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {k: nan_from_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_from_null(v) for v in obj]
    return obj


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_safetensors(
    path: Path | str, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as safetensors atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def ensure_writable_dir(path: Path | str) -> None:
    """Fail early (before any model is loaded) if ``path`` cannot become an output directory."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise TLIError(f"{path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise TLIError(f"{path}: directory is not writable")
        return
    _check_creatable(path, "directory")


#: The largest file tli reads as text (pair files, configs, JSON records): 64 MiB.
MAX_READ = 64 * 2**20


def read_bytes(path: Path | str, limit: int = MAX_READ) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; a one-line TLIError otherwise.

    Only regular files are read: a FIFO would block forever and ``/dev/zero`` never ends, so
    both are refused before they are opened. The size is checked before and while reading.
    """
    import stat

    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise TLIError(f"{path}: cannot read: no such file") from None
    except OSError as err:
        raise TLIError(f"{path}: cannot read: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise TLIError(f"{path}: cannot read: Is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise TLIError(f"{path}: cannot read: not a regular file (a device, FIFO or socket)")
    too_big = TLIError(
        f"{path}: cannot read: larger than {limit // 2**20} MiB, the most tli reads from one file"
    )
    if info.st_size > limit:
        raise too_big
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # swapped since the stat
                raise TLIError(f"{path}: cannot read: not a regular file")
            data = handle.read(limit + 1)
    except OSError as err:
        raise TLIError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(data) > limit:
        raise too_big
    return data


def read_text(path: Path | str, limit: int = MAX_READ) -> str:
    """The UTF-8 text of a file; a one-line TLIError naming the file when it cannot be read."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TLIError(f"{path}: cannot read: not UTF-8 (at byte offset {err.start})") from None


class DuplicateKey(ValueError):
    """A JSON object names one key twice (see :func:`json_object`)."""


def json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: a dict, or DuplicateKey on a repeated key.

    Python's json keeps the last of two equal keys silently; tli refuses such a file instead.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_json(path: Path | str) -> dict[str, Any]:
    """A JSON object from ``path``; a one-line TLIError naming the file when it is not one."""
    path = Path(path)
    text = read_text(path)
    try:
        data = json.loads(text, object_pairs_hook=json_object)
    except (ValueError, RecursionError) as err:
        lines = str(err).strip().splitlines()
        raise TLIError(
            f"{path}: cannot read: {lines[0] if lines else type(err).__name__}"
        ) from None
    if not isinstance(data, dict):
        raise TLIError(f"{path}: expected a JSON object")
    return data


# --- replacing a directory's contents ------------------------------------------------------

#: The hidden folder inside a directory that holds its previous contents while they are
#: replaced (``--overwrite``); a leftover by name (:func:`is_leftover`).
ASIDE = ".previous.old"


class SetAside:
    """A directory's previous contents, moved into :data:`ASIDE` inside it until replaced.

    Moving is a rename on the same file system: nothing is copied and nothing is lost. The new
    contents are written beside; :meth:`discard` deletes the old ones once the new are safely
    in place, :meth:`restore` deletes the new ones and moves the old back.
    """

    def __init__(self, directory: Path | str, keep: tuple[str, ...] = ()) -> None:
        """Move every child of ``directory`` except ``keep`` (e.g. the lock) aside."""
        self.directory, self.keep = Path(directory), set(keep)
        self.aside = self.directory / ASIDE
        self.done = False
        try:
            self.aside.mkdir()
            for child in self._children():
                child.rename(self.aside / child.name)
        except OSError as err:
            self.restore()
            raise TLIError(
                f"{self.directory}: cannot set the previous contents aside: {err.strerror or err}"
            ) from None

    def _children(self) -> list[Path]:
        return [c for c in self.directory.iterdir() if c.name not in self.keep | {ASIDE}]

    def discard(self) -> None:
        """Delete the previous contents (the new ones are in place).

        The folder is renamed to a temporary name first, so a kill while deleting never leaves
        half of the previous contents under :data:`ASIDE`, where they would be restored.
        """
        import shutil

        if self.done:
            return
        self.done = True
        doomed = self.directory / f"{ASIDE}.tmp-{os.getpid()}"
        try:
            self.aside.rename(doomed)
        except OSError:
            doomed = self.aside
        shutil.rmtree(doomed, ignore_errors=True)

    def restore(self) -> None:
        """Delete whatever was written since, and put the previous contents back."""
        import shutil

        if self.done:
            return
        self.done = True
        if not self.aside.is_dir():
            return
        for child in self._children():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        for child in self.aside.iterdir():
            child.rename(self.directory / child.name)
        self.aside.rmdir()


def recover_aside(directory: Path | str, keep: tuple[str, ...] = ()) -> bool:
    """Put back the previous contents that a killed ``--overwrite`` left in :data:`ASIDE`.

    They are set aside only until the new contents pass every check (:class:`SetAside`), so
    whatever was written beside them is an unfinished replacement: it is deleted, and the
    previous contents are moved back.

    Args:
        directory: The directory (its lock held).
        keep: Names to leave alone (the lock).

    Returns:
        Whether previous contents were restored.
    """
    import shutil

    directory = Path(directory)
    aside = directory / ASIDE
    if not aside.is_dir():
        return False
    for child in directory.iterdir():
        if child.name not in set(keep) | {ASIDE}:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for child in aside.iterdir():
        child.rename(directory / child.name)
    aside.rmdir()
    return True
