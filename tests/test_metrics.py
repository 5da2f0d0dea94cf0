import math

import numpy as np
import pytest
import torch

from tli import metrics as M
from tli.errors import TLIError
from tli.metrics import (
    RETRIEVALS,
    alignment_summary,
    margin_rows,
    paired_margin_bootstrap,
    resample_indices,
    similarity,
    top1_hits,
)

from conftest import gold_of

# ---------------------------------------------------------------- slow references (explicit loops)


def ref_cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ref_similarity(src, tgt):
    return np.array([[ref_cos(x, y) for y in tgt] for x in src])


def ref_csls(src, tgt, k):
    sim = ref_similarity(src, tgt)
    b, c = sim.shape
    r_t = [np.mean(sorted(sim[i], reverse=True)[: min(k, c)]) for i in range(b)]
    r_s = [np.mean(sorted(sim[:, j], reverse=True)[: min(k, b)]) for j in range(c)]
    return np.array([[2 * sim[i, j] - r_t[i] - r_s[j] for j in range(c)] for i in range(b)])


def ref_baseline(src, tgt, gold):
    vals = [
        ref_cos(src[i], tgt[j]) for i in range(len(src)) for j in range(len(tgt)) if not gold[i][j]
    ]
    return float(np.mean(vals))


def ref_rank(scores_row, gold_row, pessimistic=True):
    # Sort candidates by score, best first; among equal scores put non-gold first (pessimistic)
    # or gold first (optimistic); the rank is the position of the first gold candidate.
    order = sorted(
        range(len(scores_row)),
        key=lambda j: (-scores_row[j], gold_row[j] if pessimistic else not gold_row[j]),
    )
    return next(pos for pos, j in enumerate(order, start=1) if gold_row[j])


def ref_retrieval(scores, gold, pessimistic=True):
    ranks = [ref_rank(list(scores[i]), list(gold[i]), pessimistic) for i in range(len(scores))]
    return {
        "p_at_1": np.mean([r <= 1 for r in ranks]),
        "p_at_5": np.mean([r <= 5 for r in ranks]),
        "mrr": np.mean([1 / r for r in ranks]),
        "rank": ranks,
    }


# ---------------------------------------------------------------- data


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def gold_with_alternatives(b, c, seed=0, p=0.1):
    g = torch.Generator().manual_seed(seed)
    gold = torch.rand(b, c, generator=g) < p
    gold[torch.arange(b), torch.arange(b) % c] = True
    return gold


B, C, D, L = 9, 13, 6, 3


@pytest.fixture(params=["2d", "3d"])
def layered(request):
    """(src, tgt) as (B, D)/(C, D) or (L, B, D)/(L, C, D), plus the list of 2-D layers."""
    src, tgt = rand(L, B, D, seed=1), rand(L, C, D, seed=2)
    if request.param == "2d":
        return src[0], tgt[0], [(src[0], tgt[0])]
    return src, tgt, list(zip(src, tgt, strict=True))


@pytest.fixture(params=["2d", "3d"])
def paired(request):
    """Square (src, tgt) translation pairs, 2-D or layered, plus the list of 2-D layers."""
    src = rand(L, B, D, seed=3)
    tgt = src + 0.8 * rand(L, B, D, seed=4)
    if request.param == "2d":
        return src[0], tgt[0], [(src[0], tgt[0])]
    return src, tgt, list(zip(src, tgt, strict=True))


# ---------------------------------------------------------------- basics


def test_normalize_and_center():
    x = rand(L, B, D) * 5 + 3
    u = M.normalize(x)
    assert torch.allclose(u.norm(dim=-1), torch.ones(L, B))
    c = M.center(x)
    assert c.shape == x.shape
    assert torch.allclose(c.norm(dim=-1), torch.ones(L, B))
    for layer in range(L):
        xs = x[layer].double().numpy()
        xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
        xs = xs - xs.mean(axis=0)
        xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
        np.testing.assert_allclose(c[layer].numpy(), xs, atol=1e-6)
    assert M.normalize(torch.zeros(2, 3)).eq(0).all()


def test_pair_cosine_matches_reference(paired):
    src, tgt, layers = paired
    got = M.pair_cosine(src, tgt)
    assert got.shape == src.shape[:-1] and got.dtype == torch.float64
    for row, (s, t) in zip(got.reshape(-1, B), layers, strict=True):
        np.testing.assert_allclose(row.numpy(), [ref_cos(a, b) for a, b in zip(s, t, strict=True)])


