"""``tli evaluate``: base vs. base + adapter, Tables 1 and 2, baseline, margin, retrieval."""

from __future__ import annotations

import argparse
import sys

from tli.cli.options import (
    adapter_and_model,
    adapter_command,
    add_adapter_arguments,
    add_out_arguments,
    add_pair_arguments,
    add_plan_argument,
    check_out,
    replacing_out,
)
from tli.config import add_dataclass_arguments, build, overrides_from_args
from tli.evaluate import CSV_NAME, JSON_NAME, MD_NAME, VECTORS_NAME, YARDSTICKS_PNG, EvalConfig

NAME = "evaluate"
HELP = "base vs. base + adapter: Tables 1 and 2, baseline, margin, retrieval, verdict"
DESCRIPTION = (
    "Embed every pair of the trained and control sets at every layer with the "
    "base model and with the adapter merged (unmerged on a 4-bit base: merging would "
    "re-quantize); report per set and layer the paper's Table 1 "
    "(mean (std), change, paired t-test) with the mismatched-pair baseline, the margin and "
    "retrieval P@1, a verdict per set at the final layer (docs/evaluation.md), and Table 2; "
    "the frozen yardsticks of the base model per layer (a Procrustes map fitted on the trained "
    "pairs; centred retrieval) and the do-no-harm perplexity check on everyday Swahili and "
    "English texts (docs/perplexity.md). Writes pairs.csv, evaluation.json, evaluation.md, "
    "vectors.safetensors and yardsticks.png to --out."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli evaluate``."""
    add_adapter_arguments(p)
    add_pair_arguments(p)
    add_out_arguments(p, "eval", "evaluation")
    add_dataclass_arguments(p, EvalConfig)
    p.add_argument(
        "--no-perplexity",
        dest="perplexity",
        action="store_const",
        const=False,
        default=argparse.SUPPRESS,
        help="skip the do-no-harm perplexity check (same as --perplexity false)",
    )
    add_plan_argument(p)


def run(args: argparse.Namespace) -> int:
    """Run ``tli evaluate``; returns the exit code."""
    import time

    from tli.evaluate import evaluate
    from tli.models import load_model
    from tli.perplexity import text_sets
    from tli.plots import plot_yardsticks

    cfg = build(EvalConfig, overrides_from_args(EvalConfig, args))
    if args.plan:
        from tli.models import config_only
        from tli.plan import model_stage, print_plan

        _, mcfg = adapter_and_model(args)
        config = config_only(mcfg.name, trust_remote_code=mcfg.trust_remote_code)
        note = "the adapter runs unmerged on 4-bit weights" if mcfg.load_in_4bit else ""
        return print_plan([model_stage("evaluate", mcfg, config, note=note)], mcfg.device)
    if cfg.perplexity:
        text_sets(cfg.texts)  # a bad text file fails before any model is loaded
    check_out(args.out, JSON_NAME, "an evaluation", args.overwrite)
    info, sets, languages, model_cfg = adapter_command(args, "the evaluation")
    with replacing_out(args.out, "evaluate", JSON_NAME, "an evaluation", args.overwrite):
        start = time.perf_counter()
        loaded = load_model(model_cfg)
        load_s = time.perf_counter() - start
        result = evaluate(loaded, info.dir, sets, cfg, args.out, languages=languages)
        figure = plot_yardsticks(args.out, args.out / YARDSTICKS_PNG)
    print("\n".join(result.summary_lines()))
    print()
    print(f"Table 1 (final layer, {result.num_layers}):")
    print(result.table1())
    print(
        f"wrote {args.out / CSV_NAME}, {args.out / JSON_NAME}, {args.out / MD_NAME}, "
        f"{args.out / VECTORS_NAME}, {figure} (evaluation {result.timings['total_s']:.1f} s "
        f"after a {load_s:.1f} s load)"
    )
    sys.stdout.flush()
    return 0
