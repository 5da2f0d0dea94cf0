"""Options shared by several commands, each defined once: the model, the pair sets, the adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tli import pairs
from tli.config import add_dataclass_arguments, build, overrides_from_args
from tli.errors import TLIError
from tli.models import DEFAULT_MODEL, EMBEDDED, ModelConfig
from tli.pairs import SRC_KEY, TGT_KEY, PairSets, check_sets


def add_model_arguments(p: argparse.ArgumentParser, *, adapter: bool = False) -> None:
    """``--model`` and the ModelConfig options (dtype, device, 4-bit, remote code).

    Args:
        p: The command's parser.
        adapter: The command loads an adapter, so the default model is the one it records.
    """
    default = "the model the adapter records" if adapter else DEFAULT_MODEL
    p.add_argument(
        "--model",
        help=f"embedded name ({', '.join(EMBEDDED)}), .gguf file, directory or hub id "
        f"(default: {default})",
    )
    add_dataclass_arguments(p, ModelConfig, skip=("name",))


def add_plan_argument(p: argparse.ArgumentParser) -> None:
    """``--plan``: print what the command will build and the memory it needs, then exit."""
    p.add_argument(
        "--plan",
        action="store_true",
        help="print, per stage, the layers it builds, their parameters and the memory of their "
        "weights (dtype or 4-bit) against the free memory, from the model's config alone (no "
        "weights read); then exit (code 2 when they cannot fit)",
    )


def model_config(args: argparse.Namespace, name: str | None = None) -> ModelConfig:
    """The ModelConfig of the command line: ``--model`` (else ``name``, else the default)."""
    values = overrides_from_args(ModelConfig, args)
    values["name"] = getattr(args, "model", None) or name or DEFAULT_MODEL
    return build(ModelConfig, values)


def add_pair_arguments(p: argparse.ArgumentParser, *, control: bool = True) -> None:
    """``--pairs``, ``--control``, ``--src-key`` and ``--tgt-key``, as every stage takes them."""
    p.add_argument(
        "--pairs",
        type=Path,
        help="pair file (.json, .jsonl, .csv, .tsv, MUSE .txt); its split column, if any, "
        "gives the sets "
        "(default: the bundled lexicon and its split)",
    )
    if control:
        p.add_argument("--control", type=Path, help="pair file of the control set (all its pairs)")
    add_key_arguments(p)


def add_key_arguments(p: argparse.ArgumentParser) -> None:
    """``--src-key`` / ``--tgt-key`` and ``--src-lang`` / ``--tgt-lang``.

    The keys are the fields of the two languages in JSON/CSV/TSV files; the languages are their
    names in every label, table and figure.
    """
    p.add_argument("--src-key", default=SRC_KEY, help=f"source field (default: {SRC_KEY})")
    p.add_argument("--tgt-key", default=TGT_KEY, help=f"target field (default: {TGT_KEY})")
    p.add_argument(
        "--src-lang",
        help="name of the source language in labels, tables, figures, prompts and the model "
        "card (default: from the file's source field, a MUSE file's name xx-yy.txt, or "
        "Swahili for the bundled lexicon)",
    )
    p.add_argument(
        "--tgt-lang", help="name of the target language (default: as for --src-lang)"
    )


def pair_sets(args: argparse.Namespace) -> PairSets:
    """The sets of ``--pairs`` / ``--control`` by :func:`tli.pairs.load_sets`, leakage warned."""
    sets = pairs.load_sets(
        args.pairs,
        getattr(args, "control", None),
        src_key=args.src_key,
        tgt_key=args.tgt_key,
        src_lang=args.src_lang,
        tgt_lang=args.tgt_lang,
    )
    sets.warn_leakage()
    return sets


def checked_sets(
    args: argparse.Namespace, stage: str
) -> tuple[dict[str, list], tuple[str, str]]:
    """:func:`pair_sets`, each non-empty set holding at least 2 pairs (:func:`check_sets`).

    Returns:
        ``(sets, (source language, target language))``.
    """
    import logging

    sets = pair_sets(args)
    try:
        checked = check_sets(sets.as_dict(), stage)
    except TLIError as err:
        raise TLIError(f"{sets.where}: {err}") from None
    if "control" not in checked:
        logging.getLogger("tli").warning(
            "%s has no control set: %s covers the trained set only", sets.source, stage
        )
    return checked, sets.languages


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    """``--adapter`` and the base model's options, for commands that load an adapter."""
    p.add_argument(
        "--adapter",
        type=Path,
        required=True,
        help="peft adapter directory (e.g. runs/train/final) or a training directory",
    )
    add_model_arguments(p, adapter=True)


def adapter_command(
    args: argparse.Namespace, stage: str
) -> tuple[Any, dict[str, list], tuple[str, str], Any, float]:
    """The start of a command that compares a base model with an adapter (evaluate, probe).

    Checks ``--out``, reads the adapter, then the pair sets (both before any model is loaded),
    then loads the base model.

    Returns:
        ``(adapter info, sets, languages, loaded base model, seconds the load took)``.
    """
    import time

    from tli.io import ensure_writable_dir
    from tli.models import load_model

    ensure_writable_dir(args.out)
    info, model_cfg = adapter_and_model(args)
    sets, languages = checked_sets(args, stage)
    start = time.perf_counter()
    loaded = load_model(model_cfg)
    return info, sets, languages, loaded, time.perf_counter() - start


def adapter_and_model(args: argparse.Namespace) -> tuple[Any, ModelConfig]:
    """The checked adapter and the base model's config (``--model``, else the adapter's own).

    Reads the adapter before any model is loaded, so a bad ``--adapter`` fails fast.
    """
    from tli.adapters import read_adapter

    info = read_adapter(args.adapter)
    name = args.model or info.base_model
    if not name:
        raise TLIError(f"adapter {info.dir} does not record its base model: pass --model")
    return info, model_config(args, name)