def test_similarity_and_csls_match_reference(layered):
    src, tgt, layers = layered
    sim, cs = M.similarity(src, tgt), M.csls(src, tgt, k=4)
    assert sim.shape == cs.shape == (*src.shape[:-2], B, C)
    for s2, c2, (s, t) in zip(sim.reshape(-1, B, C), cs.reshape(-1, B, C), layers, strict=True):
        np.testing.assert_allclose(s2.numpy(), ref_similarity(s, t), atol=1e-12)
        np.testing.assert_allclose(c2.numpy(), ref_csls(s, t, 4), atol=1e-12)


def test_csls_k_is_clipped():
    src, tgt = rand(3, D, seed=5), rand(4, D, seed=6)
    np.testing.assert_allclose(M.csls(src, tgt, k=50).numpy(), ref_csls(src, tgt, 50), atol=1e-12)
    with pytest.raises(ValueError):
        M.csls(src, tgt, k=0)


def test_cosine_bounds_and_symmetry():
    a, b = rand(L, B, D, seed=7), rand(L, C, D, seed=8)
    sim = M.similarity(a, b)
    assert sim.abs().max() <= 1 + 1e-12
    torch.testing.assert_close(M.similarity(b, a), sim.transpose(-1, -2))
    assert M.pair_cosine(a, a).sub(1).abs().max() < 1e-12
    # Unnormalised input still gives cosines.
    torch.testing.assert_close(M.similarity(10 * a, 0.1 * b), sim)


def test_shape_errors():
    with pytest.raises(ValueError):
        M.similarity(rand(B, D), rand(C, D + 1))
    with pytest.raises(ValueError):
        M.pair_cosine(rand(B, D), rand(C, D))
    with pytest.raises(ValueError):
        M.mismatched_baseline(rand(B, D), rand(C, D), torch.eye(B, dtype=torch.bool))
    with pytest.raises(ValueError):
        M.retrieval(rand(B, C), torch.ones(B, C))  # not bool
    with pytest.raises(ValueError):
        M.retrieval(rand(B, C), torch.ones(B, C, dtype=torch.bool), ties="average")


# ---------------------------------------------------------------- gold masks


def test_gold_mask_from_keys():
    candidates = ["sea", "Ocean", "dog", "big  house", "sea"]
    gold = M.gold_mask_from_keys([{"sea", "ocean"}, {"dog"}, {"Big house"}], candidates)
    expected = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(gold, expected)
    with pytest.raises(TLIError, match="query 1"):
        M.gold_mask_from_keys([{"sea"}, {"cat"}], candidates)


def test_random_chance_p_at_1():
    assert M.random_chance_p_at_1(torch.eye(4, dtype=torch.bool)) == pytest.approx(0.25)
    gold = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert M.random_chance_p_at_1(gold) == pytest.approx((2 / 4 + 1 / 4) / 2)


# ---------------------------------------------------------------- baseline and margin


def test_baseline_and_margin_match_reference(paired):
    src, tgt, layers = paired
    gold = gold_with_alternatives(B, B, seed=9)
    base, marg = M.mismatched_baseline(src, tgt, gold), M.margin(src, tgt, gold)
    assert base.shape == marg.shape == src.shape[:-2]
    for b1, m1, (s, t) in zip(base.reshape(-1), marg.reshape(-1), layers, strict=True):
        ref_b = ref_baseline(s, t, gold.tolist())
        ref_pair = np.mean([ref_cos(x, y) for x, y in zip(s, t, strict=True)])
        assert float(b1) == pytest.approx(ref_b, abs=1e-12)
        assert float(m1) == pytest.approx(ref_pair - ref_b, abs=1e-12)


def test_baseline_matches_reference_non_square(layered):
    src, tgt, layers = layered
    gold = gold_with_alternatives(B, C, seed=10, p=0.2)
    base = M.mismatched_baseline(src, tgt, gold).reshape(-1)
    for b1, (s, t) in zip(base, layers, strict=True):
        assert float(b1) == pytest.approx(ref_baseline(s, t, gold.tolist()), abs=1e-12)


