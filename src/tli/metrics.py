"""Pure tensor metrics of cross-lingual lexical alignment.

Every function takes vectors with any number of leading batch dimensions (typically layers) and is
vectorised over them: ``src`` is ``(..., B, D)`` (B query words), ``tgt`` is ``(..., C, D)``
(C candidate words); for translation pairs C == B and row i of ``src`` translates row i of ``tgt``.
A ``gold`` mask ``(B, C)`` (bool; any shape broadcastable to ``(..., B, C)``) marks the correct
candidates of each query: the diagonal plus every listed alternative gloss.

Cosines are computed in float64 after a defensive L2 normalisation, so results are cosines even if
the caller forgot to normalise. Nothing here knows about models, devices or files.

Why these metrics: mean-pooled hidden states are anisotropic (any two words can have cosine > 0.9),
so a raw pair cosine means nothing without the **mismatched-pair baseline**, the **margin** (pairs
minus baseline) and **retrieval** P@k / MRR (nearest neighbour and CSLS); see docs/design.md,
fact 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from tli.errors import TLIError

Ties = Literal["pessimistic", "optimistic"]
#: The retrieval variants (direction_method) of every P@1 figure and McNemar test: nearest
#: neighbour, CSLS, and nearest neighbour after mean-centring each side (:func:`center`).
RETRIEVALS: tuple[str, ...] = (
    "s2t_nn",
    "s2t_csls",
    "s2t_centered",
    "t2s_nn",
    "t2s_csls",
    "t2s_centered",
)
Retrieval = Literal["s2t_nn", "s2t_csls", "s2t_centered", "t2s_nn", "t2s_csls", "t2s_centered"]
#: The retrieval methods, in the order of :data:`RETRIEVALS`.
METHODS: tuple[str, ...] = ("nn", "csls", "centered")


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last dimension.

    Args:
        x: Vectors ``(..., D)``.
        eps: Lower bound on the norm, so that zero vectors stay zero instead of becoming NaN.

    Returns:
        Unit vectors ``(..., D)`` with the dtype of ``x``.
    """
    return torch.nn.functional.normalize(x, p=2.0, dim=-1, eps=eps)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Float64 unit vectors: the internal form of every cosine computation."""
    return normalize(x.to(torch.float64))


def center(x: torch.Tensor) -> torch.Tensor:
    """Normalise, subtract the mean vector over the B axis, normalise again.

    The centring correction of MUSE (Conneau et al. 2018) and vecmap (Artetxe et al. 2018,
    "renorm, center, renorm"): it removes the common direction that makes mean-pooled hidden states
    anisotropic. Centre each language's list separately (the mean is taken per list).

    Args:
        x: Vectors ``(..., B, D)``; the mean is taken over B separately per leading index.

    Returns:
        Centred unit vectors ``(..., B, D)`` with the dtype of ``x``.
    """
    if x.dim() < 2:
        raise ValueError(f"center expects (..., B, D), got shape {tuple(x.shape)}")
    u = _unit(x)  # (..., B, D)
    return normalize(u - u.mean(dim=-2, keepdim=True)).to(x.dtype)


def _check_pair(src: torch.Tensor, tgt: torch.Tensor) -> None:
    if src.dim() < 2 or tgt.dim() < 2:
        raise ValueError(
            f"expected (..., B, D) and (..., C, D), got {tuple(src.shape)} and {tuple(tgt.shape)}"
        )
    if src.shape[-1] != tgt.shape[-1]:
        raise ValueError(f"hidden sizes differ: {src.shape[-1]} vs {tgt.shape[-1]}")


def _check_square(src: torch.Tensor, tgt: torch.Tensor) -> None:
    _check_pair(src, tgt)
    if src.shape[-2] != tgt.shape[-2]:
        raise ValueError(
            f"translation pairs need as many targets as sources: {src.shape[-2]} vs {tgt.shape[-2]}"
        )


def pair_cosine(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Cosine of each translation pair: row i of ``src`` with row i of ``tgt``.

    Args:
        src: Source vectors ``(..., B, D)``.
        tgt: Target vectors ``(..., B, D)``.

    Returns:
        Float64 cosines ``(..., B)``.
    """
    _check_square(src, tgt)
    return (_unit(src) * _unit(tgt)).sum(dim=-1)  # (..., B)


