"""``tli plot DIR``: redraw every figure of a run or scan directory from its results alone."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tli.errors import TLIError

NAME = "plot"
HELP = "redraw the figures of a results directory"
DESCRIPTION = (
    "Redraw every figure from the saved results in DIR (no model is loaded): "
    "scan.png from scan.json."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli plot``."""
    p.add_argument("directory", type=Path, metavar="DIR", help="a scan or run directory")


def redraw(directory: str | os.PathLike[str]) -> list[Path]:
    """Redraw every figure whose results a directory holds; return the files written.

    A run directory (``config.toml`` and ``scan/`` or ``eval/``) gets all its figures redrawn
    into ``figures/`` (with the sample settings recorded in its config); a scan directory gets
    ``scan.png`` redrawn beside its ``scan.json``.
    """
    from tli.pipeline.config import load_run_config
    from tli.plots import draw_run_figures, plot_scan
    from tli.scan import JSON_NAME, PNG_NAME, ScanResult

    root = Path(directory)
    if not root.is_dir():
        raise TLIError(
            f"{root}: no such directory" if not root.exists() else f"{root}: not a directory"
        )
    if (root / "config.toml").is_file() and ((root / "scan").is_dir() or (root / "eval").is_dir()):
        figs = load_run_config(root / "config.toml").figures
        written = draw_run_figures(root, n_pairs=figs.tsne_pairs, seed=figs.seed)
        if written:
            return written
    written: list[Path] = []
    for folder in (root, root / "scan"):
        if (folder / JSON_NAME).is_file():
            written.append(plot_scan(ScanResult.load(folder), folder / PNG_NAME))
    if not written:
        raise TLIError(f"{root}: no results to plot (expected {JSON_NAME} or scan/{JSON_NAME})")
    return written


def run(args: argparse.Namespace) -> int:
    """Run ``tli plot``; returns the exit code."""
    from tli.lock import locked_dir

    root = Path(args.directory)
    if not root.is_dir():
        raise TLIError(
            f"{root}: no such directory" if not root.exists() else f"{root}: not a directory"
        )
    with locked_dir(root, "plot"):  # not while a run writes its results there
        written = redraw(root)
    for path in written:
        print(f"wrote {path}")
    return 0
