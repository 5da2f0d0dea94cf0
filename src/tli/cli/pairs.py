"""``tli pairs check`` and ``tli pairs split``: validate, summarise and split pair files."""

from __future__ import annotations

import argparse
import logging

from tli.cli.options import add_key_arguments
from tli.errors import TLIError
from tli.pairs import (
    FORMATS,
    Pair,
    check_leakage,
    read_pairs,
    split_pairs,
    split_sets,
    summarize,
    token_counts,
    write_pairs,
)

log = logging.getLogger("tli")


def _read_args(args: argparse.Namespace, path: str) -> list[Pair]:
    return read_pairs(path, src_key=args.src_key, tgt_key=args.tgt_key, fmt=args.format)


def _report_leaks(leaks: list[str], what: str) -> None:
    print(f"leakage {what}: {len(leaks) or 'none'}")
    for line in leaks[:20]:
        print(f"  {line}")
    if len(leaks) > 20:
        print(f"  ... and {len(leaks) - 20} more")


def _cmd_check(args: argparse.Namespace) -> int:
    pairs = _read_args(args, args.file)
    print(f"{args.file}")
    print(summarize(pairs))
    print()
    leaks: list[tuple[list[str], str]] = []
    sets = split_sets(pairs)
    if any(p.split is not None for p in pairs):
        leaks.append(
            (check_leakage(sets["trained"], sets["control"]), "between trained and control")
        )
    if args.against:
        trained = split_sets(_read_args(args, args.against))["trained"]
        leaks.append((check_leakage(trained, pairs), f"with {args.against}"))
    if args.model:
        from tli.models import load_tokenizer

        counts = token_counts(pairs, load_tokenizer(args.model))
        for side, key in (("source", args.src_key), ("target", args.tgt_key)):
            mean, most = counts[side]
            print(f"tokens per {key} entry ({args.model}): mean {mean:.2f}, max {most}")
    for found, what in leaks:
        _report_leaks(found, what)
    total = sum(len(found) for found, _ in leaks)
    if total and args.allow_overlap:
        log.warning("%s: %d overlapping item(s), allowed by --allow-overlap", args.file, total)
    elif total:
        raise TLIError(
            f"{args.file}: {total} overlapping item(s) between trained and control "
            "(listed above; use --allow-overlap to accept)"
        )
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {text}")
    return value


def _cmd_split(args: argparse.Namespace) -> int:
    from tli.config import check_seed

    try:
        check_seed("--seed", args.seed)
    except TLIError as err:
        raise TLIError(f"tli pairs split: {err}") from None
    pairs = _read_args(args, args.file)
    split = split_pairs(pairs, control_fraction=args.control_fraction, seed=args.seed)
    sets = split_sets(split)
    if args.control_fraction > 0 and not sets["control"]:
        raise TLIError(
            f"{args.file}: {len(pairs)} pair(s) leave no control pair at --control-fraction "
            f"{args.control_fraction} (each category holds out round(fraction x its size)); "
            "give more pairs or a larger fraction"
        )
    write_pairs(split, args.out, src_key=args.src_key, tgt_key=args.tgt_key)
    print(
        f"wrote {args.out}: {len(sets['trained'])} trained, {len(sets['control'])} control "
        f"(seed {args.seed}, control fraction {args.control_fraction})"
    )
    return 0


NAME = "pairs"
HELP = "check and split word-pair files"
DESCRIPTION = "Read, validate, summarise and split word-pair files."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli pairs``."""
    sub = p.add_subparsers(dest="pairs_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", metavar="FILE", help="pair file (.json, .jsonl, .csv, .tsv)")
        add_key_arguments(p)
        p.add_argument("--format", choices=FORMATS, help="file format (default: by extension)")

    check = sub.add_parser(
        "check",
        help="validate a pair file, summarise it and check for train/control leakage",
        description="Validate FILE and print a summary. Leakage between its trained and "
        "control sets, or (--against) between FILE and the trained set of TRAINED, is an "
        "error unless --allow-overlap. Exit code 0 when clean, 2 on an error.",
    )
    common(check)
    check.add_argument("--against", metavar="TRAINED", help="trained pair file; FILE is control")
    check.add_argument(
        "--allow-overlap", action="store_true", help="report leakage as a warning, not an error"
    )
    check.add_argument("--model", metavar="M", help="also count tokens per entry with M")
    check.set_defaults(pairs_func=_cmd_check)

    split = sub.add_parser(
        "split",
        help="split a pair file into trained/control without leakage",
        description="Write FILE with its split column filled: a seeded split, stratified by "
        "category, with no shared headword, root, stem or gloss across the sets.",
    )
    common(split)
    split.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    split.add_argument(
        "--control-fraction",
        type=_fraction,
        default=0.1,
        help="share of each category held out as control (default: 0.1)",
    )
    split.add_argument("--out", required=True, metavar="OUT.tsv", help="output TSV (may be FILE)")
    split.set_defaults(pairs_func=_cmd_split)


def run(args: argparse.Namespace) -> int:
    """Run ``tli pairs check`` or ``tli pairs split``; returns the exit code."""
    return args.pairs_func(args)
