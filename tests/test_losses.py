"""Tests for tli.losses: each loss against a slow loop reference, hand cases, and properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tli.errors import TLIError
from tli.losses import (
    LOSSES,
    LossOutput,
    alignment,
    center_batch,
    get_loss,
    info_nce,
    triplet_hardest,
    triplet_semi_hard,
    uniformity,
    update_running_mean,
)

B, D = 8, 16
PAIR_LOSSES = sorted(LOSSES)

# --------------------------------------------------------------------------------------------
# slow references: explicit Python loops over anchors and candidates, in float64


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double(), v.double()
    return float(u @ v / (u.norm() * v.norm()))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _is_gold(gold: torch.Tensor | None, i: int, j: int) -> bool:
    return i == j or (gold is not None and bool(gold[i, j]))


def _negatives(anchor, positive, gold, i) -> list[float]:
    return [_cos(anchor[i], positive[j]) for j in range(len(anchor)) if not _is_gold(gold, i, j)]


def ref_triplet(anchor, positive, gold, margin, rule):
    """(loss, pos_sim, neg_sim, picked_branches) with the negative chosen by ``rule``."""
    terms, pos_all, negs, branches = [], [], [], []
    for i in range(len(anchor)):
        s_pos = _cos(anchor[i], positive[i])
        pos_all.append(s_pos)
        cands = _negatives(anchor, positive, gold, i)
        if not cands:
            continue
        if rule == "hardest":
            s_neg = max(cands)
            branches.append("hardest")
        else:  # semi-hard, TF-Addons semantics in similarity terms
            below = [c for c in cands if c < s_pos]
            s_neg = max(below) if below else min(cands)
            branches.append("outside" if below else "easiest")
        negs.append(s_neg)
        terms.append(max(0.0, margin + s_neg - s_pos))
    return _mean(terms), _mean(pos_all), _mean(negs), branches


def ref_info_nce(anchor, positive, gold, temperature, symmetric):
    def direction(src, tgt, is_gold):
        terms = []
        for i in range(len(src)):
            others = [j for j in range(len(src)) if not is_gold(i, j)]
            if not others:
                continue
            logits = [_cos(src[i], tgt[j]) / temperature for j in [i, *others]]
            top = max(logits)
            lse = top + math.log(sum(math.exp(x - top) for x in logits))
            terms.append(lse - logits[0])
        return _mean(terms)

    loss = direction(anchor, positive, lambda i, j: _is_gold(gold, i, j))
    if symmetric:
        back = direction(positive, anchor, lambda i, j: _is_gold(gold, j, i))
        loss = (loss + back) / 2
    pos = _mean([_cos(anchor[i], positive[i]) for i in range(len(anchor))])
    hardest = [max(c) for i in range(len(anchor)) if (c := _negatives(anchor, positive, gold, i))]
    return loss, pos, _mean(hardest)


# --------------------------------------------------------------------------------------------
# data


def make_pairs(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(B, D, generator=g, dtype=dtype)
    positive = 0.7 * anchor + torch.randn(B, D, generator=g, dtype=dtype)
    positive[3] = -anchor[
        3
    ]  # every negative is more similar than this positive: semi-hard fallback
    anchor = anchor * torch.rand(B, 1, generator=g, dtype=dtype).add(0.5)  # not normalised
    return anchor, positive


def make_gold(case: str | None):
    if case is None:
        return None
    gold = torch.zeros(B, B, dtype=torch.bool)
    gold[0, 2] = gold[2, 0] = True  # two words that gloss each other
    gold[5, 1] = True  # one listed alternative
    gold[4, 4] = False  # the diagonal counts as gold whatever the caller passes
    if case == "empty_row":
        gold[6] = True  # anchor 6: every candidate is gold, no negative
    return gold


GOLD_CASES = [None, "alternatives", "empty_row"]


def _check(out: LossOutput, expected_loss, expected_pos, expected_neg, tol=1e-10):
    assert isinstance(out, LossOutput)
    assert out.loss.dim() == 0 and out.pos_sim.dim() == 0 and out.neg_sim.dim() == 0
    assert out.loss.item() == pytest.approx(expected_loss, abs=tol)
    assert out.pos_sim.item() == pytest.approx(expected_pos, abs=tol)
    assert out.neg_sim.item() == pytest.approx(expected_neg, abs=tol)
    assert not out.pos_sim.requires_grad and not out.neg_sim.requires_grad


# --------------------------------------------------------------------------------------------
# against the references


@pytest.mark.parametrize("gold_case", GOLD_CASES)
@pytest.mark.parametrize("margin", [0.4, 1.5])
def test_triplet_hardest_matches_reference(gold_case, margin):
    anchor, positive = make_pairs()
    gold = make_gold(gold_case)
    loss, pos, neg, _ = ref_triplet(anchor, positive, gold, margin, "hardest")
    _check(triplet_hardest(anchor, positive, gold, margin=margin), loss, pos, neg)


@pytest.mark.parametrize("gold_case", GOLD_CASES)
@pytest.mark.parametrize("margin", [0.4, 1.5])
def test_triplet_semi_hard_matches_reference(gold_case, margin):
    anchor, positive = make_pairs()
    gold = make_gold(gold_case)
    loss, pos, neg, branches = ref_triplet(anchor, positive, gold, margin, "semi_hard")
    assert {"outside", "easiest"} <= set(branches)  # the data exercises both rules
    _check(triplet_semi_hard(anchor, positive, gold, margin=margin), loss, pos, neg)


@pytest.mark.parametrize("gold_case", GOLD_CASES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_info_nce_matches_reference(gold_case, symmetric, temperature):
    anchor, positive = make_pairs()
    gold = make_gold(gold_case)
    expected = ref_info_nce(anchor, positive, gold, temperature, symmetric)
    out = info_nce(anchor, positive, gold, temperature=temperature, symmetric=symmetric)
    _check(out, *expected, tol=1e-8)


def test_info_nce_equals_hand_built_cross_entropy():
    anchor, positive = make_pairs(seed=1)
    t = 0.1
    logits = F.normalize(anchor, dim=1) @ F.normalize(positive, dim=1).T / t  # (B, B)
    target = torch.arange(B)
    forward = F.cross_entropy(logits, target)
    backward = F.cross_entropy(logits.T, target)
    one_way = info_nce(anchor, positive, temperature=t, symmetric=False).loss
    both = info_nce(anchor, positive, temperature=t, symmetric=True).loss
    torch.testing.assert_close(one_way, forward)
    torch.testing.assert_close(both, (forward + backward) / 2)
    assert not torch.allclose(forward, backward)  # so the averaging is really tested


def test_info_nce_gold_is_removed_from_softmax():
    anchor, positive = make_pairs(seed=2)
    gold = torch.zeros(B, B, dtype=torch.bool)
    gold[0, 5] = True
    t = 0.2
    logits = F.normalize(anchor, dim=1) @ F.normalize(positive, dim=1).T / t  # (B, B)
    keep = [j for j in range(B) if j != 5]
    row0 = F.cross_entropy(logits[0, keep][None], torch.tensor([0]))
    rest = F.cross_entropy(logits[1:], torch.arange(1, B), reduction="sum")
    out = info_nce(anchor, positive, gold, temperature=t, symmetric=False)
    torch.testing.assert_close(out.loss, (row0 + rest) / B)


def test_info_nce_identical_pairs_low_temperature_is_near_zero():
    anchor, _ = make_pairs(seed=3)
    out = info_nce(anchor, anchor.clone(), temperature=0.01)
    assert out.loss.item() < 1e-6
    assert out.pos_sim.item() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# hand-computed triplet case


def _hand_case():
    anchor = torch.eye(3)  # a0 = e1, a1 = e2, a2 = e3
    positive = torch.tensor([[2.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8]])
    # cos(a_i, p_j):   p0   p1   p2
    #           a0  [ 1.0  0.8  0.0 ]
    #           a1  [ 0.0  0.6  0.6 ]
    #           a2  [ 0.0  0.0  0.8 ]
    return anchor, positive


def test_triplet_hardest_by_hand():
    anchor, positive = _hand_case()
    out = triplet_hardest(anchor, positive, margin=0.4)
    # a0: 0.4 + 0.8 - 1.0 = 0.2; a1: 0.4 + 0.6 - 0.6 = 0.4; a2: 0.4 + 0.0 - 0.8 < 0 -> 0
    assert out.loss.item() == pytest.approx((0.2 + 0.4 + 0.0) / 3, abs=1e-6)
    assert out.pos_sim.item() == pytest.approx((1.0 + 0.6 + 0.8) / 3, abs=1e-6)
    assert out.neg_sim.item() == pytest.approx((0.8 + 0.6 + 0.0) / 3, abs=1e-6)


def test_triplet_hardest_gold_alternative_is_never_the_negative():
    anchor, positive = _hand_case()
    gold = torch.zeros(3, 3, dtype=torch.bool)
    gold[0, 1] = True  # p1 (cos 0.8) would be a0's hardest negative; the next one is p2 (cos 0.0)
    out = triplet_hardest(anchor, positive, gold, margin=0.4)
    # a0: 0.4 + 0.0 - 1.0 < 0 -> 0; a1 and a2 unchanged
    assert out.loss.item() == pytest.approx((0.0 + 0.4 + 0.0) / 3, abs=1e-6)
    assert out.neg_sim.item() == pytest.approx((0.0 + 0.6 + 0.0) / 3, abs=1e-6)


def test_triplet_hardest_gold_on_random_data_uses_next_candidate():
    anchor, positive = make_pairs(seed=4)
    sims = F.normalize(anchor, dim=1) @ F.normalize(positive, dim=1).T  # (B, B)
    order = sims[0].clone()
    order[0] = -math.inf
    first, second = order.topk(2).indices.tolist()
    gold = torch.zeros(B, B, dtype=torch.bool)
    gold[0, first] = True
    plain = triplet_hardest(anchor, positive, margin=2.0)
    masked = triplet_hardest(anchor, positive, gold, margin=2.0)
    # margin 2 keeps every term positive, so the change is exactly the swap of row 0's negative
    shift = (sims[0, second] - sims[0, first]).item()
    assert masked.loss.item() == pytest.approx(plain.loss.item() + shift / B, abs=1e-10)
    assert masked.neg_sim.item() == pytest.approx(plain.neg_sim.item() + shift / B, abs=1e-10)


def test_triplet_semi_hard_gold_alternative_is_never_the_negative():
    anchor = torch.eye(3)
    # cos(a0, .): p0 0.9 (positive), p1 0.7 (the semi-hard pick), p2 ~0.30 (next below p0)
    positive = torch.tensor(
        [[0.9, math.sqrt(1 - 0.81), 0.0], [0.7, math.sqrt(1 - 0.49), 0.0], [0.3, 0.0, 0.95]]
    )
    cos02 = _cos(anchor[0], positive[2])
    gold = torch.zeros(3, 3, dtype=torch.bool)
    gold[0, 1] = True
    plain = triplet_semi_hard(anchor, positive, margin=0.4)
    masked = triplet_semi_hard(anchor, positive, gold, margin=0.4)
    _check(plain, *ref_triplet(anchor, positive, None, 0.4, "semi_hard")[:3], tol=1e-6)
    _check(masked, *ref_triplet(anchor, positive, gold, 0.4, "semi_hard")[:3], tol=1e-6)
    # row 0 moves from p1 (term 0.4 + 0.7 - 0.9 = 0.2) to p2 (term 0.4 + 0.30 - 0.9 < 0 -> 0)
    assert masked.neg_sim.item() == pytest.approx(
        plain.neg_sim.item() - (0.7 - cos02) / 3, abs=1e-6
    )
    assert masked.loss.item() == pytest.approx(plain.loss.item() - 0.2 / 3, abs=1e-6)


def test_semi_hard_equals_hardest_when_all_negatives_are_farther_than_positive():
    anchor, _ = make_pairs(seed=5)
    positive = anchor.clone()  # cos(a, p) = 1 > every negative: semi-hard picks the hardest
    a = triplet_semi_hard(anchor, positive, margin=1.5)
    b = triplet_hardest(anchor, positive, margin=1.5)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.neg_sim, b.neg_sim)


# --------------------------------------------------------------------------------------------
# gradients, dtypes, invariances


@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("gold_case", GOLD_CASES)
def test_gradients_flow(name, gold_case):
    anchor, positive = make_pairs(seed=6, dtype=torch.float32)
    anchor.requires_grad_(True)
    positive.requires_grad_(True)
    kwargs = {"temperature": 0.1} if name == "info_nce" else {"margin": 1.0}
    out = get_loss(name)(anchor, positive, make_gold(gold_case), **kwargs)
    assert out.loss.requires_grad and out.loss.item() > 0
    out.loss.backward()
    for grad in (anchor.grad, positive.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_scale_invariant_and_bf16_computed_in_float32(name):
    anchor, positive = make_pairs(seed=7, dtype=torch.float32)
    fn = get_loss(name)
    base = fn(anchor, positive)
    scaled = fn(anchor * 3.0, positive * 0.25)
    torch.testing.assert_close(base.loss, scaled.loss)
    low = fn(anchor.bfloat16(), positive.bfloat16())
    assert low.loss.dtype == torch.float32
    ref = fn(anchor.bfloat16().float(), positive.bfloat16().float())
    torch.testing.assert_close(low.loss, ref.loss)


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_batch_of_one_raises(name):
    x = torch.randn(1, D)
    with pytest.raises(TLIError, match="needs a batch of at least 2 pairs for in-batch negatives"):
        get_loss(name)(x, x)
    with pytest.raises(TLIError, match="got 1"):
        get_loss(name)(x, x)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_all_gold_raises(name):
    anchor, positive = make_pairs()
    with pytest.raises(TLIError, match="no negatives"):
        get_loss(name)(anchor, positive, torch.ones(B, B, dtype=torch.bool))


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_bad_shapes_and_gold_raise_value_error(name):
    anchor, positive = make_pairs()
    fn = get_loss(name)
    with pytest.raises(ValueError, match="differ in shape"):
        fn(anchor, positive[:, :4])
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        fn(anchor[0], positive[0])
    with pytest.raises(ValueError, match="bool"):
        fn(anchor, positive, torch.zeros(B, B))
    with pytest.raises(ValueError, match=r"\(B, B\)"):
        fn(anchor, positive, torch.zeros(B, B + 1, dtype=torch.bool))


def test_info_nce_rejects_non_positive_temperature():
    anchor, positive = make_pairs()
    with pytest.raises(ValueError, match="temperature"):
        info_nce(anchor, positive, temperature=0.0)


def test_get_loss_known_and_unknown():
    assert get_loss("triplet_hardest") is triplet_hardest
    assert get_loss("triplet_semi_hard") is triplet_semi_hard
    assert get_loss("info_nce") is info_nce
    with pytest.raises(TLIError) as info:
        get_loss("triplet_easy")
    message = str(info.value)
    assert "'triplet_easy'" in message
    for name in LOSSES:
        assert name in message


# --------------------------------------------------------------------------------------------
# uniformity and alignment


def ref_uniformity(x, t):
    xn = [row / row.norm() for row in x.double()]
    terms = [
        math.exp(-t * float((xn[i] - xn[j]).pow(2).sum()))
        for i in range(len(xn))
        for j in range(len(xn))
        if i != j
    ]
    return math.log(_mean(terms))


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity_matches_reference(t):
    x, _ = make_pairs(seed=8)
    assert uniformity(x, t=t).item() == pytest.approx(ref_uniformity(x, t), abs=1e-10)
    # Wang and Isola's own one-liner on normalised vectors
    wang_isola = torch.pdist(F.normalize(x, dim=1), p=2).pow(2).mul(-t).exp().mean().log()
    assert uniformity(x, t=t).item() == pytest.approx(wang_isola.item(), abs=1e-10)


def test_uniformity_lower_when_spread_and_finite_grad_when_collapsed():
    spread = torch.eye(B, D)  # orthonormal: all pairwise squared distances 2
    collapsed = torch.ones(B, D) + 1e-3 * torch.randn(
        B, D, generator=torch.Generator().manual_seed(9)
    )
    assert uniformity(spread).item() == pytest.approx(-4.0, abs=1e-6)  # log exp(-2 * 2)
    assert uniformity(spread) < uniformity(collapsed)
    assert uniformity(collapsed).item() == pytest.approx(0.0, abs=1e-3)
    exact = torch.ones(B, D, requires_grad=True)
    uniformity(exact).backward()
    assert torch.isfinite(exact.grad).all()
    with pytest.raises(TLIError, match="at least 2 vectors, got 1"):
        uniformity(torch.randn(1, D))


@pytest.mark.parametrize("alpha", [2, 1, 3.5])
def test_alignment_matches_reference(alpha):
    anchor, positive = make_pairs(seed=10)
    expected = _mean(
        [
            float((a / a.norm() - p / p.norm()).norm()) ** alpha
            for a, p in zip(anchor, positive, strict=True)
        ]
    )
    assert alignment(anchor, positive, alpha=alpha).item() == pytest.approx(expected, abs=1e-10)


def test_alignment_alpha2_is_two_minus_two_cos_and_zero_for_identical():
    anchor, positive = make_pairs(seed=11)
    mean_cos = F.cosine_similarity(anchor, positive, dim=1).mean()
    torch.testing.assert_close(alignment(anchor, positive), 2 - 2 * mean_cos)
    same = anchor.clone().requires_grad_(True)
    value = alignment(same, anchor)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(same.grad).all()


# --------------------------------------------------------------------------------------------
# centring


def test_center_batch():
    x, _ = make_pairs(seed=12)
    centred = center_batch(x)
    assert centred.shape == (B, D)
    torch.testing.assert_close(centred.mean(dim=0), torch.zeros(D, dtype=x.dtype))
    torch.testing.assert_close(centred, x - x.mean(dim=0))
    with pytest.raises(TLIError, match="at least 2 vectors, got 1"):
        center_batch(x[:1])


def test_centring_then_loss_removes_a_shared_offset():
    anchor, positive = make_pairs(seed=13)
    offset = 50 * torch.randn(D, dtype=anchor.dtype)  # a common direction, as in anisotropy
    plain = triplet_hardest(center_batch(anchor), center_batch(positive))
    shifted = triplet_hardest(center_batch(anchor + offset), center_batch(positive + offset))
    torch.testing.assert_close(plain.loss, shifted.loss)


def test_update_running_mean():
    x, _ = make_pairs(seed=14)
    x.requires_grad_(True)
    first = update_running_mean(None, x, momentum=0.1)
    torch.testing.assert_close(first, x.detach().mean(dim=0))
    assert not first.requires_grad
    y = torch.randn(B, D, dtype=x.dtype)
    second = update_running_mean(first, y, momentum=0.25)
    torch.testing.assert_close(second, 0.75 * first + 0.25 * y.mean(dim=0))
    assert second.shape == (D,)
    with pytest.raises(ValueError, match="momentum"):
        update_running_mean(first, y, momentum=0.0)
    with pytest.raises(ValueError, match="hidden size"):
        update_running_mean(first[:3], y)


def test_state_drift_is_relative_and_ignores_padding():
    from tli.losses import state_drift

    torch.manual_seed(0)
    ref = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(state_drift(ref.clone(), ref, mask)) == 0.0
    assert float(state_drift(2 * ref, ref, mask)) == pytest.approx(1.0)  # moved by its own size
    noisy = ref.clone()
    noisy[0, 3:] = 1e6  # padding holds garbage
    assert float(state_drift(noisy, ref, mask)) == 0.0
    # against a slow loop over real tokens
    moved = ref + 0.1 * torch.randn_like(ref)
    num = sum(float(((moved[b, t] - ref[b, t]) ** 2).sum()) for b in range(2) for t in range(5)
              if mask[b, t])  # fmt: skip
    den = sum(float((ref[b, t] ** 2).sum()) for b in range(2) for t in range(5) if mask[b, t])
    assert float(state_drift(moved, ref, mask)) == pytest.approx(num / den, rel=1e-5)
    grad = torch.zeros_like(ref, requires_grad=True)
    state_drift(ref + grad, ref + 1, mask).backward()
    assert grad.grad[0, 3:].abs().sum() == 0 and grad.grad[1].abs().sum() > 0
    with pytest.raises(ValueError, match="no real token"):
        state_drift(ref, ref, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"must be \(B, T, D\)"):
        state_drift(ref[0], ref[0], mask)


def test_lexicon_info_nce_matches_a_loop_and_masks_other_glosses():
    from tli.losses import lexicon_info_nce

    torch.manual_seed(1)
    anchor, bank = torch.randn(3, 6), torch.randn(5, 6)
    target = torch.tensor([0, 2, 4])
    gold = torch.zeros(3, 5, dtype=torch.bool)
    gold[0, 1] = True  # bank row 1 is another gloss of anchor 0: never a negative
    out = lexicon_info_nce(anchor, bank, target, gold, temperature=0.1, center=True)
    a = anchor - anchor.mean(0)
    k = bank - bank.mean(0)
    total = 0.0
    for i in range(3):
        cos = [float(F.cosine_similarity(a[i], k[j], dim=0)) for j in range(5)]
        keep = [j for j in range(5) if not (gold[i, j] and j != target[i])]
        logz = math.log(sum(math.exp(cos[j] / 0.1) for j in keep))
        total += logz - cos[int(target[i])] / 0.1
    assert float(out.loss) == pytest.approx(total / 3, rel=1e-5)
    # raising the masked gloss's score changes nothing for the anchor it belongs to
    moved = bank.clone()
    moved[1] = anchor[0] * 5
    one = (anchor[:1], target[:1], gold[:1])
    again = lexicon_info_nce(one[0], moved, one[1], one[2], temperature=0.1, center=False)
    plain = lexicon_info_nce(one[0], bank, one[1], one[2], temperature=0.1, center=False)
    assert float(again.loss) == pytest.approx(float(plain.loss), rel=1e-6)
    grad = anchor.clone().requires_grad_(True)
    lexicon_info_nce(grad, bank.requires_grad_(True), target, gold).loss.backward()
    assert grad.grad.abs().sum() > 0 and bank.grad is None  # the bank is frozen
    with pytest.raises(ValueError, match="target must be"):
        lexicon_info_nce(anchor, bank, target[:2], gold)
    with pytest.raises(TLIError, match="no negative"):
        everything = torch.ones(1, 2, dtype=torch.bool)
        lexicon_info_nce(anchor[:1], bank[:2], torch.tensor([0]), everything)
