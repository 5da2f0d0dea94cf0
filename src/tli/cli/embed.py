"""``tli embed``: pooled, normalised vectors of words at chosen layers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tli.cli.options import add_model_arguments, model_config
from tli.config import MAX_BATCH
from tli.embed import POOLINGS
from tli.errors import TLIError

NAME = "embed"
HELP = "pooled, normalised vectors of words at chosen layers"
DESCRIPTION = (
    "Embed words (one pass per batch, all requested layers at once) and write "
    "them to a safetensors file as a (L, B, D) tensor."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tli embed``."""
    p.add_argument("words", nargs="*", metavar="WORD", help="strings to embed")
    p.add_argument("--file", type=Path, help="read strings from this file, one per line")
    p.add_argument("--layers", default="all", help="e.g. 0,2,final or 0-5 or all (default)")
    p.add_argument("--pooling", default="mean", choices=POOLINGS, help="default: mean")
    p.add_argument("--batch-size", type=int, default=64)
    add_model_arguments(p)
    p.add_argument("--out", type=Path, default=Path("vectors.safetensors"))


def read_lines(path: Path) -> list[str]:
    """The strings of a file, one per line; a blank line is an error naming it."""
    from tli.io import read_text

    lines = read_text(path).splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise TLIError(f"{path}: line {i}: empty or whitespace-only string")
    return [line.strip() for line in lines]


def run(args: argparse.Namespace) -> int:
    """Run ``tli embed``; returns the exit code."""
    from tli import surgery
    from tli.embed import check_texts, embed, parse_layers
    from tli.io import atomic_write_safetensors, check_out_file
    from tli.models import load_config, load_model

    texts = list(args.words) + (read_lines(args.file) if args.file else [])
    check_texts(texts)
    if args.batch_size < 1:
        raise TLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_size > MAX_BATCH:
        raise TLIError(f"--batch-size must be <= {MAX_BATCH}, got {args.batch_size}")
    check_out_file(args.out)  # before any model is loaded
    cfg = model_config(args)
    _, config = load_config(cfg.name, trust_remote_code=cfg.trust_remote_code)
    n = surgery.num_layers(config)
    layers = parse_layers(args.layers, n)
    loaded = load_model(cfg, max_layer=None if n in layers else max(layers))
    vectors = embed(loaded, texts, layers, pooling=args.pooling, batch_size=args.batch_size)
    atomic_write_safetensors(
        args.out,
        {"vectors": vectors.contiguous()},
        metadata={
            "model": cfg.name,
            "layers": ",".join(map(str, layers)),
            "pooling": args.pooling,
            "texts": "\n".join(texts),
        },
    )
    print(
        f"vectors (L={len(layers)}, B={len(texts)}, D={vectors.shape[-1]}) "
        f"at layers {','.join(map(str, layers))} -> {args.out}"
    )
    sys.stdout.flush()
    return 0
