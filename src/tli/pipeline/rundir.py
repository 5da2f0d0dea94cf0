"""The run directory: its layout, its lock, its environment record, and its clean-up.

Run directory::

    config.toml        the resolved config (re-run with: tli run --config DIR/config.toml)
    environment.json   versions, git commit, seed, device, time
    run.json           what each stage did, the chosen layer, timings
    pairs/             pairs.tsv (trained + control, with the split) and summary.json
    scan/ train/ eval/ probe/ figures/
    report.md  report.html

Each stage finishes by writing one file last (its *marker*, :data:`MARKERS`), and a lock file
(:data:`LOCK`) keeps a second process out of a directory that a live one holds.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tli.errors import TLIError
from tli.io import ensure_dir, is_leftover

log = logging.getLogger("tli")

#: The stages of a run, in order.
STAGES = ("pairs", "scan", "train", "evaluate", "probe", "figures", "report")
#: The file each stage writes last; its presence means the stage finished.
MARKERS = {
    "pairs": "pairs/summary.json",
    "scan": "scan/scan.json",
    "train": "train/train.json",
    "evaluate": "eval/evaluation.json",
    "probe": "probe/done.json",
    "figures": "figures/figures.json",
    "report": "report.html",
}
#: The lock file of a run directory.
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
def _lock_mutex(run_dir: Path) -> Iterator[None]:
    """Serialise lock checks between tli processes on this host (flock on the directory).

    Without it two processes could both find the same stale lock and both take it over.
    Where ``fcntl`` is missing (Windows) the check runs unserialised.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def acquire_lock(run_dir: Path) -> Path:
    """Take ``run.lock``; refuse if a live process holds it; take over a stale one.

    The lock file is created whole (written to a temporary name, then hard-linked into place,
    which fails if the lock exists), so a reader never sees an empty lock.
    """
    lock = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    with _lock_mutex(run_dir):
        for _ in range(2):
            tmp = run_dir / f".{LOCK}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(me))
            try:
                os.link(tmp, lock)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "w") as handle:
                        json.dump(me, handle)
                    return lock
            else:
                return lock
            finally:
                tmp.unlink(missing_ok=True)
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError, RecursionError):
                holder = {}
            pid = holder.get("pid") if isinstance(holder, dict) else None
            pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else 0
            same_host = isinstance(holder, dict) and holder.get("host") == socket.gethostname()
            if pid and same_host and _pid_alive(pid):
                raise TLIError(
                    f"{run_dir}: another tli run (pid {pid}) is using this directory; "
                    f"wait for it or choose another --out"
                ) from None
            log.warning("%s: taking over a stale lock (pid %s is gone)", run_dir, pid or "?")
            lock.unlink(missing_ok=True)
    raise TLIError(f"{run_dir}: cannot take the lock {lock}")


def release_lock(lock: Path) -> None:
    """Remove ``lock`` if this process still holds it."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError, RecursionError):
        return
    if isinstance(holder, dict) and holder.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def environment(cfg: Any) -> dict[str, Any]:
    """Versions, git commit, seeds, device and time, for environment.json."""
    import importlib.metadata as md
    import subprocess

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    commit = None
    try:
        here = Path(__file__).resolve().parent
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {
            name: version(name)
            for name in (
                "tli",
                "torch",
                "transformers",
                "peft",
                "accelerate",
                "safetensors",
                "scipy",
                "scikit-learn",
                "matplotlib",
            )
        },
        "git_commit": commit,
        "seeds": {
            "train": cfg.train.seed,
            "scan": cfg.scan.seed,
            "evaluate": cfg.evaluate.seed,
            "split": cfg.pairs.split_seed,
            "figures": cfg.figures.seed,
        },
        "device": cfg.model.device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Check that ``run_dir`` can hold this run; create it. Nothing is removed here.

    Emptying a directory for ``--overwrite`` happens in :func:`empty_run_dir`, only once the
    lock is held, so a second run never deletes the files of a live one.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TLIError(f"{run_dir}: exists and is not a directory")
    if resume:
        if not (run_dir / "config.toml").is_file():
            raise TLIError(f"{run_dir}: not a tli run directory (no config.toml) to resume")
        return
    if _has_content(run_dir) and not (run_dir / "config.toml").is_file():
        raise TLIError(
            f"{run_dir}: exists, is not empty and is not a tli run directory; "
            "refusing to write into it" + ("" if not overwrite else " or to overwrite it")
        )
    ensure_dir(run_dir)


def _has_content(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything but a lock and tli's own leftovers."""
    if not run_dir.is_dir():
        return False
    return any(c.name != LOCK and not is_leftover(c.name) for c in run_dir.iterdir())


def empty_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """With the lock held: refuse a finished or started run, or (``overwrite``) empty it."""
    if not _has_content(run_dir):
        return
    if not overwrite:
        raise TLIError(
            f"{run_dir}: exists and is not empty; use --resume to continue it, --overwrite "
            "to replace it, or another --out"
        )
    import shutil

    # config.toml goes last: a kill part-way leaves a directory --overwrite still accepts.
    children = sorted(run_dir.iterdir(), key=lambda c: c.name == "config.toml")
    for child in children:
        if child.name != LOCK:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporaries that killed writers left in ``run_dir`` (lock held); return them."""
    import shutil

    found = [p for p in run_dir.rglob(".*") if is_leftover(p.name)]
    for path in sorted(found, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.debug("removed %s, left behind by an interrupted run", path)
    return found
