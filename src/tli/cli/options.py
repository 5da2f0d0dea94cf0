"""Options shared by several commands, each defined once: the model, the pair sets, the adapter."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
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
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="accept control pairs that share a headword, root, stem or gloss with trained "
        "pairs (one warning instead of an error)",
    )


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
    """The sets of ``--pairs`` / ``--control`` (:func:`tli.pairs.load_sets`), leakage checked."""
    sets = pairs.load_sets(
        args.pairs,
        getattr(args, "control", None),
        src_key=args.src_key,
        tgt_key=args.tgt_key,
        src_lang=args.src_lang,
        tgt_lang=args.tgt_lang,
    )
    sets.check_leakage(getattr(args, "allow_overlap", False))
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


def add_out_arguments(p: argparse.ArgumentParser, default: str, holds: str) -> None:
    """``--out`` (an output directory) and ``--overwrite`` (replace the results it holds)."""
    p.add_argument(
        "--out", type=Path, default=Path(default), help=f"output directory (default: {default})"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace the {holds} that --out holds (kept until the new one is written)",
    )


def check_out(out: Path, marker: str, holds: str, overwrite: bool) -> None:
    """Refuse an ``--out`` that holds other files, or earlier results without ``--overwrite``.

    Args:
        out: The output directory.
        marker: The file that marks earlier results (e.g. ``evaluation.json``).
        holds: What they are, in words (e.g. "an evaluation").
        overwrite: ``--overwrite`` was given.
    """
    from tli.io import ensure_writable_dir
    from tli.lock import has_content

    ensure_writable_dir(out)
    if not has_content(out):
        return
    if not (out / marker).is_file():
        raise TLIError(
            f"{out}: exists and is not empty, but holds no {marker} (it is not {holds}); "
            "refusing to write into it" + (" or to overwrite it" if overwrite else "")
            + "; choose another --out"
        )
    if not overwrite:
        raise TLIError(
            f"{out}: already holds {holds} ({marker}); use --overwrite to replace it, or "
            "another --out"
        )


@contextmanager
def replacing_out(
    out: Path, command: str, marker: str, holds: str, overwrite: bool
) -> Iterator[Path]:
    """Hold ``--out`` for the block: locked, earlier results set aside until the block succeeds.

    The earlier results are moved aside (:class:`tli.io.SetAside`), deleted once the block
    has written the new ones, and put back if it fails, so ``--overwrite`` never loses them.
    A directory the block created and left empty is removed.
    """
    from tli.io import SetAside, recover_aside
    from tli.lock import LOCK, has_content, locked_dir

    with locked_dir(out, command):
        recover_aside(out, keep=(LOCK,))
        check_out(out, marker, holds, overwrite)  # again, now that the lock is held
        aside = SetAside(out, keep=(LOCK,)) if has_content(out) else None
        try:
            yield out
        except BaseException:
            if aside is not None:
                aside.restore()
            raise
        if aside is not None:
            aside.discard()


def adapter_command(
    args: argparse.Namespace, stage: str
) -> tuple[Any, dict[str, list], tuple[str, str], ModelConfig]:
    """The checks of a command that compares a base model with an adapter (evaluate, probe).

    Everything is checked before the model is loaded and before anything is written: ``--out``
    (:func:`check_out`), the adapter's files, the pair sets, the device, and the adapter
    against the model's structure on the meta device (:func:`tli.adapters.check_adapter`:
    name, architecture, depth, module shapes; :func:`tli.adapters.check_tensors`: every tensor
    its config implies).

    Returns:
        ``(adapter info, sets, languages, base model config)``.
    """
    from tli.adapters import check_adapter, check_tensors
    from tli.models import check_loadable, meta_model

    info, model_cfg = adapter_and_model(args)
    sets, languages = checked_sets(args, stage)
    check_loadable(model_cfg)
    check_adapter(info, meta_model(model_cfg))
    check_tensors(info, meta_model(model_cfg), "probed" if "probe" in stage else "evaluated")
    return info, sets, languages, model_cfg


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
