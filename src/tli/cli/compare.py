"""``tli compare``: headline figures of runs or sweep cells side by side (Markdown, HTML, PNG)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "compare"
HELP = "runs or sweep cells side by side: pair cosine, baseline, margin, P@1, verdict, time"
DESCRIPTION = (
    "Read the saved results of run directories (tli run) or sweep cells (tli sweep's "
    "cells/NAME) and write, per run and set at the final layer, the pair cosine, the "
    "mismatched-pair baseline, the margin with its CI, P@1 with its Wilson interval, the "
    "verdict and the training time: compare.md, compare.html, compare.png and compare.json "
    "in --out. No model is loaded."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli compare``."""
    p.add_argument("dirs", nargs="+", metavar="RUN", type=Path, help="run or sweep-cell directory")
    p.add_argument(
        "--out", type=Path, default=Path("compare"), help="output directory (default: compare)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``tli compare``; returns the exit code."""
    from tli.compare import load_compared, write_comparison
    from tli.io import ensure_writable_dir
    from tli.tables import compare_table

    ensure_writable_dir(args.out)
    records = load_compared(args.dirs)
    written = write_comparison(records, args.out)
    print(compare_table(records))
    print(f"wrote {', '.join(str(p) for p in written)}")
    sys.stdout.flush()
    return 0
