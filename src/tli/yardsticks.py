"""Frozen yardsticks: what the base model's own states already retrieve, layer by layer.

A TLI adapter has to beat what a frozen model gives for free. This module measures that, per
layer and in both directions, from vectors alone (no model, no files):

* **Procrustes** (supervised, as in MUSE: Conneau et al. 2018, sec. 2 and 3.3; Smith et al.
  2017): every list is unit-normed, mean-centred and unit-normed again (:func:`tli.metrics.center`,
  each list by its own mean), and the orthogonal map ``W = argmin ||X W - Y||_F`` with
  ``W^T W = I`` is fitted on the **trained** pairs only, ``W = U V^T`` from the SVD
  ``X^T Y = U S V^T`` (:func:`scipy.linalg.orthogonal_procrustes`). Every set is then scored with
  its mapped source vectors: nearest neighbour (``procrustes_nn``), CSLS (``procrustes_csls``)
  and nearest neighbour after mean-centring the mapped lists again (``procrustes_centered``).
  Target -> source uses ``W^T`` (the Procrustes map of the reversed pairs).
* **Centred retrieval without a map** (``centered``): nearest neighbour after mean-centring each
  side, :func:`tli.metrics.centered_report`.

The control set never enters the fit: it is only mapped and scored. On the trained set the map is
scored on the pairs it was fitted on (in-sample), which says what a linear map can *inject*.
Every P@1 comes with its Wilson interval and the MRR. The retrieval itself is
:func:`tli.metrics.retrieval` on :func:`tli.metrics.similarity`,
:func:`tli.metrics.csls_from_similarity` and :func:`tli.metrics.centered_similarity`; each
cosine matrix serves both directions (target -> source is its transpose).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tli.metrics import (
    center,
    centered_similarity,
    csls_from_similarity,
    retrieval,
    similarity,
)

#: The frozen yardsticks, in the order tables and figures list them.
YARDSTICKS: tuple[str, ...] = (
    "procrustes_nn",
    "procrustes_csls",
    "procrustes_centered",
    "centered",
)
#: How each yardstick is named in tables and figures.
YARDSTICK_NAMES: dict[str, str] = {
    "procrustes_nn": "Procrustes + NN",
    "procrustes_csls": "Procrustes + CSLS",
    "procrustes_centered": "Procrustes + centred NN",
    "centered": "centred NN, no map",
}
#: Directions: source -> target and target -> source.
DIRECTIONS: tuple[str, ...] = ("s2t", "t2s")
#: The set the maps are fitted on.
FIT_SET = "trained"
#: The held-out set the yardsticks are meant for.
CONTROL_SET = "control"


def prepare(x: torch.Tensor) -> torch.Tensor:
    """MUSE's preprocessing: unit-norm, subtract the list's mean vector, unit-norm again.

    Args:
        x: Vectors ``(..., B, D)``; the mean is taken over B per leading index.

    Returns:
        Float64 ``(..., B, D)``.
    """
    return center(x.detach().to(torch.float64))


def fit_procrustes(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The orthogonal map from source to target vectors of translation pairs, per leading index.

    Solves ``min ||X W - Y||_F`` subject to ``W^T W = I`` on the prepared vectors
    (:func:`prepare`): ``W = U V^T`` for the SVD ``X^T Y = U S V^T`` (Schönemann 1966; MUSE's
    supervised refinement), computed by :func:`scipy.linalg.orthogonal_procrustes`.

    Args:
        src: Source vectors ``(..., B, D)`` of the fitting pairs.
        tgt: Target vectors ``(..., B, D)``; row i translates ``src`` row i.

    Returns:
        Float64 ``W`` ``(..., D, D)``, orthogonal; map a source vector ``x`` (a row) by ``x @ W``.
    """
    from scipy.linalg import orthogonal_procrustes

    if src.shape != tgt.shape or src.dim() < 2:
        raise ValueError(f"need two (..., B, D) stacks of one shape, got {src.shape}, {tgt.shape}")
    x = prepare(src).cpu().numpy()  # (..., B, D)
    y = prepare(tgt).cpu().numpy()  # (..., B, D)
    lead = x.shape[:-2]
    d = x.shape[-1]
    xs = x.reshape(-1, *x.shape[-2:])  # (L, B, D)
    ys = y.reshape(-1, *y.shape[-2:])
    maps = np.stack([orthogonal_procrustes(a, b)[0] for a, b in zip(xs, ys, strict=True)])
    return torch.from_numpy(maps.reshape(*lead, d, d))  # (..., D, D)


