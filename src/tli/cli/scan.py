"""``tli scan``: alignment at every layer, with baseline, margin and retrieval; Figure 1."""

from __future__ import annotations

import argparse
import sys
import time

from tli.cli.options import (
    add_model_arguments,
    add_out_arguments,
    add_pair_arguments,
    add_plan_argument,
    check_out,
    checked_sets,
    model_config,
    replacing_out,
)
from tli.config import add_dataclass_arguments, build, overrides_from_args
from tli.scan import CSV_NAME, JSON_NAME, PNG_NAME, ScanConfig

NAME = "scan"
HELP = "layer scan: alignment at every layer, with baseline, margin and retrieval"
DESCRIPTION = (
    "Embed every word of the pair sets at every layer 0..N (one pass per "
    "batch), report per layer and set the mean pair cosine (the paper's pilot metric), "
    "the mismatched-pair baseline, the margin with a bootstrap CI and retrieval P@1/P@5/"
    "MRR (NN and CSLS, both directions), choose a layer and write scan.csv, scan.json "
    "and scan.png to --out."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli scan``."""
    add_pair_arguments(p)
    add_dataclass_arguments(p, ScanConfig)
    add_model_arguments(p)
    add_out_arguments(p, "scan", "scan")
    add_plan_argument(p)


def run(args: argparse.Namespace) -> int:
    """Run ``tli scan``; returns the exit code."""
    from tli.models import check_loadable, load_config, load_model
    from tli.plots import plot_scan
    from tli.scan import run_scan

    cfg = build(ScanConfig, overrides_from_args(ScanConfig, args))
    model_cfg = model_config(args)
    if args.plan:
        from tli.models import config_only
        from tli.plan import model_stage, print_plan

        config = config_only(model_cfg.name, trust_remote_code=model_cfg.trust_remote_code)
        return print_plan([model_stage("scan", model_cfg, config)], model_cfg.device)
    check_out(args.out, JSON_NAME, "a scan", args.overwrite)
    sets, languages = checked_sets(args, "the scan")
    check_loadable(model_cfg)
    load_config(model_cfg.name, trust_remote_code=model_cfg.trust_remote_code)
    with replacing_out(args.out, "scan", JSON_NAME, "a scan", args.overwrite):
        start = time.perf_counter()
        loaded = load_model(model_cfg)
        load_s = time.perf_counter() - start
        result = run_scan(loaded, sets, cfg, languages=languages)
        result.timings["load_s"] = load_s
        result.inputs["pairs"] = (
            str(args.pairs) if args.pairs else "tli/data/lexicon.tsv (bundled)"
        )
        if args.control is not None:
            result.inputs["control"] = str(args.control)
        result.save(args.out)
        plot_scan(result, args.out / PNG_NAME)
    print(result.table(with_warnings=False))  # the warnings went to stderr already
    print(
        f"wrote {args.out / CSV_NAME}, {args.out / JSON_NAME}, {args.out / PNG_NAME} "
        f"(scan {result.timings['total_s']:.1f} s after a {load_s:.1f} s load)"
    )
    sys.stdout.flush()
    return 0
