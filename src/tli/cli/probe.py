"""``tli probe``: greedy generations base vs. tuned; ``--score``: few-shot word translation."""

from __future__ import annotations

import argparse
import sys

from tli.cli.options import (
    adapter_command,
    add_adapter_arguments,
    add_out_arguments,
    add_pair_arguments,
    check_out,
    replacing_out,
)
from tli.config import add_dataclass_arguments, build, overrides_from_args
from tli.probe import (
    PROBE_JSON,
    PROBE_MD,
    RANK_JSON,
    RANK_MD,
    SCORES_JSON,
    SCORES_MD,
    TEXT_FIELDS,
    ProbeConfig,
)

NAME = "probe"
HELP = (
    "generate from base and tuned model; --score: few-shot word translation + McNemar; "
    "--rank: the LM-ranking yardstick"
)
DESCRIPTION = (
    "Probe an adapter with prompt templates (translation both ways, a "
    "code-switched sentence, a contextual definition): greedy output of the base and the "
    "tuned model side by side (probe.md, probe.json). With --score, also few-shot word "
    "translation of the trained and control sets in both directions, exact match and chrF, "
    "base vs. tuned by McNemar's exact test (probe_scores.md, probe_scores.json). With --rank, "
    "the LM-ranking yardstick: the base model ranks every candidate translation of a set by "
    "its log-probability after a few-shot prompt, P@1 raw and calibrated (probe_rank.md, "
    "probe_rank.json). See docs/probe.md."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli probe``."""
    add_adapter_arguments(p)
    add_pair_arguments(p)
    add_out_arguments(p, "probe", "probe")
    add_dataclass_arguments(p, ProbeConfig, skip=("enabled",))


def run(args: argparse.Namespace) -> int:
    """Run ``tli probe``; returns the exit code."""
    import time

    from tli.models import load_model
    from tli.probe import probe

    overrides = overrides_from_args(ProbeConfig, args)
    for key in TEXT_FIELDS:  # a shell argument cannot hold a line break: accept "\n" for one
        if isinstance(overrides.get(key), str):
            overrides[key] = overrides[key].replace("\\n", "\n")
    cfg = build(ProbeConfig, overrides)
    check_out(args.out, PROBE_JSON, "a probe", args.overwrite)
    info, sets, languages, model_cfg = adapter_command(args, "the probe")
    with replacing_out(args.out, "probe", PROBE_JSON, "a probe", args.overwrite):
        start = time.perf_counter()
        loaded = load_model(model_cfg)
        load_s = time.perf_counter() - start
        result = probe(loaded, info.dir, sets, cfg, args.out, languages=languages)
    print(result.summary_line())
    if result.scored:
        print()
        print(result.score_table())
    if result.rank:
        from tli.tables import rank_line

        print(rank_line(result.rank))
    files = [PROBE_MD, PROBE_JSON] + ([SCORES_MD, SCORES_JSON] if result.scored else [])
    files += [RANK_MD, RANK_JSON] if result.rank else []
    print(
        f"wrote {', '.join(str(args.out / f) for f in files)} (probe "
        f"{result.timings['total_s']:.1f} s after a {load_s:.1f} s load)"
    )
    sys.stdout.flush()
    return 0