def test_margin_ci_matches_explicit_resampling(paired):
    src, tgt, layers = paired
    gold = gold_with_alternatives(B, B, seed=11)
    n_boot, seed = 50, 7
    lo, hi = M.margin_ci(src, tgt, gold, n_boot=n_boot, seed=seed, level=0.9)
    assert lo.shape == hi.shape == src.shape[:-2]
    # Same draw as the implementation: torch.randint(B, (n_boot, B)) from a seeded Generator.
    idx = torch.randint(B, (n_boot, B), generator=torch.Generator().manual_seed(seed)).tolist()
    for l1, h1, (s, t) in zip(lo.reshape(-1), hi.reshape(-1), layers, strict=True):
        boots = []
        for rows in idx:
            pair = np.mean([ref_cos(s[i], t[i]) for i in rows])
            mism = [ref_cos(s[i], t[j]) for i in rows for j in range(B) if not gold[i, j]]
            boots.append(pair - np.mean(mism))
        ref_lo, ref_hi = np.percentile(boots, [5, 95])
        assert float(l1) == pytest.approx(ref_lo, abs=1e-12)
        assert float(h1) == pytest.approx(ref_hi, abs=1e-12)


def test_margin_ci_deterministic_per_seed(paired):
    src, tgt, _ = paired
    gold = torch.eye(B, dtype=torch.bool)
    a = M.margin_ci(src, tgt, gold, n_boot=200, seed=3)
    b = M.margin_ci(src, tgt, gold, n_boot=200, seed=3)
    c = M.margin_ci(src, tgt, gold, n_boot=200, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    marg = M.margin(src, tgt, gold)
    assert bool((a[0] <= marg).all() and (marg <= a[1]).all())


def test_margin_ci_contains_zero_for_shuffled_targets():
    src = rand(200, 64, seed=12)
    tgt = src + 0.5 * rand(200, 64, seed=13)
    gold = torch.eye(200, dtype=torch.bool)
    lo, hi = M.margin_ci(src, tgt, gold, n_boot=500, seed=0)
    assert float(lo) > 0.5  # aligned: clearly positive
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(14))
    lo, hi = M.margin_ci(src, tgt[perm], gold, n_boot=500, seed=0)
    assert float(lo) < 0 < float(hi)


# ---------------------------------------------------------------- retrieval


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_retrieval_matches_reference(layered, ties):
    src, tgt, layers = layered
    gold = gold_with_alternatives(B, C, seed=15, p=0.15)
    # Round the scores so that ties actually occur.
    scores = (M.similarity(src, tgt) * 4).round() / 4
    got = M.retrieval(scores, gold, ks=(1, 5), ties=ties)
    assert got["p_at_1"].shape == got["mrr"].shape == src.shape[:-2]
    assert got["rank"].shape == (*src.shape[:-2], B)
    flat = {k: v.reshape(-1, *v.shape[src.dim() - 2 :]) for k, v in got.items()}
    for layer, s in enumerate(scores.reshape(-1, B, C)):
        ref = ref_retrieval(s.tolist(), gold.tolist(), pessimistic=ties == "pessimistic")
        assert flat["rank"][layer].tolist() == ref["rank"]
        for key in ("p_at_1", "p_at_5", "mrr"):
            assert float(flat[key][layer]) == pytest.approx(ref[key], abs=1e-12)


def test_retrieval_ties_in_collapsed_space():
    scores = torch.ones(5, 5)
    gold = torch.eye(5, dtype=torch.bool)
    assert float(M.retrieval(scores, gold)["p_at_1"]) == 0.0
    assert float(M.retrieval(scores, gold, ties="optimistic")["p_at_1"]) == 1.0


def test_alternative_gold_counts_as_hit():
    src = rand(6, D, seed=16)
    tgt = rand(6, D, seed=17)
    tgt[3] = src[0]  # query 0's best candidate is candidate 3
    diag = torch.eye(6, dtype=torch.bool)
    assert int(M.retrieval(M.similarity(src, tgt), diag)["rank"][0]) > 1
    gold = diag.clone()
    gold[0, 3] = True  # ... which is a listed alternative gloss of query 0
    out = M.retrieval(M.similarity(src, tgt), gold)
    assert int(out["rank"][0]) == 1
    with pytest.raises(ValueError):
        M.retrieval(M.similarity(src, tgt), torch.zeros(6, 6, dtype=torch.bool))


def test_identical_lists_are_perfect(paired):
    src, _, _ = paired
    gold = torch.eye(B, dtype=torch.bool)
    report = M.bli_report(src, src.clone(), gold, csls_k=3)
    for method in ("nn", "csls"):
        assert torch.all(report[f"p_at_1_{method}"] == 1.0)
        assert torch.all(report[f"mrr_{method}"] == 1.0)
    assert torch.all(M.margin(src, src, gold) > 0)


