"""``tli evaluate``: base vs. base + adapter, Tables 1 and 2, baseline, margin, retrieval."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tli.cli.options import (
    adapter_and_model,
    add_adapter_arguments,
    add_pair_arguments,
    checked_sets,
)
from tli.config import add_dataclass_arguments, build, overrides_from_args
from tli.evaluate import CSV_NAME, JSON_NAME, MD_NAME, VECTORS_NAME, EvalConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tli evaluate``."""
    p = sub.add_parser(
        "evaluate",
        help="base vs. base + adapter: Tables 1 and 2, baseline, margin, retrieval, verdict",
        description="Embed every pair of the trained and control sets at every layer with the "
        "base model and with the adapter merged; report per set and layer the paper's Table 1 "
        "(mean (std), change, paired t-test) with the mismatched-pair baseline, the margin and "
        "retrieval P@1, a verdict per set at the final layer (docs/evaluation.md), and Table 2. "
        "Writes pairs.csv, evaluation.json, evaluation.md and vectors.safetensors to --out.",
    )
    add_adapter_arguments(p)
    add_pair_arguments(p)
    p.add_argument(
        "--out", type=Path, default=Path("eval"), help="output directory (default: eval)"
    )
    add_dataclass_arguments(p, EvalConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tli.evaluate import evaluate
    from tli.io import ensure_writable_dir
    from tli.models import load_model

    cfg = build(EvalConfig, overrides_from_args(EvalConfig, args))
    ensure_writable_dir(args.out)
    info, model_cfg = adapter_and_model(args)
    sets = checked_sets(args, "the evaluation")
    start = time.perf_counter()
    loaded = load_model(model_cfg)
    load_s = time.perf_counter() - start
    result = evaluate(loaded, info.dir, sets, cfg, args.out)
    print("\n".join(result.verdict_lines()))
    print()
    print(f"Table 1 (final layer, {result.num_layers}):")
    print(result.table1())
    print(
        f"wrote {args.out / CSV_NAME}, {args.out / JSON_NAME}, {args.out / MD_NAME}, "
        f"{args.out / VECTORS_NAME} (evaluation {result.timings['total_s']:.1f} s after a "
        f"{load_s:.1f} s load)"
    )
    sys.stdout.flush()
    return 0