def _hits(rank: torch.Tensor) -> list[int]:
    """Top-1 hits per leading index of ranks ``(..., B)`` (flattened to a list)."""
    return (rank == 1).sum(dim=-1).reshape(-1).tolist()


def score_set(
    src: torch.Tensor,
    tgt: torch.Tensor,
    gold: torch.Tensor,
    w: torch.Tensor | None,
    *,
    csls_k: int = 10,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Every yardstick of one set, per layer, both directions.

    Args:
        src: Source vectors ``(L, B, D)``.
        tgt: Target vectors ``(L, B, D)``; row i translates ``src`` row i.
        gold: Bool mask ``(B, B)`` of correct candidates (diagonal plus alternatives).
        w: The Procrustes maps ``(L, D, D)`` (:func:`fit_procrustes` on the trained set), or
            None: only the map-free ``centered`` yardstick is computed.
        csls_k: Neighbourhood size of CSLS.
        level: Coverage of the Wilson intervals.
        fit: Fit the Procrustes map (one SVD of a D x D matrix per layer); False reports the
            map-free yardstick only, and says so under ``absent``.

    Returns:
        One list over L per key ``p_at_1_<dir>_<yardstick>``, ``..._lo``, ``..._hi`` (Wilson),
        ``hits_<dir>_<yardstick>`` and ``mrr_<dir>_<yardstick>``, for dir in :data:`DIRECTIONS`
        and every yardstick of :data:`YARDSTICKS` that could be computed.
    """
    from tli.stats import wilson_interval

    n = src.shape[-2]
    gold_t = gold.transpose(-1, -2)
    # One cosine matrix per method serves both directions: t2s is the transpose of s2t (with
    # W orthogonal, cos(y W^T, x) = cos(y, x W)), so t2s never recomputes it.
    sims: dict[str, torch.Tensor] = {"centered": centered_similarity(src, tgt)}  # (L, B, B)
    if w is not None:
        mapped = prepare(src) @ w.to(src.device)  # (L, B, D): sources in the target space
        target = prepare(tgt)  # (L, B, D)
        sims["procrustes_nn"] = similarity(mapped, target)
        sims["procrustes_centered"] = centered_similarity(mapped, target)
    reports: dict[str, dict[str, dict[str, torch.Tensor]]] = {d: {} for d in DIRECTIONS}
    for direction, g in (("s2t", gold), ("t2s", gold_t)):
        for kind in YARDSTICKS:
            base = "procrustes_nn" if kind == "procrustes_csls" else kind
            if base not in sims:
                continue
            sim = sims[base] if direction == "s2t" else sims[base].transpose(-1, -2)
            scores = csls_from_similarity(sim, csls_k) if kind == "procrustes_csls" else sim
            result = retrieval(scores, g, ks=(1,))
            reports[direction][kind] = {"rank": result["rank"], "mrr": result["mrr"]}
    out: dict[str, list[float]] = {}
    for direction in DIRECTIONS:
        for kind in YARDSTICKS:
            if kind not in reports[direction]:
                continue
            report = reports[direction][kind]
            hits = _hits(report["rank"])
            cis = [wilson_interval(k, n, level) for k in hits]
            key = f"{direction}_{kind}"
            out[f"p_at_1_{key}"] = [k / n for k in hits]
            out[f"p_at_1_{key}_lo"] = [lo for lo, _ in cis]
            out[f"p_at_1_{key}_hi"] = [hi for _, hi in cis]
            out[f"hits_{key}"] = [float(k) for k in hits]
            out[f"mrr_{key}"] = report["mrr"].reshape(-1).tolist()
    return out


def frozen_yardsticks(
    src: Mapping[str, torch.Tensor],
    tgt: Mapping[str, torch.Tensor],
    golds: Mapping[str, torch.Tensor],
    *,
    csls_k: int = 10,
    level: float = 0.95,
    fit: bool = True,
) -> dict[str, Any]:
    """The frozen yardsticks of every set at every layer: fit on the trained set, score all.

    Args:
        src: Set name -> source vectors ``(L, B, D)``.
        tgt: Set name -> target vectors ``(L, B, D)``.
        golds: Set name -> bool gold mask ``(B, B)``.
        csls_k: Neighbourhood size of CSLS.
        level: Coverage of the Wilson intervals.
        fit: Fit the Procrustes map (one SVD of a D x D matrix per layer); False reports the
            map-free yardstick only, and says so under ``absent``.

    Returns:
        A JSON-friendly dict: ``fit_set`` (``trained``, or None when there is none), ``n_fit``,
        ``csls_k``, ``level``, ``sets`` (set name -> :func:`score_set`), ``in_sample`` (the
        sets whose pairs fitted the map) and ``absent`` (what is missing -> why, in one line):
        without a trained set the Procrustes yardsticks are absent, without a control set the
        held-out yardsticks are.
    """
    absent: dict[str, str] = {}
    w = None
    if not fit:
        absent["procrustes"] = (
            "turned off (procrustes = false): only the map-free centred retrieval is reported"
        )
    elif FIT_SET in src:
        w = fit_procrustes(src[FIT_SET], tgt[FIT_SET])  # (L, D, D): trained pairs only
    else:
        absent["procrustes"] = (
            "no trained set: the Procrustes map is fitted on trained pairs, so only the "
            "map-free centred retrieval is reported"
        )
    if CONTROL_SET not in src:
        absent[CONTROL_SET] = (
            "no control set: the yardsticks of held-out pairs need one (pass --control, or a "
            "pair file with a split column)"
        )
    sets = {
        name: score_set(src[name], tgt[name], golds[name], w, csls_k=csls_k, level=level)
        for name in src
    }
    return {
        "method": "supervised Procrustes (MUSE): renorm, centre, renorm each list; orthogonal "
        "W from the SVD of X^T Y on the trained pairs",
        "fit_set": FIT_SET if w is not None else None,
        "n_fit": int(src[FIT_SET].shape[-2]) if w is not None else 0,
        "csls_k": int(csls_k),
        "level": float(level),
        "in_sample": [FIT_SET] if w is not None and FIT_SET in sets else [],
        "sets": sets,
        "absent": absent,
    }


def from_json(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """Saved yardsticks back: JSON ``null`` in the figures was a NaN; the rest as saved."""
    if not data:
        return {}
    sets = {
        name: {k: [math.nan if v is None else float(v) for v in vals] for k, vals in figs.items()}
        for name, figs in (data.get("sets") or {}).items()
    }
    return {**data, "sets": sets}


def best(
    yard: Mapping[str, Any], set_name: str, direction: str, layers: list[int]
) -> dict[str, Any] | None:
    """The best frozen yardstick of one set and direction, over every layer and yardstick.

    The highest P@1 wins; ties go to the higher MRR, then to the earlier yardstick of
    :data:`YARDSTICKS`, then to the lower layer. The maximum over layers and yardsticks is an
    optimistic yardstick (it is chosen on the scored set itself); the tables say so.

    Returns:
        ``{"yardstick", "name", "layer", "p_at_1", "lo", "hi", "hits", "mrr", "n_layers"}``, or
        None when the set has no yardstick.
    """
    figures = (yard.get("sets") or {}).get(set_name)
    if not figures:
        return None
    candidates = []
    for order, kind in enumerate(YARDSTICKS):
        key = f"{direction}_{kind}"
        values = figures.get(f"p_at_1_{key}")
        if not values:
            continue
        for i, layer in enumerate(layers):
            p, mrr = values[i], figures[f"mrr_{key}"][i]
            if p is None or (isinstance(p, float) and math.isnan(p)):
                continue
            candidates.append(((-p, -mrr, order, layer), kind, i, layer))
    if not candidates:
        return None
    _, kind, i, layer = min(candidates)
    key = f"{direction}_{kind}"
    return {
        "yardstick": kind,
        "name": YARDSTICK_NAMES[kind],
        "layer": layer,
        "p_at_1": figures[f"p_at_1_{key}"][i],
        "lo": figures[f"p_at_1_{key}_lo"][i],
        "hi": figures[f"p_at_1_{key}_hi"][i],
        "hits": int(figures[f"hits_{key}"][i]),
        "mrr": figures[f"mrr_{key}"][i],
        "n_layers": len(layers),
    }


__all__ = [
    "CONTROL_SET",
    "DIRECTIONS",
    "FIT_SET",
    "YARDSTICKS",
    "YARDSTICK_NAMES",
    "best",
    "fit_procrustes",
    "from_json",
    "frozen_yardsticks",
    "prepare",
    "score_set",
]
