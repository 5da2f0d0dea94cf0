"""``tli run``: the whole protocol into one run directory (``--resume``, ``--overwrite``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tli.cli.options import add_plan_argument
from tli.config import parse_set, read_toml
from tli.errors import TLIError
from tli.pipeline.config import absolute_paths, load_run_config, resolve_sources
from tli.pipeline.presets import PRESETS
from tli.pipeline.runner import run_pipeline

NAME = "run"
HELP = "the whole protocol: pairs, scan, layer choice, train, evaluate, figures, report"
DESCRIPTION = (
    "Run the TLI protocol end to end into a run directory. Defaults: the "
    "embedded gemma-3-270m, the bundled lexicon and its split, the paper's settings."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli run``."""
    p.add_argument(
        "--config",
        type=Path,
        help="a TOML file (sections: model, pairs, scan, "
        "train, evaluate, figures; see docs/config.md)",
    )
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: paper)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/tli)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", type=Path, metavar="DIR", help="finish the run in DIR")
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="with --resume: re-run a finished stage whose settings in DIR/config.toml changed, "
        "and every stage after it (without it such a resume is refused)",
    )
    p.add_argument("--model", help="shortcut for --set model.name=...")
    p.add_argument("--pairs", help="shortcut for --set pairs.file=...")
    p.add_argument("--src-lang", help="shortcut for --set pairs.src_lang=... (e.g. German)")
    p.add_argument("--tgt-lang", help="shortcut for --set pairs.tgt_lang=...")
    p.add_argument(
        "--report-to",
        metavar="TRACKER",
        help="shortcut for --set train.report_to=...: none, tensorboard, mlflow or wandb "
        "(training curves through accelerate's trackers)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key, e.g. --set train.epochs=3 (repeatable)",
    )
    add_plan_argument(p)


def _plan(cfg: Any) -> int:
    from tli.plan import print_plan, run_stages

    return print_plan(run_stages(cfg), cfg.model.device)


def run(args: argparse.Namespace) -> int:
    """Run ``tli run``; returns the exit code."""
    shortcuts = (args.model, args.pairs, args.src_lang, args.tgt_lang, args.report_to)
    if args.resume is not None and (
        args.config or args.preset or args.set or args.out or any(shortcuts)
    ):
        raise TLIError(
            "--resume DIR continues the run with its saved config; give no other config options"
        )
    if args.resume is not None and args.overwrite:
        raise TLIError("--resume continues a run and --overwrite replaces it: give one of them")
    if args.rerun_changed and args.resume is None:
        raise TLIError("--rerun-changed goes with --resume DIR")
    cfg = None
    if args.resume is not None:
        run_dir = args.resume
        if args.plan:
            return _plan(load_run_config(Path(run_dir) / "config.toml"))
    else:
        layers: list[tuple[str, dict[str, Any]]] = []
        if args.config is not None:
            layers.append((str(args.config), read_toml(args.config)))
        cli: dict[str, Any] = parse_set(args.set)
        if args.preset:
            cli["preset"] = args.preset
        if args.model:
            cli.setdefault("model", {})["name"] = args.model
        if args.pairs:
            cli.setdefault("pairs", {})["file"] = args.pairs
        for section, key, value in (
            ("pairs", "src_lang", args.src_lang),
            ("pairs", "tgt_lang", args.tgt_lang),
            ("train", "report_to", args.report_to),
        ):
            if value:
                cli.setdefault(section, {})[key] = value
        cfg = resolve_sources(*layers, ("command line", cli))
        cfg = absolute_paths(cfg)
        if args.plan:
            return _plan(cfg)
        run_dir = args.out or Path("runs/tli")
    start = time.perf_counter()
    out = run_pipeline(cfg, Path(run_dir), resume=args.resume is not None,
                       overwrite=args.overwrite, rerun_changed=args.rerun_changed)  # fmt: skip
    from tli.io import read_json

    record = read_json(out / "run.json")
    for line in record["stages"].get("evaluate", {}).get("verdicts", []):
        print(line)
    print(f"run finished in {time.perf_counter() - start:.0f} s: {out / 'report.html'}")
    return 0
