r"""Trained-set P@1 of a sweep cell against the frozen targets and against the adapted ones.

With ``negatives = lexicon`` the source words are trained against the *frozen* model's target
vectors, but an evaluation embeds the targets through the adapted model. This prints, for the
cell's trained and validation pairs at the final layer (centred NN, source to target), P@1
against both, which separates "the sources were not moved" from "the targets moved away".

    python scripts/frozen_targets.py runs/sweep-inject-bank "objective=hold_p50__seed=0"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """Print one JSON line per set: P@1 against the adapted and the frozen targets."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("cell", help="the cell's directory name under cells/")
    args = p.parse_args(argv)

    from safetensors.torch import load_file

    from tli.adapters import attached, read_adapter
    from tli.metrics import centered_report
    from tli.models import ModelConfig, load_model
    from tli.pairs import gold_mask
    from tli.sweep import _control_vectors, _sets, read_grid

    grid = read_grid(args.sweep_dir / "grid.toml")
    sets = _sets(grid.sweep)
    base = load_model(ModelConfig(name=grid.sweep.model))
    saved = load_file(args.sweep_dir / "base.safetensors")
    adapter = read_adapter(args.sweep_dir / "cells" / args.cell / "train" / "final")
    with attached(base, adapter, "evaluated") as tuned:
        for name in [s for s in ("trained", "validation") if f"{s}.target" in saved]:
            pairs = sets[name]
            src, tgt = _control_vectors(
                tuned, base.tokenizer, pairs, base.num_layers, grid.sweep.pooling
            )
            out = {"set": name, "n": len(pairs)}
            for label, targets in (("adapted", tgt[0]), ("frozen", saved[f"{name}.target"][0])):
                ranks = centered_report(src[0], targets, gold_mask(pairs))["rank_centered"]
                out[f"p_at_1_vs_{label}_targets"] = round(float((ranks == 1).float().mean()), 4)
            print(json.dumps(out))


if __name__ == "__main__":
    main()
