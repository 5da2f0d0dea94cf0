"""The run directory: its layout, its lock, its environment record, and its clean-up.

Run directory::

    config.toml        the resolved config (re-run with: tli run --config DIR/config.toml)
    environment.json   versions, git commit, seed, device, time
    run.json           what each stage did, the chosen layer, timings
    pairs/             pairs.tsv (trained + control, with the split) and summary.json
    scan/ train/ eval/ probe/ figures/
    report.md  report.html

Each stage finishes by writing one file last (its *marker*, :data:`MARKERS`), and a lock file
(:data:`tli.lock.LOCK`) keeps a second process out of a directory that a live one holds.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

from tli.errors import TLIError
from tli.io import is_leftover
from tli.lock import LOCK, has_content

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
__all__ = ["LOCK", "MARKERS", "STAGES", "environment", "prepare_run_dir", "remove_leftovers"]


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
    """Check that ``run_dir`` can hold this run; nothing is created or removed here.

    Replacing a finished run (``--overwrite``) happens only once the lock is held
    (:func:`tli.io.SetAside`), so a second run never touches the files of a live one.
    """
    from tli.io import ensure_writable_dir

    if run_dir.exists() and not run_dir.is_dir():
        raise TLIError(f"{run_dir}: exists and is not a directory")
    if resume:
        if not (run_dir / "config.toml").is_file() and not (run_dir / ASIDE_CONFIG).is_file():
            raise TLIError(f"{run_dir}: not a tli run directory (no config.toml) to resume")
        return
    if has_content(run_dir) and not (run_dir / "config.toml").is_file():
        raise TLIError(
            f"{run_dir}: exists, is not empty and is not a tli run directory; "
            "refusing to write into it" + ("" if not overwrite else " or to overwrite it")
        )
    ensure_writable_dir(run_dir)


#: config.toml of a run set aside by an ``--overwrite`` that was interrupted (it is restored).
ASIDE_CONFIG = ".previous.old/config.toml"


def refuse_existing(run_dir: Path) -> None:
    """With the lock held: refuse a directory that already holds a run (no ``--overwrite``)."""
    if has_content(run_dir):
        raise TLIError(
            f"{run_dir}: exists and is not empty; use --resume to continue it, --overwrite "
            "to replace it, or another --out"
        )


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
