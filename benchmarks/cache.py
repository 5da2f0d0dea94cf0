"""Frozen-prefix activation cache: training step time with and without it, on the embedded model.

InfoNCE at the final layer, LoRA r 16 on q_proj + v_proj of blocks K..N-1, batch 8 (the paper's),
through ``tli.train.train`` itself. Without the cache every step runs the embeddings and all
blocks; with it, blocks < K ran once (cache build, timed separately) and each step runs blocks
>= K only. Same adapter either way (tests/test_cache.py).

Usage: python benchmarks/cache.py [--steps 20] [--first-blocks 9,12]. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from tli.models import ModelConfig, load_model, load_tokenizer
from tli.pairs import load_lexicon, split_sets
from tli.train import TrainConfig, train


def time_steps(tok, pairs, k, cache, steps):
    loaded = load_model(ModelConfig(), tokenizer=tok)
    n = loaded.num_layers
    cfg = TrainConfig(
        loss="info_nce",
        loss_layers=("final",),
        adapt_layers=f"{k}-{n - 1}",
        prefix_cache="on" if cache else "off",
        epochs=1,
        save_every=0,
    )
    subset = pairs[: 8 * (steps + 2)]
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train(
            loaded,
            subset,
            cfg,
            out,
            on_step=lambda s: stamps.append(time.perf_counter()),
            progress=False,
        )
        total = time.perf_counter() - start
    first = stamps[0] - start  # cache build (if any) + setup + the first step
    per = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][1:]
    return statistics.median(per), total, first


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--first-blocks", default="9,12")
    args = parser.parse_args()
    tok = load_tokenizer("gemma-3-270m")
    pairs = split_sets(load_lexicon())["trained"]
    result = {
        "model": "gemma-3-270m",
        "loss_layer": "final",
        "batch_size": 8,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "by_first_block": {},
    }
    for k in (int(x) for x in args.first_blocks.split(",")):
        off, off_total, off_first = time_steps(tok, pairs, k, False, args.steps)
        on, on_total, on_first = time_steps(tok, pairs, k, True, args.steps)
        result["by_first_block"][k] = {
            "uncached_step_s": round(off, 4),
            "cached_step_s": round(on, 4),
            "step_speedup": round(off / on, 2),
            "uncached_total_s": round(off_total, 1),
            "cached_total_s": round(on_total, 1),
            "cached_setup_s": round(on_first - on, 1),
            "uncached_setup_s": round(off_first - off, 1),
        }
        print(
            f"adapters on blocks {k}..17: step {off:.3f} s -> {on:.3f} s "
            f"({off / on:.2f}x); run {off_total:.1f} s -> {on_total:.1f} s"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
