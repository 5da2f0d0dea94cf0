"""Time of `tli probe --score` on the embedded model: 100 items, both directions, base + tuned.

The items are 50 trained and 50 control pairs of the bundled lexicon (its own split), sampled
with seed 0 (``score_n=50`` per set); each is asked Swahili -> English and English -> Swahili
with a 4-shot prompt (shots from the trained set only), by the base model and by the model with
the adapter attached: 400 greedy generations of at most 10 new tokens, batched (64 prompts,
padding, KV cache, the shared few-shot prefix run once per direction and model, stop once every
row has its first line). The probe part is kept small (``n=1``: 1 pair per set through the 4
templates).

``--threads N`` sets torch's intra-op threads (default: torch's choice, 2 on 2 cores). On a
machine where other processes hold the cores, 1 thread can be several times faster than 2: the
two threads wait for each other at every small operation of token-by-token decoding.

The adapter is a real one by default: ``tli.train`` for one epoch at layer 2 on the trained
split (paper settings otherwise, depth-truncated); ``--adapter random`` instead attaches a LoRA
(r 16, q_proj + v_proj) with random non-zero A and B, which changes many outputs. Training and
model loading are timed apart. The figure that counts is ``score_s``: the scored generations
of both models plus attaching the adapter. Goal (issue 10): <= 120 s on 2 CPU cores.

Usage: python benchmarks/probe.py [--model gemma-3-270m] [--adapter trained|random]
       [--threads N] [--out DIR]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

GOAL_S = 120.0


def random_adapter(model_name: str, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter (r 16, alpha 32, q_proj + v_proj) with random, non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tli.models import ModelConfig, load_model

    loaded = load_model(ModelConfig(model_name), max_layer=None)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(loaded.model, cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--adapter", choices=("trained", "random"), default="trained")
    parser.add_argument("--layer", type=int, default=2, help="training layer (paper: 2)")
    parser.add_argument("--per-set", type=int, default=50, help="items per set (2 sets)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="keep the probe here (default: temporary)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from tli.models import ModelConfig, load_model, load_tokenizer
    from tli.pairs import load_lexicon, split_sets
    from tli.probe import ProbeConfig, probe
    from tli.train import TrainConfig, train

    sets = split_sets(load_lexicon())
    with tempfile.TemporaryDirectory(prefix="tli-bench-probe-") as tmp:
        tok = load_tokenizer(args.model)
        start = time.perf_counter()
        if args.adapter == "trained":
            shallow = load_model(ModelConfig(args.model), max_layer=args.layer, tokenizer=tok)
            trained = train(
                shallow,
                sets["trained"],
                TrainConfig(layer=args.layer, epochs=1, save_every=0),
                Path(tmp) / "train",
                progress=False,
            )
            adapter = trained.adapter_dir
            adapter_what = f"tli.train, 1 epoch at layer {args.layer}, paper settings"
            del shallow
        else:
            adapter = random_adapter(args.model, Path(tmp) / "random")
            adapter_what = "random LoRA r 16 on q_proj + v_proj, A and B non-zero (B ~ N(0, 0.02))"
        adapter_s = time.perf_counter() - start

        start = time.perf_counter()
        base = load_model(ModelConfig(args.model), tokenizer=tok)
        load_s = time.perf_counter() - start

        cfg = ProbeConfig(n=1, score=True, score_n=args.per_set, batch_size=args.batch_size)
        out = args.out or Path(tmp) / "probe"
        start = time.perf_counter()
        result = probe(base, adapter, sets, cfg, out)
        probe_s = time.perf_counter() - start

    t = result.timings
    score_s = t["score_base_s"] + t["attach_s"] + t["score_tuned_s"]
    n_items = len({(i["set"], i["source"]) for i in result.items})
    print(result.score_table())
    print(result.summary_line())
    print(
        f"scored {n_items} items x 2 directions x 2 models = {len(result.items) * 2} generations "
        f"in {score_s:.1f} s (goal <= {GOAL_S:.0f} s); whole probe {probe_s:.1f} s, load "
        f"{load_s:.1f} s, adapter {adapter_s:.1f} s"
    )
    figures = {
        "benchmark": "probe",
        "model": args.model,
        "items": n_items,
        "directions": 2,
        "generations": len(result.items) * 2,
        "shots": cfg.shots,
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.score_max_new_tokens,
        "adapter": adapter_what,
        "adapter_s": round(adapter_s, 2),
        "load_s": round(load_s, 2),
        "score_s": round(score_s, 2),
        "probe_total_s": round(probe_s, 2),
        "goal_s": GOAL_S,
        "within_goal": score_s <= GOAL_S,
        "timings": {k: round(v, 3) for k, v in t.items()},
        "exact": {
            f"{s['set']}_{s['direction']}": [s["base"], s["tuned"], s["n"], round(s["p"], 4)]
            for s in result.scores
        },
        "probe_changed": sum(r["base"] != r["tuned"] for r in result.rows),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
