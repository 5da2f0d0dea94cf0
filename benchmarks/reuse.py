"""What ``tli run`` saves by giving the evaluation the scan's base vectors (issue 18).

The scan embeds every string of both sets at every layer with the base model; the evaluation
needs exactly those vectors again (same model, pooling, batch size and strings) before it
merges the adapter. ``tli run`` hands them over (``tli.evaluate.evaluate(base_vectors=...)``).
This script loads the embedded model once, scans the bundled lexicon's split (as ``tli run``
does), trains a one-epoch adapter at layer 2, then times the evaluation with and
without the scan's vectors, alternating (``--repeats`` each), and checks that both give the
same figures.

Usage: python benchmarks/reuse.py [--model gemma-3-270m] [--repeats 2]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch

    from tli.evaluate import EvalConfig, evaluate
    from tli.models import ModelConfig, load_model
    from tli.pairs import load_sets
    from tli.scan import ScanConfig, run_scan
    from tli.train import TrainConfig, train

    sets = load_sets().as_dict()
    base = load_model(ModelConfig(args.model))
    scan = run_scan(base, sets, ScanConfig(pooling="mean_all"))
    cfg = EvalConfig(pooling="mean_all")
    times: dict[str, list[float]] = {"reused": [], "embedded": []}
    with tempfile.TemporaryDirectory(prefix="tli-bench-reuse-") as tmp:
        shallow = load_model(ModelConfig(args.model), max_layer=2, tokenizer=base.tokenizer)
        tcfg = TrainConfig(layer=2, epochs=1, save_every=0, pooling="mean_all")
        trained = train(shallow, sets["trained"], tcfg, Path(tmp) / "train", progress=False)
        adapter = trained.adapter_dir
        del shallow
        saved = {}
        for i in range(args.repeats):
            for way in ("reused", "embedded"):
                out = Path(tmp) / f"{way}-{i}"
                vectors = scan.embedding if way == "reused" else None
                start = time.perf_counter()
                result = evaluate(base, adapter, sets, cfg, out, base_vectors=vectors)
                times[way].append(time.perf_counter() - start)
                assert bool(result.timings["base_vectors_reused"]) == (way == "reused")
                saved[way] = json.loads((out / "evaluation.json").read_text())
        same = saved["reused"]["sets"] == saved["embedded"]["sets"]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "reuse",
        "model": args.model,
        "strings": int(scan.timings["n_strings"]),
        "layers": len(scan.layers),
        "scan_embed_s": round(scan.timings["embed_s"], 2),
        "evaluate_s_embedding_again": round(med["embedded"], 2),
        "evaluate_s_reusing_scan": round(med["reused"], 2),
        "saved_s": round(med["embedded"] - med["reused"], 2),
        "ratio": round(med["reused"] / med["embedded"], 3),
        "runs": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "identical_figures": same,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
    }
    print(
        f"evaluation: {result['evaluate_s_embedding_again']} s embedding the base vectors again, "
        f"{result['evaluate_s_reusing_scan']} s with the scan's ({result['ratio']}x); "
        f"identical figures: {same}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
