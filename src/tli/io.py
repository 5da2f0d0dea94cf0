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
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    ensure_dir(path.parent if str(path.parent) else Path("."))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
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