def test_bli_report_matches_parts(layered):
    src, tgt, _ = layered
    gold = gold_with_alternatives(B, C, seed=18)
    report = M.bli_report(src, tgt, gold, csls_k=3)
    assert set(report) == {
        f"{m}_{method}" for m in ("p_at_1", "p_at_5", "mrr", "rank") for method in ("nn", "csls")
    }
    csls = M.retrieval(M.csls(src, tgt, k=3), gold)
    torch.testing.assert_close(report["mrr_csls"], csls["mrr"])
    torch.testing.assert_close(report["rank_nn"], M.retrieval(M.similarity(src, tgt), gold)["rank"])


# ---------------------------------------------------------------- summary


def test_alignment_summary_layered():
    src = rand(L, B, D, seed=19)
    tgt = src + rand(L, B, D, seed=20)
    gold = gold_with_alternatives(B, B, seed=21)
    out = M.alignment_summary(src, tgt, gold, n_boot=100, seed=0, csls_k=3)
    retrieval_keys = {
        f"{m}_{d}_{method}"
        for m in ("p_at_1", "p_at_5", "mrr")
        for d in ("s2t", "t2s")
        for method in ("nn", "csls", "centered")
    }
    base_keys = {"pair_mean", "pair_std", "baseline", "margin", "margin_lo", "margin_hi"}
    assert set(out) == base_keys | retrieval_keys | {"chance_p_at_1_s2t", "chance_p_at_1_t2s"}
    assert all(isinstance(v, list) and len(v) == L for v in out.values())
    assert all(isinstance(x, float) for v in out.values() for x in v)
    pair = M.pair_cosine(src, tgt)
    np.testing.assert_allclose(out["pair_std"], pair.std(dim=-1).numpy())
    np.testing.assert_allclose(out["margin"], M.margin(src, tgt, gold).numpy())
    t2s = M.bli_report(tgt, src, gold.T, csls_k=3)
    np.testing.assert_allclose(out["p_at_1_t2s_csls"], t2s["p_at_1_csls"].numpy())
    t2s_centred = M.centered_report(tgt, src, gold.T)
    np.testing.assert_allclose(out["mrr_t2s_centered"], t2s_centred["mrr_centered"].numpy())
    assert out["chance_p_at_1_s2t"][0] == pytest.approx(M.random_chance_p_at_1(gold))
    # Each layer alone gives the same numbers as the stack (the bootstrap shares one draw).
    one = M.alignment_summary(src[1], tgt[1], gold, n_boot=100, seed=0, csls_k=3)
    for key, value in one.items():
        assert isinstance(value, float)
        assert value == pytest.approx(out[key][1], abs=1e-12), key
    assert math.isfinite(out["margin_lo"][0]) and out["margin_lo"][0] <= out["margin_hi"][0]


def test_centred_retrieval_matches_a_slow_reference():
    # Each side centred over its own list (numpy, loops), then nearest-neighbour ranks with ties
    # counted against the query and listed alternatives counted as hits.
    src = rand(L, B, D, seed=31) + 2.0  # a shared offset: the anisotropy centring removes
    tgt = src + 1.5 * rand(L, B, D, seed=32) + 2.0
    gold = gold_with_alternatives(B, B, seed=33)
    out = M.centered_report(src, tgt, gold)
    for layer in range(L):

        def centred(x):
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            x = x - x.mean(axis=0)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        sim = ref_similarity(
            centred(src[layer].double().numpy()), centred(tgt[layer].double().numpy())
        )
        ranks = []
        for i in range(B):
            best = max(sim[i, j] for j in range(B) if gold[i, j])
            ranks.append(1 + sum(1 for j in range(B) if not gold[i, j] and sim[i, j] >= best))
        assert out["rank_centered"][layer].tolist() == ranks
        p_at_1 = np.mean([r == 1 for r in ranks])
        assert out["p_at_1_centered"][layer].item() == pytest.approx(p_at_1)
        assert out["mrr_centered"][layer].item() == pytest.approx(np.mean([1 / r for r in ranks]))
    # Centring is what makes it differ from plain nearest neighbour here.
    plain = M.bli_report(src, tgt, gold)
    assert not torch.equal(plain["rank_nn"], out["rank_centered"])


# ---------------------------------------------------------------- margin parts, paired bootstrap


def test_margin_rows_give_the_summary_baseline_and_margin():
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(3, 6, 5, generator=gen), torch.randn(3, 6, 5, generator=gen)
    gold = gold_of(6, [(0, 3)])
    pair, row_sum, row_count = margin_rows(similarity(src, tgt), gold)
    summary = alignment_summary(src, tgt, gold, n_boot=10)
    baseline = row_sum.sum(-1) / row_count.sum(-1)
    assert torch.allclose(baseline, torch.tensor(summary["baseline"], dtype=torch.float64))
    margin = pair.mean(-1) - baseline
    assert torch.allclose(margin, torch.tensor(summary["margin"], dtype=torch.float64))


