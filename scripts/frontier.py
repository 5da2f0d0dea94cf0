r"""The frontier of a sweep: trained-set P@1, control P@1 and perplexity change per cell.

Reads a sweep directory's cell records (``cells/*/cell.json``, written by ``tli sweep`` with
``perplexity = true``), averages each cell's figures over its seeds, and draws two panels:
trained-set P@1 against control P@1, and the larger of the two languages' perplexity changes
against control P@1. Reference lines mark the goals given on the command line. ``--mark``
names the cell (its axes without the seed, as in sweep.md) a preset takes.

    python scripts/frontier.py runs/sweep-inject runs/sweep-inject-bank \\
        --out docs/img/inject_frontier.png --control-goal 0.077 --trained-goal 0.9 \\
        --ppl-goal 0.05 --mark "objective=nce_lr2e-3"

Several sweep directories (rounds of one search) are drawn on one figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell_points(sweep_dir: Path, figure: str = "p_at_1_s2t_centered") -> list[dict]:
    """One point per cell over seeds: label, control, validation and trained P@1, perplexity."""
    groups: dict[str, list[dict]] = {}
    for path in sorted((sweep_dir / "cells").glob("*/cell.json")):
        record = json.loads(path.read_text())
        axes = {k: v for k, v in record["axes"].items() if k != "seed"}
        label = ", ".join(f"{k}={v}" for k, v in axes.items())
        groups.setdefault(label, []).append(record)
    points = []
    for label, records in groups.items():

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        point = {
            "label": label,
            "seeds": len(records),
            "control": mean([r["post"][figure] for r in records]),
            "trained": mean([r["trained"]["post"][figure] for r in records]),
        }
        if all("validation" in r for r in records):
            point["validation"] = mean([r["validation"]["post"][figure] for r in records])
        if all("perplexity" in r for r in records):
            point["ppl"] = mean(
                [max(c["change"] for c in r["perplexity"].values()) for r in records]
            )
        points.append(point)
    return points


def main(argv: list[str] | None = None) -> None:
    """Draw the figure; print the points as JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dirs", type=Path, nargs="+", metavar="sweep_dir")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--control-goal", type=float, default=None)
    p.add_argument("--trained-goal", type=float, default=None)
    p.add_argument("--ppl-goal", type=float, default=None, help="largest perplexity rise")
    p.add_argument("--mark", default=None, help="the cell the preset takes")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [q for d in args.sweep_dirs for q in cell_points(d)]
    for point in points:
        print(json.dumps(point))
    with_ppl = all("ppl" in q for q in points)
    fig, axes = plt.subplots(1, 2 if with_ppl else 1, figsize=(11 if with_ppl else 5.5, 4.5))
    axes = list(axes) if with_ppl else [axes]
    panels = [("trained", "trained-set P@1 (centred, final layer)", args.trained_goal)]
    if with_ppl:
        panels.append(("ppl", "largest perplexity change (sw, en)", args.ppl_goal))
    for ax, (key, ylabel, goal) in zip(axes, panels, strict=True):
        for i, q in enumerate(points):
            marked = args.mark is not None and q["label"] == args.mark
            y = 100 * q[key] if key == "ppl" else q[key]
            ax.scatter(q["control"], y, s=80 if marked else 30, marker="*" if marked else "o",
                       color="C3" if marked else "C0", zorder=3)  # fmt: skip
            ax.annotate(q["label"].replace("objective=", ""), (q["control"], y), fontsize=6,
                        xytext=(4, 4 - 10 * (i % 2)), textcoords="offset points")  # fmt: skip
        if args.control_goal is not None:
            ax.axvline(args.control_goal, color="grey", ls="--", lw=0.8)
        if goal is not None:
            ax.axhline(100 * goal if key == "ppl" else goal, color="grey", ls="--", lw=0.8)
        if key == "ppl":
            ax.set_yscale("symlog", linthresh=10)  # +2% and +2000% on one axis
            lowest = min(100 * q["ppl"] for q in points)
            ax.set_ylim(bottom=min(-10.0, 2 * lowest))  # not the mirror image of the top
        ax.set_xlabel("control P@1 (centred, final layer)")
        ax.set_ylabel(ylabel + (" (%)" if key == "ppl" else ""))
        ax.grid(alpha=0.3)
    names = ", ".join(d.name for d in args.sweep_dirs)
    fig.suptitle(f"{names}: each cell, mean over its seeds; dashed: the goals")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)


if __name__ == "__main__":
    main()
