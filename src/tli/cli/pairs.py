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
    detect_format,
    file_languages,
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


def _languages(args: argparse.Namespace, path: str) -> tuple[str, str]:
    """``--src-lang`` / ``--tgt-lang``, else the languages FILE names (its keys or file name)."""
    keys: dict[str, str] = {}
    read_pairs(path, src_key=args.src_key, tgt_key=args.tgt_key, fmt=args.format, keys=keys)
    found = file_languages(path, detect_format(path, args.format), keys)
    return args.src_lang or found[0], args.tgt_lang or found[1]


def _report_leaks(leaks: list[str], what: str) -> None:
    print(f"leakage {what}: {len(leaks) or 'none'}")
    for line in leaks[:20]:
        print(f"  {line}")
    if len(leaks) > 20:
        print(f"  ... and {len(leaks) - 20} more")


def _cmd_check(args: argparse.Namespace) -> int:
    pairs = _read_args(args, args.file)
    langs = _languages(args, args.file)
    print(f"{args.file} ({langs[0]} -> {langs[1]})")
    print(summarize(pairs))
    print()
    leaks: list[tuple[list[str], str]] = []
    sets = split_sets(pairs)
    if any(p.split is not None for p in pairs):
        leaks.append(
            (
                check_leakage(sets["trained"], sets["control"], langs),
                "between trained and control",
            )
        )
    if args.against:
        trained = split_sets(_read_args(args, args.against))["trained"]
        leaks.append((check_leakage(trained, pairs, langs), f"with {args.against}"))
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
    if not str(args.out).lower().endswith(".tsv"):
        raise TLIError(f"{args.out}: pairs are written as TSV; give a .tsv file name")
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


def _cmd_convert(args: argparse.Namespace) -> int:
    pairs = _read_args(args, args.file)
    out_fmt = detect_format(args.out, args.to)
    out_keys = (args.out_src_key or args.src_key, args.out_tgt_key or args.tgt_key)
    write_pairs(pairs, args.out, src_key=out_keys[0], tgt_key=out_keys[1], fmt=out_fmt)
    n = sum(len(p.targets) for p in pairs)
    print(f"wrote {args.out} ({out_fmt}): {len(pairs)} source entries, {n} translations")
    return 0


NAME = "pairs"
HELP = "check, split and convert word-pair files"
DESCRIPTION = (
    "Read, validate, summarise, split and convert word-pair files (JSON, JSONL, CSV, TSV and "
    "MUSE/vecmap dictionaries)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli pairs``."""
    sub = p.add_subparsers(dest="pairs_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "file", metavar="FILE", help="pair file (.json, .jsonl, .csv, .tsv, MUSE .txt)"
        )
        add_key_arguments(p)
        p.add_argument(
            "--format",
            choices=FORMATS,
            help="format of FILE (default: by extension; .txt is muse: 'source target' per "
            "line, whitespace-separated, a repeated source lists an alternative)",
        )

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

    convert = sub.add_parser(
        "convert",
        help="convert a pair file between JSON, JSONL, CSV, TSV and MUSE",
        description="Read FILE (validated as every command reads it) and write its pairs to OUT "
        "in the format of OUT's extension or --to. A MUSE file holds one 'source target' line "
        "per translation and no metadata (a warning names the columns dropped); an entry with "
        "whitespace cannot be written to it.",
    )
    common(convert)
    convert.add_argument("out", metavar="OUT", help="output file (.json, .jsonl, .csv, .tsv, .txt)")
    convert.add_argument("--to", choices=FORMATS, help="format of OUT (default: by extension)")
    convert.add_argument(
        "--out-src-key", metavar="KEY", help="source field of OUT (default: --src-key)"
    )
    convert.add_argument(
        "--out-tgt-key", metavar="KEY", help="target field of OUT (default: --tgt-key)"
    )
    convert.set_defaults(pairs_func=_cmd_convert)


def run(args: argparse.Namespace) -> int:
    """Run ``tli pairs check``, ``split`` or ``convert``; returns the exit code."""
    return args.pairs_func(args)
