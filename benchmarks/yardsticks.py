"""Frozen yardsticks per layer on the bundled split: what a linear map over the base model knows.

For every layer 0..N of the frozen embedded model (``mean`` pooling), supervised Procrustes
(MUSE: mean-centred, unit-normed vectors; orthogonal W = scipy.linalg.orthogonal_procrustes)
is fitted on one set of pairs and scored on another by nearest neighbour, CSLS (k 10) and
centred nearest neighbour; beside it, plain centred retrieval without a map. Two fits:

* fitted on the trained pairs, scored on the control pairs (the yardstick of issue 17);
* fitted on the sweep's training part of the trained pairs, scored on its validation part
  (``split_pairs(trained, control_fraction=0.2, seed=0)``, the split of ``[sweep] validation``).

Writes a JSON file with every figure and, for the best control yardstick, its per-pair hits
(for a paired comparison with an adapter). Usage::

    OMP_NUM_THREADS=1 python benchmarks/yardsticks.py --out runs/yardsticks.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.linalg import orthogonal_procrustes

from tli.embed import embed
from tli.metrics import _csls_from_sim, centered_similarity, retrieval, similarity
from tli.models import load_model
from tli.pairs import gold_mask, load_sets, split_pairs, split_sets


def _unit_centred(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0, keepdim=True)  # (B, D)
    return x / x.norm(dim=1, keepdim=True)


def _hits(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    return retrieval(scores, gold, ks=(1,))["rank"] == 1  # (B,)


def yardsticks(fit: tuple, test: tuple, gold: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair top-1 hits of each yardstick: Procrustes NN / CSLS / centred, centred no map."""
    x, y = _unit_centred(fit[0]), _unit_centred(fit[1])
    w = torch.from_numpy(orthogonal_procrustes(x.numpy(), y.numpy())[0])  # (D, D)
    xs, ys = _unit_centred(test[0]) @ w, _unit_centred(test[1])
    sim = similarity(xs, ys)
    return {
        "procrustes_nn": _hits(sim, gold),
        "procrustes_csls": _hits(_csls_from_sim(sim, 10), gold),
        "procrustes_centred": _hits(centered_similarity(xs, ys), gold),
        "centred": _hits(centered_similarity(test[0], test[1]), gold),
    }


def main() -> None:
    """Embed once, score every layer, print a table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/yardsticks.json"))
    parser.add_argument("--validation", type=float, default=0.2)
    args = parser.parse_args()
    sets = load_sets()
    parts = split_sets(split_pairs(sets.trained, control_fraction=args.validation, seed=0))
    loaded = load_model()
    n = loaded.num_layers
    start = time.perf_counter()

    def vectors(pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [p.source for p in pairs] + [p.target for p in pairs]
        v = embed(loaded, texts, list(range(n + 1)), pooling="mean").double()  # (L, 2B, D)
        return v[:, : len(pairs)], v[:, len(pairs) :]

    trained = parts["trained"] + parts["control"]
    vec = {"trained": vectors(trained), "control": vectors(sets.control)}
    k = len(parts["trained"])
    vec["fit"] = (vec["trained"][0][:, :k], vec["trained"][1][:, :k])
    vec["validation"] = (vec["trained"][0][:, k:], vec["trained"][1][:, k:])
    golds = {"control": gold_mask(sets.control), "validation": gold_mask(parts["control"])}
    seconds = time.perf_counter() - start
    print(f"embedded {len(trained)} + {len(sets.control)} pairs in {seconds:.0f} s")
    counts = {"trained": len(trained), "control": len(sets.control), "fit": k}
    out: dict = {"pairs": {**counts, "validation": len(parts["control"])}, "layers": {}}
    best = {"control": (-1.0, None, None), "validation": (-1.0, None, None)}
    print("layer | set | Procrustes NN | CSLS | centred | no map, centred")
    for layer in range(n + 1):
        row = {}
        for name, fit in (("control", "trained"), ("validation", "fit")):
            hits = yardsticks(
                (vec[fit][0][layer], vec[fit][1][layer]),
                (vec[name][0][layer], vec[name][1][layer]),
                golds[name],
            )
            row[name] = {m: float(h.double().mean()) for m, h in hits.items()}
            for m, h in hits.items():
                if row[name][m] > best[name][0]:
                    best[name] = (row[name][m], f"{m}@{layer}", h.tolist())
            print(f"{layer} | {name} | " + " | ".join(f"{v:.4f}" for v in row[name].values()))
        out["layers"][layer] = row
    for name, (value, where, hits) in best.items():
        out[f"best_{name}"] = {"p_at_1": value, "where": where, "hits": hits}
        print(f"best {name}: {value:.4f} ({where})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
