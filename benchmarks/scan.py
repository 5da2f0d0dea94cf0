"""Time of tli's layer scan vs. the paper's way of scanning, on the same model and words.

tli: every distinct word of the pairs, all layers 0..N, one decoder pass per batch, no LM
head, then every metric (baseline, margin CI, retrieval) for every layer.
Paper (its released pilot script): for each word and each layer, one full forward pass
``model(**enc, output_hidden_states=True)``, LM head included, one word at a time, the states
recomputed for every layer. It is timed on a small subsample (``--paper-pairs``) and
extrapolated per word; the same words are also embedded by tli, and the two sets of vectors
(pooled the paper's way, ``mean_all``) are compared, so the speed-up is not bought with a
different result.

Goals (issue 4): speedup >= 300x; the whole scan of 686 pairs <= 60 s once the model is loaded.

Usage: python benchmarks/scan.py [--model gemma-3-270m] [--n-pairs 686] [--paper-pairs 10]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from tli.embed import embed
from tli.models import ModelConfig, load_model
from tli.pairs import Pair, load_lexicon, split_sets
from tli.scan import ScanConfig, run_scan


def sample_pairs(n: int, seed: int) -> list[Pair]:
    """``n`` pairs of the bundled lexicon (a seeded sample, in lexicon order)."""
    pairs = load_lexicon()
    if len(pairs) < n:
        print(f"the bundled lexicon has {len(pairs)} pairs; using all of them")
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def paper_vectors(loaded, words: list[str], layers: list[int]) -> tuple[torch.Tensor, float]:
    """The paper's way: one full forward (LM head included) per word and per layer."""
    model, tok = loaded.model, loaded.tokenizer
    out = torch.empty(len(layers), len(words), model.config.hidden_size)
    start = time.perf_counter()
    with torch.no_grad():
        for j, word in enumerate(words):
            for i, layer in enumerate(layers):
                enc = tok(word, return_tensors="pt")
                states = model(**enc, output_hidden_states=True).hidden_states[layer]  # (1, T, D)
                mask = enc["attention_mask"].unsqueeze(-1).float()  # (1, T, 1)
                pooled = (states * mask).sum(1) / mask.sum(1)  # (1, D)
                out[i, j] = torch.nn.functional.normalize(pooled, dim=-1)[0]
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--n-pairs", type=int, default=686, help="pairs of the full tli scan")
    parser.add_argument("--paper-pairs", type=int, default=10, help="pairs timed the paper's way")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pairs = sample_pairs(args.n_pairs, args.seed)
    sets = {k: v for k, v in split_sets(pairs).items() if v}
    start = time.perf_counter()
    loaded = load_model(ModelConfig(args.model))
    load_s = time.perf_counter() - start
    layers = list(range(loaded.num_layers + 1))
    print(
        f"{args.model}: N = {loaded.num_layers}, load {load_s:.1f} s, "
        f"torch threads {torch.get_num_threads()}"
    )

    result = run_scan(loaded, sets, ScanConfig())
    t = result.timings
    n_words = int(t["n_strings"])
    tli_per_word = t["total_s"] / n_words
    print(
        f"tli scan: {len(pairs)} pairs, {n_words} distinct words, {len(layers)} layers: "
        f"{t['total_s']:.2f} s (embed {t['embed_s']:.2f} s, metrics {t['metrics_s']:.2f} s), "
        f"{1000 * tli_per_word:.2f} ms per word; chosen layer {result.chosen_layer}"
    )

    sub = pairs[: args.paper_pairs]
    words = list(dict.fromkeys(w for p in sub for w in (p.source, p.target)))
    start = time.perf_counter()
    tli_sub = embed(loaded, words, layers, pooling="mean_all")
    tli_sub_per_word = (time.perf_counter() - start) / len(words)
    paper, paper_s = paper_vectors(loaded, words, layers)
    paper_per_word = paper_s / len(words)
    diff = float((paper - tli_sub).abs().max())
    print(
        f"paper's way: {len(words)} words x {len(layers)} layers: {paper_s:.1f} s, "
        f"{paper_per_word:.3f} s per word (tli on the same words: "
        f"{1000 * tli_sub_per_word:.2f} ms per word); max |paper - tli| = {diff:.2e}"
    )
    speedup = paper_per_word / tli_per_word
    print(
        f"speed-up: {speedup:.0f}x per word (full tli scan vs. the paper's way); the paper's "
        f"way would take {paper_per_word * n_words / 60:.1f} min for these {n_words} words"
    )
    print(
        json.dumps(
            {
                "model": args.model,
                "num_layers": loaded.num_layers,
                "n_pairs": len(pairs),
                "n_words": n_words,
                "torch_threads": torch.get_num_threads(),
                "load_s": round(load_s, 2),
                "tli_scan_total_s": round(t["total_s"], 3),
                "tli_embed_s": round(t["embed_s"], 3),
                "tli_metrics_s": round(t["metrics_s"], 3),
                "tli_s_per_word": tli_per_word,
                "tli_same_words_s_per_word": tli_sub_per_word,
                "paper_pairs": len(sub),
                "paper_words": len(words),
                "paper_s_per_word": paper_per_word,
                "paper_est_total_s": paper_per_word * n_words,
                "speedup": round(speedup, 1),
                "speedup_same_words": round(paper_per_word / tli_sub_per_word, 1),
                "max_abs_diff_vs_paper": diff,
                "chosen_layer": result.chosen_layer,
                "meets_goals": bool(speedup >= 300 and t["total_s"] <= 60),
            }
        )
    )


if __name__ == "__main__":
    main()
