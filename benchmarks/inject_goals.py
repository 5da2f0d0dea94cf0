"""Issue 17's three goals for a preset, from a finished sweep of its seeds and the yardsticks.

Reads ``SWEEP/cells/*/cell.json`` (a ``tli sweep`` of the preset's training with several seeds,
``perplexity = true``, no validation split: trained on every trained pair) and the JSON of
``benchmarks/yardsticks.py``, and prints, with the mean over seeds:

* generalise: control P@1 (centred, s2t, final layer) per seed with its Wilson interval, the
  ratio to the best frozen yardstick, and a paired bootstrap interval (over control pairs) of
  the difference between the seeds' mean hit rate and the yardstick's;
* inject: trained-set P@1 (centred, s2t, final layer) per seed;
* do no harm: the perplexity change per language per seed, with its paired bootstrap CI;
* training time per seed.

    python benchmarks/inject_goals.py runs/inject-seeds runs/yardsticks.json \\
        --objective lex_lr2e-3_preserve50

``--objective`` keeps the cells of one objective when the sweep trained several.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tli.stats import wilson_interval


def main() -> None:
    """Print the goals table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("yardsticks", type=Path)
    parser.add_argument("--n-boot", type=int, default=10000)
    parser.add_argument("--objective", default=None, help="only the cells of this objective")
    args = parser.parse_args()
    records = [json.loads(p.read_text()) for p in sorted(args.sweep_dir.glob("cells/*/cell.json"))]
    if args.objective is not None:
        records = [r for r in records if r["axes"].get("objective") == args.objective]
    if not records:
        raise SystemExit(
            f"{args.sweep_dir}: no finished cell"
            + (f" of objective {args.objective!r}" if args.objective else "")
        )
    yard = json.loads(args.yardsticks.read_text())["best_control"]
    y_hits = np.asarray(yard["hits"], dtype=float)  # (B,)
    hits = np.asarray([r["hits_s2t_centered"] for r in records], dtype=float)  # (S, B)
    n = hits.shape[1]
    print(f"best frozen yardstick: {yard['where']} P@1 {yard['p_at_1']:.4f} "
          f"({int(y_hits.sum())}/{n}); goal >= {1.5 * yard['p_at_1']:.4f}")  # fmt: skip
    rows = []
    for r, h in zip(records, hits, strict=True):
        k = int(h.sum())
        lo, hi = wilson_interval(k, n)
        row = {
            "cell": r["name"],
            "control_p1": k / n,
            "control_ci": [round(lo, 4), round(hi, 4)],
            "trained_p1": r["trained"]["post"]["p_at_1_s2t_centered"],
            "ppl": {
                c: [round(v[x], 4) for x in ("change", "lo", "hi")]
                for c, v in r["perplexity"].items()
            },  # fmt: skip
            "train_seconds": r["train_seconds"],
        }
        rows.append(row)
        print(json.dumps(row))
    mean_hits = hits.mean(0)  # (B,)
    diff = float(mean_hits.mean() - y_hits.mean())
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, size=(args.n_boot, n))
    boot = mean_hits[idx].mean(1) - y_hits[idx].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    summary = {
        "seeds": len(records),
        "control_p1_mean": float(mean_hits.mean()),
        "ratio_to_yardstick": float(mean_hits.mean() / y_hits.mean()),
        "difference": diff,
        "difference_ci": [float(lo), float(hi)],
        "trained_p1_mean": float(np.mean([r["trained_p1"] for r in rows])),
        "ppl_mean": {c: float(np.mean([r["ppl"][c][0] for r in rows])) for c in rows[0]["ppl"]},
        "ppl_worst_hi": {c: float(max(r["ppl"][c][2] for r in rows)) for c in rows[0]["ppl"]},
        "train_seconds": [r["train_seconds"] for r in rows],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
