"""Memory and time of loading the embedded model, full depth vs. max_layer=2.

Each load runs in its own process. The memory a load adds is the peak RSS after loading the
weights and reading each of them once (safetensors maps weights lazily, so an untouched weight
costs nothing until the first forward pass) minus the peak RSS before loading the weights. The
tokenizer is loaded before that baseline and reported on its own: it is the same for both
depths (Gemma's 262k-entry tokenizer alone raises the peak by about 470 MB). Goal (issue 2):
    added(max_layer=2) / added(full) <= 1.15 * kept_params / all_params.

Cached load time (issue 18: <= 5 s): a cache entry records its tokenizer's settings, so the
fast tokenizer loads straight from its ``tokenizer.json`` (``tli.models.load_tokenizer``)
instead of ``AutoTokenizer`` rebuilding Gemma's own tokenizer class from it. Both ways are
timed in the same run, each load in its own process, alternating: ``tokenizer_s`` (tli's) and
``tokenizer_auto_s`` (``AutoTokenizer.from_pretrained`` on the same cache entry, the way tli
loaded it before), and the whole cached load (tokenizer and weights) each way.

Usage: python benchmarks/load_memory.py [--model gemma-3-270m] [--max-layer 2] [--repeats 3]
       [--cache DIR]   (an existing cache: no de-quantisation, no uncached load timed)
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(model: str, max_layer: int | None, auto_tokenizer: bool = False) -> None:
    import torch
    import transformers  # noqa: F401

    from tli import models
    from tli.models import ModelConfig, load_model, load_tokenizer

    if auto_tokenizer:  # the way before issue 18: AutoTokenizer on the cache entry
        models._cached_tokenizer = lambda path: None
        models._record_tokenizer = lambda path, tok: None
    imported = _peak_rss_bytes()
    start = time.perf_counter()
    tokenizer = load_tokenizer(model)
    tokenizer_s = time.perf_counter() - start
    base = _peak_rss_bytes()
    loaded = load_model(ModelConfig(model), max_layer=max_layer, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.sum()  # read every weight once, as a forward pass would
    params = sum(p.numel() for p in loaded.model.parameters())
    print(
        json.dumps(
            {
                "imported": imported,
                "base": base,
                "peak": _peak_rss_bytes(),
                "seconds": seconds,
                "tokenizer_s": tokenizer_s,
                "tokenizer_class": type(tokenizer).__name__,
                "params": params,
                "depth": loaded.depth,
            }
        )
    )


def run_child(model: str, max_layer: int | None, cache: str, auto: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model]
    if max_layer is not None:
        cmd += ["--max-layer", str(max_layer)]
    if auto:
        cmd.append("--auto-tokenizer")
    env = dict(os.environ, TLI_CACHE=cache, HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--max-layer", type=int, default=2)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="cached loads per variant")
    parser.add_argument("--auto-tokenizer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help="use this filled cache (default: a fresh temporary one)")
    args = parser.parse_args()
    if args.child:
        child(args.model, args.max_layer if args.max_layer >= 0 else None, args.auto_tokenizer)
        return
    cache = args.cache or tempfile.mkdtemp(prefix="tli-bench-cache-")
    try:
        # a fresh cache: the first load de-quantises the GGUF into it
        uncached = None if args.cache else run_child(args.model, -1, cache)
        full, cut, auto = [], [], []
        for _ in range(args.repeats):  # alternating, so both ways see the same machine load
            full.append(run_child(args.model, -1, cache))
            auto.append(run_child(args.model, -1, cache, auto=True))
            cut.append(run_child(args.model, args.max_layer, cache))
    finally:
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    added_full = median([r["peak"] - r["base"] for r in full])
    added_cut = median([r["peak"] - r["base"] for r in cut])
    tokenizer_mb = median([r["base"] - r["imported"] for r in full]) / 2**20
    kept = cut[0]["params"] / full[0]["params"]
    ratio = added_cut / added_full
    result = {
        "model": args.model,
        "max_layer": args.max_layer,
        "added_mb_full": round(added_full / 2**20, 1),
        "added_mb_max_layer": round(added_cut / 2**20, 1),
        "memory_ratio": round(ratio, 3),
        "kept_params_fraction": round(kept, 3),
        "bound": round(1.15 * kept, 3),
        "within_bound": ratio <= 1.15 * kept,
        "tokenizer_mb": round(tokenizer_mb, 1),
        "uncached_load_s": round(uncached["seconds"], 2) if uncached else None,
        "cached_load_s_full": round(median([r["seconds"] for r in full]), 2),
        "cached_load_s_max_layer": round(median([r["seconds"] for r in cut]), 2),
        "cached_load_s_full_auto_tokenizer": round(median([r["seconds"] for r in auto]), 2),
        "tokenizer_s": round(median([r["tokenizer_s"] for r in full]), 2),
        "tokenizer_auto_s": round(median([r["tokenizer_s"] for r in auto]), 2),
        "tokenizer_classes": [full[0]["tokenizer_class"], auto[0]["tokenizer_class"]],
        "load_goal_s": 5.0,
    }
    result["tokenizer_ratio"] = round(result["tokenizer_s"] / result["tokenizer_auto_s"], 3)
    result["cached_load_ratio"] = round(
        result["cached_load_s_full"] / result["cached_load_s_full_auto_tokenizer"], 3
    )
    result["within_load_goal"] = result["cached_load_s_full"] <= 5.0
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(
        f"full load adds {result['added_mb_full']} MB, max_layer={args.max_layer} adds "
        f"{result['added_mb_max_layer']} MB: ratio {ratio:.3f} vs bound {1.15 * kept:.3f} "
        f"(kept params {kept:.3f})"
    )
    print(
        f"load time: uncached {result['uncached_load_s']} s, cached full "
        f"{result['cached_load_s_full']} s, cached max_layer {result['cached_load_s_max_layer']} s"
    )
    print(
        f"tokenizer: {result['tokenizer_s']} s from tokenizer.json vs "
        f"{result['tokenizer_auto_s']} s by AutoTokenizer ({result['tokenizer_ratio']}x); "
        f"cached full load {result['cached_load_s_full']} s vs "
        f"{result['cached_load_s_full_auto_tokenizer']} s ({result['cached_load_ratio']}x)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
