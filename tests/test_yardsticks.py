"""tli.yardsticks: the Procrustes fit against a numpy reference, rotation recovery, no leakage."""

import numpy as np
import pytest
import torch

from tli.metrics import center, centered_report, retrieval, similarity
from tli.yardsticks import (
    YARDSTICKS,
    best,
    fit_procrustes,
    frozen_yardsticks,
    prepare,
    score_set,
)

from conftest import gold_of


def _numpy_procrustes(x, y):
    """The textbook solution: W = U V^T from the SVD of X^T Y, on renorm-centre-renorm vectors."""

    def prep(a):
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        a = a - a.mean(axis=0, keepdims=True)
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    u, _, vt = np.linalg.svd(prep(x).T @ prep(y))
    return u @ vt


def _rotation(d, seed=0):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_fit_matches_a_numpy_svd_reference_per_layer():
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(3, 40, 8, generator=gen)
    tgt = torch.randn(3, 40, 8, generator=gen)
    w = fit_procrustes(src, tgt)
    assert w.shape == (3, 8, 8) and w.dtype == torch.float64
    for layer in range(3):
        want = _numpy_procrustes(src[layer].double().numpy(), tgt[layer].double().numpy())
        np.testing.assert_allclose(w[layer].numpy(), want, atol=1e-10)
        np.testing.assert_allclose(w[layer].numpy().T @ w[layer].numpy(), np.eye(8), atol=1e-10)


def test_fit_recovers_a_known_rotation_exactly():
    rot = _rotation(6, seed=1)
    x = np.random.default_rng(2).standard_normal((30, 6))
    y = x @ rot  # the targets are the sources rotated: centring and norms commute with it
    w = fit_procrustes(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(w, rot, atol=1e-10)
    # ... so every source retrieves its own target, by each Procrustes yardstick
    scores = score_set(
        torch.from_numpy(x)[None], torch.from_numpy(y)[None], gold_of(30), torch.from_numpy(w)[None]
    )
    for kind in ("procrustes_nn", "procrustes_csls", "procrustes_centered"):
        assert scores[f"p_at_1_s2t_{kind}"] == [1.0]
        assert scores[f"p_at_1_t2s_{kind}"] == [1.0]
        assert scores[f"mrr_s2t_{kind}"] == [1.0]


def test_no_control_pair_is_used_in_fitting(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    trained = torch.randn(2, 20, 5, generator=gen), torch.randn(2, 20, 5, generator=gen)
    control = torch.randn(2, 7, 5, generator=gen), torch.randn(2, 7, 5, generator=gen)
    seen = []
    import scipy.linalg

    real = scipy.linalg.orthogonal_procrustes

    def spy(a, b, *args, **kwargs):
        seen.append((a.copy(), b.copy()))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "orthogonal_procrustes", spy)
    golds = {"trained": gold_of(20), "control": gold_of(7)}
    first = frozen_yardsticks(
        {"trained": trained[0], "control": control[0]},
        {"trained": trained[1], "control": control[1]},
        golds,
    )
    # every fit saw exactly the prepared trained vectors of one layer, nothing else
    assert len(seen) == 2
    for layer, (a, b) in enumerate(seen):
        np.testing.assert_array_equal(a, prepare(trained[0][layer]).numpy())
        np.testing.assert_array_equal(b, prepare(trained[1][layer]).numpy())
    # other control vectors: the same trained-set figures (the map did not move)
    other = torch.randn(2, 7, 5, generator=gen), torch.randn(2, 7, 5, generator=gen)
    second = frozen_yardsticks(
        {"trained": trained[0], "control": other[0]},
        {"trained": trained[1], "control": other[1]},
        golds,
    )
    assert first["sets"]["trained"] == second["sets"]["trained"]
    assert first["sets"]["control"] != second["sets"]["control"]
    assert first["fit_set"] == "trained" and first["n_fit"] == 20
    assert first["in_sample"] == ["trained"] and first["absent"] == {}


def test_control_scores_are_the_retrieval_of_the_mapped_vectors():
    gen = torch.Generator().manual_seed(4)
    src, tgt = torch.randn(2, 9, 4, generator=gen), torch.randn(2, 9, 4, generator=gen)
    w = fit_procrustes(torch.randn(2, 30, 4, generator=gen), torch.randn(2, 30, 4, generator=gen))
    gold = gold_of(9, [(0, 3)])
    got = score_set(src, tgt, gold, w, csls_k=3)
    mapped = center(src.double()) @ w  # (L, B, D)
    want = retrieval(similarity(mapped, center(tgt.double())), gold)
    assert got["p_at_1_s2t_procrustes_nn"] == want["p_at_1"].tolist()
    assert got["mrr_s2t_procrustes_nn"] == pytest.approx(want["mrr"].tolist())
    back = retrieval(
        similarity(center(tgt.double()) @ w.transpose(-1, -2), center(src.double())), gold.T
    )
    assert got["p_at_1_t2s_procrustes_nn"] == back["p_at_1"].tolist()
    plain = centered_report(src, tgt, gold)
    assert got["p_at_1_s2t_centered"] == plain["p_at_1_centered"].tolist()
    # hits and Wilson bounds agree with the P@1
    for k, p, lo, hi in zip(
        got["hits_s2t_procrustes_csls"],
        got["p_at_1_s2t_procrustes_csls"],
        got["p_at_1_s2t_procrustes_csls_lo"],
        got["p_at_1_s2t_procrustes_csls_hi"],
        strict=True,
    ):
        assert k / 9 == p and lo <= p <= hi


def test_missing_sets_are_absent_and_say_why():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(1, 6, 4, generator=gen), torch.randn(1, 6, 4, generator=gen)
    only_control = frozen_yardsticks({"control": x}, {"control": y}, {"control": gold_of(6)})
    assert only_control["fit_set"] is None
    assert "no trained set" in only_control["absent"]["procrustes"]
    assert set(only_control["sets"]["control"]) == {
        f"{m}_{d}_centered{s}"
        for d in ("s2t", "t2s")
        for m, s in (
            ("p_at_1", ""),
            ("p_at_1", "_lo"),
            ("p_at_1", "_hi"),
            ("hits", ""),
            ("mrr", ""),
        )
    }
    only_trained = frozen_yardsticks({"trained": x}, {"trained": y}, {"trained": gold_of(6)})
    assert "no control set" in only_trained["absent"]["control"]
    assert "p_at_1_s2t_procrustes_csls" in only_trained["sets"]["trained"]


def test_best_takes_the_highest_p_at_1_then_mrr_then_order_then_layer():
    fig = {}
    for kind in YARDSTICKS:
        for d in ("s2t", "t2s"):
            fig[f"p_at_1_{d}_{kind}"] = [0.1, 0.2, 0.2]
            fig[f"p_at_1_{d}_{kind}_lo"] = [0.0, 0.1, 0.1]
            fig[f"p_at_1_{d}_{kind}_hi"] = [0.3, 0.4, 0.4]
            fig[f"hits_{d}_{kind}"] = [1.0, 2.0, 2.0]
            fig[f"mrr_{d}_{kind}"] = [0.2, 0.3, 0.3]
    fig["mrr_s2t_centered"] = [0.2, 0.3, 0.35]
    yard = {"sets": {"control": fig}}
    top = best(yard, "control", "s2t", [0, 5, 9])
    assert (top["yardstick"], top["layer"], top["hits"]) == ("centered", 9, 2)
    top = best(yard, "control", "t2s", [0, 5, 9])
    assert (top["yardstick"], top["layer"]) == ("procrustes_nn", 5)
    assert best(yard, "trained", "s2t", [0, 5, 9]) is None
