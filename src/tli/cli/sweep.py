"""``tli sweep``: train a grid of objectives and rank them on the control set."""

from __future__ import annotations

import argparse
from pathlib import Path

from tli.errors import TLIError

NAME = "sweep"
HELP = "train a grid of objectives and rank them on the control set"
DESCRIPTION = (
    "Train every cell of a grid (objectives x loss layers x adapted layers x "
    "seeds ...) and evaluate each on the control set at the final layer: margin with CI, "
    "P@1 NN and CSLS. Resumable: finished cells are skipped."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli sweep``."""
    p.add_argument("--grid", type=Path, required=True, help="grid TOML file (see tli.sweep)")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep directory")
    p.add_argument("--jobs", type=int, help="cells at once, each in its own process")
    p.add_argument("--dry-run", action="store_true", help="list the cells and stop")


def run(args: argparse.Namespace) -> int:
    """Run ``tli sweep``; returns the exit code."""
    from tli.io import read_text
    from tli.sweep import read_grid, run_sweep

    grid = read_grid(args.grid)
    text = read_text(args.grid)
    if args.jobs is not None and not 1 <= args.jobs <= 1024:
        raise TLIError(f"--jobs must be in 1..1024, got {args.jobs}")
    if args.dry_run:
        for cell in grid.cells:
            print(cell.name)
        print(f"{len(grid.cells)} cells")
        return 0
    records = run_sweep(grid, args.out, jobs=args.jobs, grid_text=text)
    print((Path(args.out) / "sweep.md").read_text())
    print(f"{len(records)} cells -> {args.out}")
    return 0