def similarity(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query with every candidate.

    Args:
        src: Query vectors ``(..., B, D)``.
        tgt: Candidate vectors ``(..., C, D)``.

    Returns:
        Float64 cosines ``(..., B, C)``; ``similarity(a, b)`` is ``similarity(b, a)`` transposed.
    """
    _check_pair(src, tgt)
    return _unit(src) @ _unit(tgt).transpose(-1, -2)  # (..., B, C)


def csls(src: torch.Tensor, tgt: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Cross-domain similarity local scaling (CSLS) scores.

    ``CSLS(x, y) = 2 cos(x, y) - r_T(x) - r_S(y)``, where ``r_T(x)`` is the mean cosine of query x
    to its k nearest candidates and ``r_S(y)`` the mean cosine of candidate y to its k nearest
    queries. It penalises hubs (vectors near everything), which plain nearest-neighbour retrieval
    favours in anisotropic spaces. Reference: Conneau et al. 2018, "Word translation without
    parallel data" (MUSE), eq. 6.

    Args:
        src: Query vectors ``(..., B, D)``.
        tgt: Candidate vectors ``(..., C, D)``.
        k: Neighbourhood size; clipped to C for ``r_T`` and to B for ``r_S``.

    Returns:
        Float64 scores ``(..., B, C)``.
    """
    return _csls_from_sim(similarity(src, tgt), k)


def csls_from_similarity(sim: torch.Tensor, k: int = 10) -> torch.Tensor:
    """:func:`csls` from a cosine matrix ``(..., B, C)`` already computed (e.g. to reuse it).

    Args:
        sim: Cosines ``(..., B, C)`` of B queries with C candidates.
        k: Neighbourhood size; clipped to C for ``r_T`` and to B for ``r_S``.

    Returns:
        Float64 scores ``(..., B, C)``.
    """
    return _csls_from_sim(sim, k)


def _csls_from_sim(sim: torch.Tensor, k: int) -> torch.Tensor:
    """CSLS scores ``(..., B, C)`` from a cosine matrix ``(..., B, C)``."""
    if k < 1:
        raise ValueError(f"csls needs k >= 1, got {k}")
    b, c = sim.shape[-2:]
    r_t = sim.topk(min(k, c), dim=-1).values.mean(dim=-1)  # (..., B)
    r_s = sim.topk(min(k, b), dim=-2).values.mean(dim=-2)  # (..., C)
    return 2 * sim - r_t.unsqueeze(-1) - r_s.unsqueeze(-2)


def _key(s: str) -> str:
    """Normalised lookup key of a word: case-folded, whitespace collapsed."""
    return " ".join(s.casefold().split())


def gold_mask_from_keys(
    query_gold: Sequence[set[str]], candidate_keys: Sequence[str]
) -> torch.Tensor:
    """Mask of correct candidates, built from strings.

    Handles several glosses per word and both directions uniformly: for source -> target, pass each
    source word's set of acceptable translations and the target list; for target -> source, each
    target word's set of acceptable sources and the source list. Strings are compared case-folded
    with whitespace collapsed.

    Args:
        query_gold: For each query i, the set of acceptable candidate strings.
        candidate_keys: For each candidate j, its string.

    Returns:
        Bool mask ``(B, C)``: ``mask[i, j]`` is True when candidate j correctly answers query i.

    Raises:
        TLIError: If a query has no acceptable candidate among ``candidate_keys``.
    """
    index: dict[str, list[int]] = {}
    for j, key in enumerate(candidate_keys):
        index.setdefault(_key(key), []).append(j)
    mask = torch.zeros(len(query_gold), len(candidate_keys), dtype=torch.bool)  # (B, C)
    for i, golds in enumerate(query_gold):
        cols = [j for g in golds for j in index.get(_key(g), ())]
        if not cols:
            raise TLIError(f"query {i}: none of {sorted(golds)!r} is among the candidates")
        mask[i, cols] = True
    return mask


def _check_gold(gold: torch.Tensor, b: int, c: int, device: torch.device) -> torch.Tensor:
    if gold.dtype != torch.bool:
        raise ValueError(f"gold must be a bool mask, got {gold.dtype}")
    if gold.dim() < 2 or tuple(gold.shape[-2:]) != (b, c):
        raise ValueError(f"gold must be (..., {b}, {c}), got {tuple(gold.shape)}")
    return gold.to(device)


def _mismatched_rows(sim: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row of ``sim`` (..., B, C): sum and count of non-gold cosines, (..., B) each."""
    off = ~_check_gold(gold, *sim.shape[-2:], sim.device)  # (..., B, C)
    row_sum = (sim * off).sum(dim=-1)  # (..., B)
    row_count = off.sum(dim=-1).to(torch.float64).expand_as(row_sum)  # (..., B)
    return row_sum, row_count


def mismatched_baseline(src: torch.Tensor, tgt: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Mean cosine of the mismatched pairs: every (i, j) with ``gold[i, j]`` False.

    The non-translation pairs of the same two lists, leaving out listed alternative glosses. It is
    what a pair cosine must be compared against: in an anisotropic (or collapsed) space, unrelated
    words are almost as similar as translations.

    Args:
        src: Query vectors ``(..., B, D)``.
        tgt: Candidate vectors ``(..., C, D)``.
        gold: Bool mask ``(B, C)`` of correct candidates.

    Returns:
        Float64 baseline ``(...,)``; NaN if every candidate is gold.
    """
    row_sum, row_count = _mismatched_rows(similarity(src, tgt), gold)
    return row_sum.sum(dim=-1) / row_count.sum(dim=-1)


def margin(src: torch.Tensor, tgt: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Alignment margin: mean pair cosine minus the mismatched-pair baseline.

    Positive when translations are closer than unrelated words; a training run that raises the pair
    cosine by collapsing the space leaves it near zero (docs/design.md, fact 2).

    Args:
        src: Source vectors ``(..., B, D)``.
        tgt: Target vectors ``(..., B, D)``; row i translates ``src`` row i.
        gold: Bool mask ``(B, B)`` of correct candidates (diagonal plus alternatives).

    Returns:
        Float64 margin ``(...,)``.
    """
    return pair_cosine(src, tgt).mean(dim=-1) - mismatched_baseline(src, tgt, gold)


def margin_ci(
    src: torch.Tensor,
    tgt: torch.Tensor,
    gold: torch.Tensor,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap confidence interval of the margin.

    Resamples pairs (query rows i, with replacement) and recomputes both the mean pair cosine and
    the baseline on each resample. The baseline of a resample is taken over the resampled query
    rows against *all* candidates of the original list (the candidate side is not resampled):
    ``margin_b = mean(pair[idx]) - sum(row_sum[idx]) / sum(row_count[idx])``, where ``row_sum`` /
    ``row_count`` are each row's sum / number of mismatched cosines. The same resamples are used for
    every leading index (layer), so layers are compared on equal terms.

    Args:
        src: Source vectors ``(..., B, D)``.
        tgt: Target vectors ``(..., B, D)``.
        gold: Bool mask ``(B, B)`` of correct candidates.
        n_boot: Number of bootstrap resamples.
        seed: Seed of the ``torch.Generator`` drawing the resamples; same seed, same interval.
        level: Coverage of the interval, in (0, 1).

    Returns:
        ``(lo, hi)``, float64 tensors ``(...,)``.
    """
    src, tgt = src.detach(), tgt.detach()
    rows = _mismatched_rows(similarity(src, tgt), gold)
    return _bootstrap_margin(pair_cosine(src, tgt), *rows, n_boot=n_boot, seed=seed, level=level)


def _bootstrap_margin(
    pair: torch.Tensor,
    row_sum: torch.Tensor,
    row_count: torch.Tensor,
    *,
    n_boot: int,
    seed: int,
    level: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin interval from per-row pair cosines, mismatched sums and counts, ``(..., B)`` each."""
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    b = pair.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(b, (n_boot, b), generator=gen)  # (n_boot, B), drawn on the CPU
    # Multiplicity of each row in each resample, so the resampled sums are one matmul.
    weights = (
        torch.zeros(n_boot, b, dtype=torch.float64)
        .scatter_add_(1, idx, torch.ones(n_boot, b, dtype=torch.float64))
        .T.to(pair.device)
    )  # (B, n_boot)
    boot = (pair @ weights) / b - (row_sum @ weights) / (row_count @ weights)  # (..., n_boot)
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64, device=pair.device)
    lo, hi = torch.quantile(boot, q, dim=-1)  # (...,) each
    return lo, hi


def retrieval(
    scores: torch.Tensor,
    gold: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    ties: Ties = "pessimistic",
) -> dict[str, torch.Tensor]:
    """Retrieval precision at k and mean reciprocal rank.

    For query i the rank is that of its best-ranked gold candidate (any listed alternative counts
    as a hit): ``rank = 1 + #{non-gold j : scores[i, j] >= best gold score}``. Ties with non-gold
    candidates count against the query (``ties="pessimistic"``, the default), so a collapsed space
    where every score is equal gets no credit; ``ties="optimistic"`` counts only strictly greater
    scores. Under a random ranking the expected P@1 is :func:`random_chance_p_at_1`.

    Args:
        scores: Scores ``(..., B, C)``, higher is better (e.g. :func:`similarity`, :func:`csls`).
        gold: Bool mask ``(B, C)`` of correct candidates; every row needs at least one True.
        ks: Cut-offs k of the reported P@k.
        ties: How ties between the best gold and a non-gold candidate are ranked.

    Returns:
        ``{"p_at_<k>": (...,) for k in ks, "mrr": (...,), "rank": (..., B) int64}``; the P@k and MRR
        are float64 means over the B queries.
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    gold = _check_gold(gold, *scores.shape[-2:], scores.device)
    if not bool(gold.any(dim=-1).all()):
        raise ValueError("every query needs at least one gold candidate")
    scores = scores.detach()
    best = scores.masked_fill(~gold, float("-inf")).amax(dim=-1, keepdim=True)  # (..., B, 1)
    above = scores >= best if ties == "pessimistic" else scores > best  # (..., B, C)
    rank = (above & ~gold).sum(dim=-1) + 1  # (..., B)
    out = {f"p_at_{k}": (rank <= k).to(torch.float64).mean(dim=-1) for k in ks}
    out["mrr"] = (1.0 / rank.to(torch.float64)).mean(dim=-1)
    out["rank"] = rank
    return out


def random_chance_p_at_1(gold: torch.Tensor) -> float:
    """Expected P@1 of a uniformly random ranking: mean over queries of ``n_gold_i / C``.

    Args:
        gold: Bool mask ``(B, C)`` of correct candidates.

    Returns:
        The chance level, to print beside every P@1.
    """
    return float(gold.to(torch.float64).mean(dim=-1).mean())


def bli_report(
    src: torch.Tensor, tgt: torch.Tensor, gold: torch.Tensor, *, csls_k: int = 10
) -> dict[str, torch.Tensor]:
    """Bilingual lexicon induction scores of one direction, nearest neighbour and CSLS.

    For the reverse direction call it with the arguments swapped and the mask transposed:
    ``bli_report(tgt, src, gold.transpose(-1, -2))``.

    Args:
        src: Query vectors ``(..., B, D)``.
        tgt: Candidate vectors ``(..., C, D)``.
        gold: Bool mask ``(B, C)`` of correct candidates.
        csls_k: Neighbourhood size of CSLS.

    Returns:
        ``{"<m>_nn", "<m>_csls"}`` for m in ``p_at_1``, ``p_at_5``, ``mrr`` (float64 ``(...,)``)
        and ``rank`` (int64 ``(..., B)``).
    """
    return _bli_from_sim(similarity(src.detach(), tgt.detach()), gold, csls_k)


def _bli_from_sim(sim: torch.Tensor, gold: torch.Tensor, csls_k: int) -> dict[str, torch.Tensor]:
    """:func:`bli_report` from a cosine matrix ``(..., B, C)``."""
    out: dict[str, torch.Tensor] = {}
    for method, scores in (("nn", sim), ("csls", _csls_from_sim(sim, csls_k))):
        for name, value in retrieval(scores, gold, ks=(1, 5)).items():
            out[f"{name}_{method}"] = value
    return out


def centered_similarity(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Cosines after mean-centring each side over its own list (:func:`center`).

    The retrieval of MUSE (Conneau et al. 2018) and vecmap (Artetxe et al. 2018), which centre
    each language before nearest-neighbour search: subtracting each side's mean vector removes
    the direction every word shares in an anisotropic space, the same quantity the mismatched
    baseline measures for the margin. Each list is centred by its own mean, so a set's figure
    depends on that set's vectors only (a control set scores the same alone or beside others).

    Args:
        src: Query vectors ``(..., B, D)``; centred over B.
        tgt: Candidate vectors ``(..., C, D)``; centred over C.

    Returns:
        Float64 cosines ``(..., B, C)``.
    """
    _check_pair(src, tgt)
    return similarity(center(src.to(torch.float64)), center(tgt.to(torch.float64)))


def centered_report(
    src: torch.Tensor, tgt: torch.Tensor, gold: torch.Tensor
) -> dict[str, torch.Tensor]:
    """P@1, P@5, MRR and ranks of one direction by nearest neighbour after centring.

    For the reverse direction call it with the arguments swapped and the mask transposed.

    Args:
        src: Query vectors ``(..., B, D)``.
        tgt: Candidate vectors ``(..., C, D)``.
        gold: Bool mask ``(B, C)`` of correct candidates.

    Returns:
        ``p_at_1_centered``, ``p_at_5_centered``, ``mrr_centered`` (float64 ``(...,)``) and
        ``rank_centered`` (int64 ``(..., B)``).
    """
    scores = centered_similarity(src.detach(), tgt.detach())  # (..., B, C)
    return {f"{k}_centered": v for k, v in retrieval(scores, gold, ks=(1, 5)).items()}


def alignment_summary(
    src: torch.Tensor,
    tgt: torch.Tensor,
    gold: torch.Tensor,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    csls_k: int = 10,
    level: float = 0.95,
) -> dict[str, float | list]:
    """Everything the scan and evaluation stages report about one stack of pair vectors.

    Args:
        src: Source vectors ``(..., B, D)``, typically ``(L, B, D)``.
        tgt: Target vectors ``(..., B, D)``; row i translates ``src`` row i.
        gold: Bool mask ``(B, B)`` of correct source -> target candidates (diagonal plus
            alternatives); its transpose serves target -> source.
        n_boot: Bootstrap resamples of the margin interval.
        seed: Seed of the bootstrap.
        csls_k: Neighbourhood size of CSLS.
        level: Coverage of the margin interval.

    Returns:
        A flat dict of plain Python floats (for ``(B, D)`` input) or lists over the leading dims
        (e.g. one value per layer for ``(L, B, D)``); every key has the same shape:
        ``pair_mean``, ``pair_std`` (sample std, ddof=1), ``baseline``, ``margin``, ``margin_lo``,
        ``margin_hi``, ``chance_p_at_1_s2t``, ``chance_p_at_1_t2s``, and ``<m>_<dir>_<method>``
        for m in ``p_at_1``, ``p_at_5``, ``mrr``, dir in ``s2t``, ``t2s``, method in ``nn``,
        ``csls``, ``centered`` (e.g. ``p_at_1_s2t_nn``; ``centered``: nearest neighbour after
        :func:`centered_similarity`).
    """
    _check_square(src, tgt)
    src, tgt = src.detach(), tgt.detach()
    sim = similarity(src, tgt)  # (..., B, B), computed once for everything below
    gold_t = gold.transpose(-1, -2)
    pair = sim.diagonal(dim1=-2, dim2=-1)  # (..., B)
    row_sum, row_count = _mismatched_rows(sim, gold)  # (..., B) each
    baseline = row_sum.sum(dim=-1) / row_count.sum(dim=-1)  # (...,)
    lo, hi = _bootstrap_margin(pair, row_sum, row_count, n_boot=n_boot, seed=seed, level=level)
    out: dict[str, torch.Tensor] = {
        "pair_mean": pair.mean(dim=-1),
        "pair_std": pair.std(dim=-1, correction=1),
        "baseline": baseline,
        "margin": pair.mean(dim=-1) - baseline,
        "margin_lo": lo,
        "margin_hi": hi,
        "chance_p_at_1_s2t": torch.full_like(baseline, random_chance_p_at_1(gold)),
        "chance_p_at_1_t2s": torch.full_like(baseline, random_chance_p_at_1(gold_t)),
    }
    for direction, (s, g) in (("s2t", (sim, gold)), ("t2s", (sim.transpose(-1, -2), gold_t))):
        for key, value in _bli_from_sim(s, g, csls_k).items():
            if not key.startswith("rank"):
                metric, method = key.rsplit("_", 1)
                out[f"{metric}_{direction}_{method}"] = value
    del sim, pair, s  # free the (..., B, B) cosines before the centred ones
    centred = centered_similarity(src, tgt)  # (..., B, B), each side centred over its list
    for direction, (s, g) in (
        ("s2t", (centred, gold)),
        ("t2s", (centred.transpose(-1, -2), gold_t)),
    ):
        for key, value in retrieval(s, g, ks=(1, 5)).items():
            if key != "rank":
                out[f"{key}_{direction}_centered"] = value
    return {key: value.tolist() for key, value in out.items()}


# --- paired comparisons (before vs. after) ---------------------------------------------------

def margin_rows(sim: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The margin split into per-query rows, so that a resample of queries is a weighted sum.

    ``margin = mean(pair) - sum(row_sum) / sum(row_count)``: row i holds its translation-pair
    cosine, the sum of its mismatched cosines (every candidate j with ``gold[i, j]`` False) and
    their number (as :func:`alignment_summary` computes the baseline).

    Args:
        sim: Cosines ``(..., B, B)`` of source i with target j.
        gold: Bool mask ``(B, B)`` of correct candidates (diagonal plus alternatives).

    Returns:
        ``(pair, row_sum, row_count)``, float64 ``(..., B)`` each.
    """
    sim = sim.to(torch.float64)
    off = ~gold.to(sim.device)  # (B, B)
    pair = sim.diagonal(dim1=-2, dim2=-1)  # (..., B)
    row_sum = (sim * off).sum(dim=-1)  # (..., B)
    row_count = off.sum(dim=-1).to(torch.float64).expand_as(row_sum)  # (..., B)
    return pair, row_sum, row_count


def resample_indices(b: int, n_boot: int, seed: int) -> torch.Tensor:
    """The bootstrap's resamples of ``b`` queries: ``(n_boot, b)`` indices, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(b, (n_boot, b), generator=gen)  # (n_boot, B)


def paired_margin_bootstrap(
    pre_sim: torch.Tensor,
    post_sim: torch.Tensor,
    gold: torch.Tensor,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, torch.Tensor]:
    """Paired percentile bootstrap of the change of pair cosine, baseline and margin.

    Each resample draws B queries with replacement (:func:`resample_indices`) and recomputes
    the mean pair cosine, the mismatched baseline (resampled query rows against all candidates,
    as :func:`margin_ci`) and the margin, *before and after on the same resample*, so
    the interval is that of the paired change, not of two independent margins. The same
    resamples serve every leading index (layer).

    Args:
        pre_sim: Cosines ``(..., B, B)`` before (source i with target j).
        post_sim: Cosines ``(..., B, B)`` after, same pairs.
        gold: Bool mask ``(B, B)`` of correct candidates.
        n_boot: Number of resamples.
        seed: Seed of the resamples.
        level: Coverage of the intervals, in (0, 1).

    Returns:
        Float64 ``(...,)`` tensors: ``pair_change``, ``baseline_change``, ``margin_change``
        (observed, post - pre) and ``<name>_lo`` / ``<name>_hi`` for each.
    """
    if pre_sim.shape != post_sim.shape:
        raise ValueError(f"pre and post differ in shape: {pre_sim.shape} vs {post_sim.shape}")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    b = pre_sim.shape[-1]
    idx = resample_indices(b, n_boot, seed)
    weights = (
        torch.zeros(n_boot, b, dtype=torch.float64)
        .scatter_add_(1, idx, torch.ones(n_boot, b, dtype=torch.float64))
        .T.to(pre_sim.device)
    )  # (B, n_boot): multiplicity of each query in each resample

    def parts(sim: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pair, row_sum, row_count = margin_rows(sim, gold)
        observed = (pair.mean(-1), row_sum.sum(-1) / row_count.sum(-1))  # (...,) each
        boot = (pair @ weights / b, (row_sum @ weights) / (row_count @ weights))  # (..., n_boot)
        return observed, boot

    (pair0, base0), (pair0_b, base0_b) = parts(pre_sim)
    (pair1, base1), (pair1_b, base1_b) = parts(post_sim)
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64, device=pre_sim.device)
    out: dict[str, torch.Tensor] = {}
    for name, observed, boot in (
        ("pair_change", pair1 - pair0, pair1_b - pair0_b),
        ("baseline_change", base1 - base0, base1_b - base0_b),
        (
            "margin_change",
            (pair1 - base1) - (pair0 - base0),
            (pair1_b - base1_b) - (pair0_b - base0_b),
        ),
    ):
        lo, hi = torch.quantile(boot, q, dim=-1)
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = observed, lo, hi
    return out


def top1_hits(src: torch.Tensor, tgt: torch.Tensor, gold: torch.Tensor, csls_k: int) -> dict:
    """Per-query top-1 hits ``(..., B)`` bool for every retrieval in :data:`RETRIEVALS`.

    A hit is rank 1 with ties counted against the query (:func:`retrieval`), so the
    hits average to the P@1 of :func:`alignment_summary`.
    """
    out = {}
    for direction, (q, c, g) in (("s2t", (src, tgt, gold)), ("t2s", (tgt, src, gold.T))):
        report = bli_report(q, c, g, csls_k=csls_k) | centered_report(q, c, g)
        for method in METHODS:
            out[f"{direction}_{method}"] = report[f"rank_{method}"] == 1
    return {kind: out[kind] for kind in RETRIEVALS}


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded random permutation of ``range(n)`` with no fixed point (n >= 2).

    Neighbours in a word list are often related (the bundled lexicon is grouped by category),
    so mismatched pairs are drawn at random rather than as (i, i + 1).
    """
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    for i in range(n):
        if order[i] == i:  # swap with the next slot (or the first); keeps it a permutation
            j = (i + 1) % n
            order[i], order[j] = order[j], order[i]
    return order


def mismatched_change(
    pre: tuple[torch.Tensor, torch.Tensor],
    post: tuple[torch.Tensor, torch.Tensor],
    seed: int = 0,
) -> torch.Tensor:
    """Per-pair cosine change of mismatched pairs: source i with target ``perm(i)``.

    The same seeded :func:`derangement` before and after, so each mismatched pair is compared
    with itself. If these move as much as the translation pairs, a gain is collapse.

    Args:
        pre: ``(src, tgt)`` vectors ``(B, D)`` before; row i of tgt translates row i of src.
        post: The same after.
        seed: Seed of the derangement.

    Returns:
        Float64 ``(B,)``: post minus pre cosine of each mismatched pair.
    """
    perm = torch.tensor(derangement(pre[0].shape[0], seed))
    before = pair_cosine(pre[0], pre[1][perm])  # (B,)
    after = pair_cosine(post[0], post[1][perm])  # (B,)
    return after - before
