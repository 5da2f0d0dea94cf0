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
    try:
        perms = path.stat().st_mode & 0o777 if path.is_file() else 0o666 & ~current_umask()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        raise TLIError(f"{path}: cannot write: {err.strerror or err}") from None
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        # (or those of the file it replaces).
        os.chmod(tmp, perms)
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            _sync(handle, path)
        _replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Suffix of the temporary files of :func:`atomic_open` (see :func:`is_leftover`).
TMP_SUFFIX = ".tmp"


def _sync(handle: IO[Any], path: Path) -> None:
    try:
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as err:
        raise TLIError(f"{path}: cannot write: {err.strerror or err}") from None


def _replace(tmp: str, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as err:
        raise TLIError(f"{path}: cannot write: {err.strerror or err}") from None


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
    _check_creatable(path, "it")


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


def read_text(path: Path | str) -> str:
    """The UTF-8 text of a file; a one-line TLIError naming the file when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TLIError(f"{path}: no such file") from None
    except OSError as err:
        raise TLIError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise TLIError(f"{path}: cannot read: not UTF-8 (at byte offset {err.start})") from None


def read_json(path: Path | str) -> dict[str, Any]:
    """A JSON object from ``path``; a one-line TLIError naming the file when it is not one."""
    import json as _json

    path = Path(path)
    try:
        data = _json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        text = str(err).strip().splitlines()
        raise TLIError(f"{path}: cannot read: {text[0] if text else type(err).__name__}") from None
    if not isinstance(data, dict):
        raise TLIError(f"{path}: expected a JSON object")
    return data
