"""Is the frozen-prefix cache exact? Cached vs. uncached adapters, in float32 and in bf16.

Trains the same short run twice per precision on the embedded model (InfoNCE at the final
layer, LoRA on q_proj + v_proj of blocks K..N-1, batch 8, the bundled lexicon's first trained
pairs), once from the cache and once without it, and prints the largest difference between the
two adapters' weights, absolute and relative to the largest weight. In bf16 (accelerate mixed
precision) tli refuses the cache (tli.cache.inexact_reason); this script lifts the refusal to
measure what it would cost, and builds the cache under the same autocast as the steps.

Usage: python benchmarks/cache_precision.py [--steps 8] [--first-block 14]. Ends with one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import tli.cache
from tli.models import ModelConfig, load_model, load_tokenizer
from tli.pairs import load_sets
from tli.train import TrainConfig, train


def adapter(tok, pairs, k, cache, precision):
    AcceleratorState._reset_state(True)  # one mixed-precision setting per process otherwise
    loaded = load_model(ModelConfig(), tokenizer=tok)
    n = loaded.num_layers
    cfg = TrainConfig(
        loss="info_nce",
        loss_layers=("final",),
        adapt_layers=f"{k}-{n - 1}",
        prefix_cache="auto" if cache else "off",
        mixed_precision=precision,
        lora_dropout=0.0,
        epochs=1,
        save_every=0,
    )
    with tempfile.TemporaryDirectory() as out:
        result = train(loaded, pairs, cfg, out, progress=False)
        used = json.loads((Path(out) / "train.json").read_text())["prefix_cache"]
        assert (used is not None and "first_block" in used) == cache, used
        return load_file(result.adapter_dir / "adapter_model.safetensors")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--first-block", type=int, default=14)
    args = parser.parse_args()
    tok = load_tokenizer("gemma-3-270m")
    pairs = load_sets().trained[: 8 * args.steps]
    tli.cache.inexact_reason = lambda *a, **k: None  # measure what the refusal prevents
    out = {"model": "gemma-3-270m", "first_block": args.first_block, "steps": args.steps}
    for precision in ("no", "bf16"):
        cached = adapter(tok, pairs, args.first_block, True, precision)
        plain = adapter(tok, pairs, args.first_block, False, precision)
        diff = max((cached[k].float() - plain[k].float()).abs().max().item() for k in plain)
        top = max(plain[k].float().abs().max().item() for k in plain)
        name = "float32" if precision == "no" else precision
        print(f"{name}: cached vs. uncached adapter, max |diff| {diff:.2e} ({diff / top:.2%} of "
              f"the largest weight {top:.3f})")
        out[name] = {"max_abs_diff": diff, "max_abs_weight": top}
    out["torch"] = torch.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
