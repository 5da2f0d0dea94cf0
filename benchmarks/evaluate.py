"""Time of `tli evaluate` on the embedded model: the bundled lexicon, pre and post, every layer.

The pairs are the bundled lexicon with its stored split (``tli.pairs.load_sets``: 1343 trained +
272 control); ``--trained`` / ``--control`` cut them (e.g. to the paper's 623 + 63). The adapter
is a real one, trained here by
``tli.train`` for one epoch at layer 2 (the paper's settings otherwise), depth-truncated, so the
post-training vectors differ from the base ones as they would in a run. Training and model
loading are timed apart; the figure that counts is ``evaluate_s``: ``tli.evaluate.evaluate``
once the full model is loaded (adapter checks, both embedding passes at layers 0..N, merging,
every statistic with 1000 bootstrap resamples, writing every file). Goal (issue 6): <= 60 s on
2 CPU cores.

Usage: python benchmarks/evaluate.py [--model gemma-3-270m] [--epochs 1] [--out DIR]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--layer", type=int, default=2, help="training layer (paper: 2)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--trained", type=int, default=None, help="first N trained pairs")
    parser.add_argument("--control", type=int, default=None, help="first N control pairs")
    parser.add_argument("--out", type=Path, help="keep the evaluation here (default: temporary)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    import torch

    from tli.evaluate import EvalConfig, evaluate
    from tli.models import ModelConfig, load_model, load_tokenizer
    from tli.pairs import load_sets
    from tli.train import TrainConfig, train

    sets = load_sets().as_dict()
    sets = {"trained": sets["trained"][: args.trained], "control": sets["control"][: args.control]}
    n_pairs = sum(len(p) for p in sets.values())
    with tempfile.TemporaryDirectory(prefix="tli-bench-eval-") as tmp:
        tok = load_tokenizer(args.model)
        start = time.perf_counter()
        shallow = load_model(ModelConfig(args.model), max_layer=args.layer, tokenizer=tok)
        result = train(
            shallow,
            sets["trained"],
            TrainConfig(layer=args.layer, epochs=args.epochs, save_every=0),
            Path(tmp) / "train",
            progress=False,
        )
        train_s = time.perf_counter() - start
        del shallow

        start = time.perf_counter()
        base = load_model(ModelConfig(args.model), tokenizer=tok)
        load_s = time.perf_counter() - start

        out = args.out or Path(tmp) / "eval"
        start = time.perf_counter()
        evaluation = evaluate(base, result.adapter_dir, sets, EvalConfig(), out)
        evaluate_s = time.perf_counter() - start

    print("\n".join(evaluation.verdict_lines()))
    print(evaluation.table1())
    print(
        f"evaluated {n_pairs} pairs ({evaluation.timings['n_strings']:.0f} strings) at "
        f"{len(evaluation.layers)} layers pre and post in {evaluate_s:.1f} s "
        f"(goal <= {GOAL_S:.0f} s); load {load_s:.1f} s, training {train_s:.1f} s"
    )
    figures = {
        "benchmark": "evaluate",
        "model": args.model,
        "pairs": n_pairs,
        "trained": len(sets["trained"]),
        "control": len(sets["control"]),
        "strings": int(evaluation.timings["n_strings"]),
        "layers": len(evaluation.layers),
        "adapter": f"tli.train, {args.epochs} epoch(s) at layer {args.layer}, paper settings",
        "train_steps": result.steps,
        "train_s": round(train_s, 2),
        "load_s": round(load_s, 2),
        "evaluate_s": round(evaluate_s, 2),
        "goal_s": GOAL_S,
        "within_goal": evaluate_s <= GOAL_S,
        "timings": {k: round(v, 3) for k, v in evaluation.timings.items()},
        "verdicts": {name: v.code for name, v in evaluation.verdicts.items()},
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