def _slow_margin(sim, gold, rows):
    """Margin of one resample of query rows, written out cell by cell."""
    b = sim.shape[0]
    pair = float(np.mean([sim[i, i] for i in rows]))
    mismatched = [sim[i, j] for i in rows for j in range(b) if not gold[i, j]]
    baseline = float(np.mean(mismatched))
    return pair, baseline


def test_paired_margin_bootstrap_matches_a_slow_loop():
    gen = torch.Generator().manual_seed(1)
    L, B, D, n_boot, seed = 2, 7, 4, 40, 3
    src0, tgt0 = torch.randn(L, B, D, generator=gen), torch.randn(L, B, D, generator=gen)
    src1, tgt1 = src0 + 0.5 * torch.randn(L, B, D, generator=gen), tgt0 + 0.3 * src0
    gold = gold_of(B, [(2, 5), (5, 2)])
    pre, post = similarity(src0, tgt0), similarity(src1, tgt1)
    got = paired_margin_bootstrap(pre, post, gold, n_boot=n_boot, seed=seed, level=0.9)
    idx = resample_indices(B, n_boot, seed).numpy()
    g = gold.numpy()
    for layer in range(L):
        s0, s1 = pre[layer].numpy(), post[layer].numpy()
        boots = {"pair_change": [], "baseline_change": [], "margin_change": []}
        for rows in idx:
            p0, b0 = _slow_margin(s0, g, rows)
            p1, b1 = _slow_margin(s1, g, rows)
            boots["pair_change"].append(p1 - p0)
            boots["baseline_change"].append(b1 - b0)
            boots["margin_change"].append((p1 - b1) - (p0 - b0))
        all_rows = np.arange(B)
        p0, b0 = _slow_margin(s0, g, all_rows)
        p1, b1 = _slow_margin(s1, g, all_rows)
        observed = {
            "pair_change": p1 - p0,
            "baseline_change": b1 - b0,
            "margin_change": (p1 - b1) - (p0 - b0),
        }
        for name, values in boots.items():
            lo, hi = np.quantile(values, [0.05, 0.95])
            assert got[f"{name}_lo"][layer].item() == pytest.approx(lo, abs=1e-12)
            assert got[f"{name}_hi"][layer].item() == pytest.approx(hi, abs=1e-12)
            assert got[name][layer].item() == pytest.approx(observed[name], abs=1e-12)


def test_paired_bootstrap_is_seeded_and_paired():
    gen = torch.Generator().manual_seed(2)
    src, tgt = torch.randn(20, 8, generator=gen), torch.randn(20, 8, generator=gen)
    sim, gold = similarity(src, tgt), gold_of(20)
    a = paired_margin_bootstrap(sim, sim + 0.01, gold, n_boot=30, seed=5)
    b = paired_margin_bootstrap(sim, sim + 0.01, gold, n_boot=30, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A shift of every cosine moves pairs and baseline alike: the margin change is exactly 0
    # on every resample (an unpaired bootstrap would give a wide interval around 0).
    assert a["margin_change_lo"].item() == pytest.approx(0.0, abs=1e-12)
    assert a["margin_change_hi"].item() == pytest.approx(0.0, abs=1e-12)
    assert a["pair_change_lo"].item() == pytest.approx(0.01)


def test_top1_hits_average_to_the_summary_p_at_1():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(2, 9, 6, generator=gen)
    tgt = src + 0.8 * torch.randn(2, 9, 6, generator=gen)
    gold = gold_of(9, [(1, 4)])
    hits = top1_hits(src, tgt, gold, csls_k=3)
    summary = alignment_summary(src, tgt, gold, n_boot=5, csls_k=3)
    assert set(hits) == set(RETRIEVALS)
    for kind, h in hits.items():
        assert h.shape == (2, 9) and h.dtype == torch.bool
        assert h.double().mean(-1).tolist() == pytest.approx(summary[f"p_at_1_{kind}"])


# ---------------------------------------------------------------- mismatched pairs


def test_mismatched_pairs_are_a_seeded_derangement():
    from tli.metrics import derangement

    for n in (2, 3, 10, 97):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm) == list(range(n))
            assert all(perm[i] != i for i in range(n))
            assert perm == derangement(n, seed)
