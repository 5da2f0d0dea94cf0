"""Contrastive losses on pooled word vectors: pure tensor functions, no model, no device logic.

Every pair loss takes ``anchor`` (B, D) source-word vectors and ``positive`` (B, D) target-word
vectors, where row i of ``positive`` is the translation of row i of ``anchor``. The other rows of
``positive`` are the in-batch candidates for negatives. An optional ``gold`` (B, B) bool mask marks
``gold[i, j] = True`` when positive j is also a listed correct translation of anchor i (several
glosses of one word, duplicate glosses); the diagonal is always treated as True. A gold candidate is
never used as a negative (docs/design.md, fact 6).

Inputs need not be normalised: every function L2-normalises internally, so "similarity" means
cosine. Computation runs in at least float32 whatever the input dtype, because bf16 cosines near 1
(the anisotropic regime of docs/design.md, fact 1) are too coarse to rank negatives.

An anchor whose candidates are all gold has no negative: it adds no term and is left out of the
mean. A batch where no anchor has a negative, or a batch of fewer than 2 pairs, raises
:class:`~tli.errors.TLIError` rather than returning a silent zero loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tli.errors import TLIError

__all__ = [
    "LOSSES",
    "LossOutput",
    "alignment",
    "center_batch",
    "contrastive_objective",
    "get_loss",
    "info_nce",
    "triplet_hardest",
    "triplet_semi_hard",
    "uniformity",
    "update_running_mean",
]


class LossOutput(NamedTuple):
    """What a pair loss returns: the value to optimise and two similarities to log.

    Attributes:
        loss: Scalar tensor with grad, the value to call ``backward()`` on.
        pos_sim: Scalar, detached: mean cosine of each anchor to its own positive, over all B rows.
        neg_sim: Scalar, detached: mean cosine of each anchor to the negative the loss used, over
            the rows that have a negative. For InfoNCE (which uses every negative) this is the mean
            cosine of the hardest negative, for logging.
    """

    loss: Tensor
    pos_sim: Tensor
    neg_sim: Tensor


# --------------------------------------------------------------------------------------------
# shared checks and building blocks


def _working_dtype(x: Tensor) -> torch.dtype:
    """At least float32; float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_pair(name: str, anchor: Tensor, positive: Tensor) -> int:
    """Validate anchor/positive shapes and return B."""
    if anchor.dim() != 2 or positive.dim() != 2:
        raise ValueError(
            f"{name}: anchor and positive must be (B, D), got {tuple(anchor.shape)} "
            f"and {tuple(positive.shape)}"
        )
    if anchor.shape != positive.shape:
        raise ValueError(
            f"{name}: anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} "
            "differ in shape"
        )
    batch = anchor.shape[0]
    if batch < 2:
        raise TLIError(
            f"{name} needs a batch of at least 2 pairs for in-batch negatives, got {batch}"
        )
    return batch


def _gold_mask(name: str, gold: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """The full (B, B) gold mask, diagonal set to True."""
    eye = torch.eye(batch, dtype=torch.bool, device=device)  # (B, B)
    if gold is None:
        return eye
    if gold.dtype != torch.bool:
        raise ValueError(f"{name}: gold must be a bool tensor, got {gold.dtype}")
    if tuple(gold.shape) != (batch, batch):
        raise ValueError(
            f"{name}: gold must be (B, B) = ({batch}, {batch}), got {tuple(gold.shape)}"
        )
    return gold.to(device) | eye  # (B, B)


def _similarities(anchor: Tensor, positive: Tensor) -> Tensor:
    """Cosine similarity matrix: entry [i, j] = cos(anchor i, positive j)."""
    dtype = _working_dtype(anchor)
    a = F.normalize(anchor.to(dtype), dim=-1)  # (B, D)
    p = F.normalize(positive.to(dtype), dim=-1)  # (B, D)
    return a @ p.T  # (B, B)


def _rows_with_negatives(name: str, gold_full: Tensor) -> Tensor:
    """(B,) bool: anchors with at least one non-gold candidate; raise if there is none at all."""
    valid = (~gold_full).any(dim=1)  # (B,)
    if not bool(valid.any()):
        raise TLIError(
            f"{name}: every in-batch candidate is a listed translation of its anchor, so the batch "
            "has no negatives; use larger or more varied batches"
        )
    return valid


# --------------------------------------------------------------------------------------------
# triplet losses


def triplet_hardest(
    anchor: Tensor, positive: Tensor, gold: Tensor | None = None, margin: float = 0.4
) -> LossOutput:
    """Triplet margin loss on cosine with the hardest in-batch negative: the TLI paper's loss.

    Optimises, averaged over anchors i::

        max(0, margin + cos(a_i, p_n) - cos(a_i, p_i))

    where n is the hardest negative: among the other positives of the batch that are not gold for
    anchor i, the one with the highest cosine to a_i. Also called batch-hard triplet loss
    (Hermans, Beyer and Leibe 2017, "In Defense of the Triplet Loss for Person
    Re-Identification"); the TLI paper's objective (Ngugi 2025, sec. 3.4, Eq. 1, margin 0.4) and
    sentence-transformers' ``BatchHardTripletLoss`` in cosine form.

    Args:
        anchor: (B, D) source-word vectors; need not be normalised.
        positive: (B, D) target-word vectors, row i the translation of anchor row i.
        gold: Optional (B, B) bool; ``gold[i, j]`` True when positive j is also a correct
            translation of anchor i. Gold candidates are never negatives; the diagonal is always
            gold.
        margin: How much more similar (in cosine, range [-1, 1]) the positive must be than the
            hardest negative before the anchor stops contributing. Paper: 0.4.

    Returns:
        LossOutput: ``neg_sim`` is the mean cosine of the hardest negatives used. Anchors without
        any non-gold candidate add no term and are excluded from the mean.

    Raises:
        TLIError: B < 2, or no anchor in the batch has a non-gold candidate.
        ValueError: Shapes or gold dtype do not match the contract.
    """
    name = "triplet_hardest"
    batch = _check_pair(name, anchor, positive)
    sims = _similarities(anchor, positive)  # (B, B)
    gold_full = _gold_mask(name, gold, batch, sims.device)  # (B, B)
    valid = _rows_with_negatives(name, gold_full)  # (B,)

    pos = sims.diagonal()  # (B,)
    hardest = sims.masked_fill(gold_full, float("-inf")).amax(dim=1)  # (B,)
    pos_v, neg_v = pos[valid], hardest[valid]  # (B',) rows with a negative
    loss = F.relu(margin + neg_v - pos_v).mean()
    return LossOutput(loss, pos.detach().mean(), neg_v.detach().mean())


def triplet_semi_hard(
    anchor: Tensor, positive: Tensor, gold: Tensor | None = None, margin: float = 0.4
) -> LossOutput:
    """Triplet margin loss on cosine with a semi-hard in-batch negative per anchor.

    Optimises, averaged over anchors i::

        max(0, margin + cos(a_i, p_n) - cos(a_i, p_i))

    with n chosen as in FaceNet's semi-hard mining (Schroff, Kalenichenko and Philbin 2015,
    "FaceNet: A Unified Embedding for Face Recognition and Clustering"), following the semantics
    of TensorFlow Addons' ``triplet_semihard_loss`` translated from distance to similarity:

    * if some non-gold candidate is less similar to a_i than the positive
      (``cos(a_i, p_n) < cos(a_i, p_i)``), n is the most similar of those (the closest negative
      that is farther away than the positive);
    * otherwise (every negative is at least as similar as the positive), n is the least similar
      negative (the easiest one), so that the anchor still gets a gradient without the collapse
      risk of always pulling on the hardest one.

    FaceNet's band ``cos(a, p) - margin < cos(a, n) < cos(a, p)`` needs no separate test: when a
    negative lies inside the band the rule above picks one, and when none does the chosen negative
    gives zero loss anyway. Also called semi-hard triplet loss; sentence-transformers
    ``BatchSemiHardTripletLoss`` in cosine form.

    Args:
        anchor: (B, D) source-word vectors; need not be normalised.
        positive: (B, D) target-word vectors, row i the translation of anchor row i.
        gold: Optional (B, B) bool; ``gold[i, j]`` True when positive j is also a correct
            translation of anchor i. Gold candidates are never negatives; the diagonal is always
            gold.
        margin: How much more similar (in cosine) the positive must be than the chosen negative
            before the anchor stops contributing. Default 0.4, as the paper's triplet loss.

    Returns:
        LossOutput: ``neg_sim`` is the mean cosine of the negatives chosen. Anchors without any
        non-gold candidate add no term and are excluded from the mean.

    Raises:
        TLIError: B < 2, or no anchor in the batch has a non-gold candidate.
        ValueError: Shapes or gold dtype do not match the contract.
    """
    name = "triplet_semi_hard"
    batch = _check_pair(name, anchor, positive)
    sims = _similarities(anchor, positive)  # (B, B)
    gold_full = _gold_mask(name, gold, batch, sims.device)  # (B, B)
    valid = _rows_with_negatives(name, gold_full)  # (B,)

    pos = sims.diagonal()  # (B,)
    negative = ~gold_full  # (B, B)
    outside = negative & (sims < pos[:, None])  # (B, B) negatives less similar than the positive
    has_outside = outside.any(dim=1)  # (B,)
    closest_outside = sims.masked_fill(~outside, float("-inf")).amax(dim=1)  # (B,)
    easiest = sims.masked_fill(~negative, float("inf")).amin(dim=1)  # (B,)
    chosen = torch.where(has_outside, closest_outside, easiest)  # (B,)

    pos_v, neg_v = pos[valid], chosen[valid]  # (B',) rows with a negative
    loss = F.relu(margin + neg_v - pos_v).mean()
    return LossOutput(loss, pos.detach().mean(), neg_v.detach().mean())


# --------------------------------------------------------------------------------------------
# InfoNCE


def info_nce(
    anchor: Tensor,
    positive: Tensor,
    gold: Tensor | None = None,
    temperature: float = 0.05,
    symmetric: bool = True,
) -> LossOutput:
    """InfoNCE: cross-entropy of each anchor's own positive against all in-batch negatives.

    Optimises, averaged over anchors i::

        -log( exp(cos(a_i, p_i) / t) / sum_j exp(cos(a_i, p_j) / t) )

    where j runs over p_i and every non-gold candidate. Gold off-diagonal candidates (other correct
    translations of a_i) are masked out of the softmax: they are neither the target nor a
    negative. With ``symmetric`` the loss is the mean of this source->target direction and the
    target->source direction (each positive p_j against all anchors, gold mask transposed), as in
    CLIP. Also called NT-Xent, multiple-negatives ranking loss, in-batch softmax loss
    (van den Oord, Li and Vinyals 2018, "Representation Learning with Contrastive Predictive
    Coding"; Chen et al. 2020, SimCLR; Henderson et al. 2017, "Efficient Natural Language Response
    Suggestion for Smart Reply"; sentence-transformers ``MultipleNegativesRankingLoss`` and its
    symmetric variant).

    Args:
        anchor: (B, D) source-word vectors; need not be normalised.
        positive: (B, D) target-word vectors, row i the translation of anchor row i.
        gold: Optional (B, B) bool; ``gold[i, j]`` True when positive j is also a correct
            translation of anchor i. The diagonal is always gold (and is the target).
        temperature: Divides the cosines before the softmax; smaller is sharper and weighs the
            hardest negatives more. 0.05 equals sentence-transformers' default scale of 20.
        symmetric: Average the source->target and target->source directions.

    Returns:
        LossOutput: ``neg_sim`` is the mean cosine of each anchor's hardest (most similar) non-gold
        candidate, source->target, for logging. Rows without any non-gold candidate add no term
        (their cross-entropy would be a trivial 0) and are excluded from each direction's mean.

    Raises:
        TLIError: B < 2, or no anchor in the batch has a non-gold candidate.
        ValueError: Shapes, gold dtype or temperature do not match the contract.
    """
    name = "info_nce"
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    batch = _check_pair(name, anchor, positive)
    sims = _similarities(anchor, positive)  # (B, B)
    gold_full = _gold_mask(name, gold, batch, sims.device)  # (B, B)
    valid = _rows_with_negatives(name, gold_full)  # (B,)

    eye = torch.eye(batch, dtype=torch.bool, device=sims.device)  # (B, B)
    other_gold = gold_full & ~eye  # (B, B) masked out of the softmax
    target = torch.arange(batch, device=sims.device)  # (B,)

    logits = (sims / temperature).masked_fill(other_gold, float("-inf"))  # (B, B)
    loss = F.cross_entropy(logits, target, reduction="none")[valid].mean()
    if symmetric:
        # Same count of non-gold entries both ways, so this direction has a valid row too.
        valid_t = (~gold_full).any(dim=0)  # (B,) positives with a non-gold anchor
        logits_t = (sims.T / temperature).masked_fill(other_gold.T, float("-inf"))  # (B, B)
        loss_t = F.cross_entropy(logits_t, target, reduction="none")[valid_t].mean()
        loss = (loss + loss_t) / 2

    hardest = sims.masked_fill(gold_full, float("-inf")).amax(dim=1)  # (B,)
    pos = sims.diagonal()  # (B,)
    return LossOutput(loss, pos.detach().mean(), hardest[valid].detach().mean())


def lexicon_info_nce(
    anchor: Tensor,
    bank: Tensor,
    target: Tensor,
    gold: Tensor,
    temperature: float = 0.05,
    center: bool = True,
) -> LossOutput:
    """InfoNCE of each anchor against a fixed bank of every target of the lexicon.

    Optimises ``-log softmax_j(cos(a_i, b_j) / temperature)[target_i]`` over all C bank rows j
    that are not another correct translation of anchor i (those are masked, never negatives):
    the cross-entropy of retrieving a source word's translation among the whole target list,
    which is what source->target P@1 measures. The bank holds the frozen model's target vectors
    (no gradient), so every target of the lexicon is a negative at every step (the "memory
    bank" of Wu et al. 2018 and He et al. 2020, MoCo, here fixed) at the cost of one pass per
    source word. With ``center`` the anchors are centred by their batch mean and the bank by its
    own mean before the cosine, as centred retrieval (:func:`tli.metrics.centered_similarity`)
    does.

    Args:
        anchor: (B, D) source-word vectors (with grad).
        bank: (C, D) target vectors of the frozen model, C >= 2.
        target: (B,) int64 index of each anchor's own translation in the bank.
        gold: (B, C) bool, True where bank row j is a correct translation of anchor i (the
            ``target`` column is taken as gold whatever it holds).
        temperature: Softmax temperature; lower sharpens the distribution.
        center: Centre both sides before the cosine.

    Returns:
        LossOutput: ``pos_sim`` the mean cosine to the own target, ``neg_sim`` the mean cosine
        of each anchor's hardest non-gold bank row.

    Raises:
        ValueError: Shapes disagree.
        TLIError: No bank row is a negative for some anchor.
    """
    if anchor.dim() != 2 or bank.dim() != 2 or anchor.shape[1] != bank.shape[1]:
        raise ValueError(
            f"lexicon_info_nce: anchor (B, D) and bank (C, D) needed, got {tuple(anchor.shape)} "
            f"and {tuple(bank.shape)}"
        )
    b, c = anchor.shape[0], bank.shape[0]
    if target.shape != (b,) or gold.shape != (b, c):
        raise ValueError(
            f"lexicon_info_nce: target must be ({b},) and gold ({b}, {c}), got "
            f"{tuple(target.shape)} and {tuple(gold.shape)}"
        )
    dtype = _working_dtype(anchor)
    a = anchor.to(dtype)  # (B, D)
    k = bank.detach().to(dtype)  # (C, D)
    if center:
        a = a - a.mean(0, keepdim=True)
        k = k - k.mean(0, keepdim=True)
    sims = F.normalize(a, dim=-1) @ F.normalize(k, dim=-1).T  # (B, C)
    own = F.one_hot(target, c).bool()  # (B, C)
    others = gold.to(sims.device).bool() & ~own  # (B, C) correct but not the target: masked
    if bool((others | own).all(dim=1).any()):
        raise TLIError("lexicon_info_nce: an anchor has no negative in the bank")
    logits = (sims / temperature).masked_fill(others, float("-inf"))  # (B, C)
    loss = F.cross_entropy(logits, target)
    pos = sims.gather(1, target[:, None]).squeeze(1)  # (B,)
    hardest = sims.masked_fill(others | own, float("-inf")).amax(dim=1)  # (B,)
    return LossOutput(loss, pos.detach().mean(), hardest.detach().mean())


# --------------------------------------------------------------------------------------------
# alignment and uniformity (Wang and Isola 2020)


def uniformity(x: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity loss: how evenly the normalised vectors spread over the hypersphere.

    Optimises ``log mean_{i != j} exp(-t * ||x_i - x_j||^2)`` over normalised rows of ``x``
    (Wang and Isola 2020, "Understanding Contrastive Representation Learning through Alignment
    and Uniformity on the Hypersphere"). Lower is more uniform; it reaches its maximum, 0, when all
    vectors coincide (collapse), which is the failure mode of docs/design.md, fact 2. Squared
    distances are taken as ``2 - 2 cos`` so collapsed points still have finite gradients.

    Args:
        x: (B, D) vectors; need not be normalised.
        t: Kernel scale of the Gaussian potential; Wang and Isola use 2.

    Returns:
        Scalar tensor with grad.

    Raises:
        TLIError: B < 2 (no pairs).
        ValueError: ``x`` is not 2-D.
    """
    if x.dim() != 2:
        raise ValueError(f"uniformity: x must be (B, D), got {tuple(x.shape)}")
    batch = x.shape[0]
    if batch < 2:
        raise TLIError(f"uniformity needs a batch of at least 2 vectors, got {batch}")
    xn = F.normalize(x.to(_working_dtype(x)), dim=-1)  # (B, D)
    sq_dist = (2 - 2 * (xn @ xn.T)).clamp_min(0)  # (B, B)
    off_diag = ~torch.eye(batch, dtype=torch.bool, device=x.device)  # (B, B)
    pairs = -t * sq_dist[off_diag]  # (B * (B - 1),)
    return torch.logsumexp(pairs, dim=0) - math.log(pairs.numel())


def alignment(anchor: Tensor, positive: Tensor, alpha: float = 2) -> Tensor:
    """Alignment loss: mean distance between each anchor and its positive on the hypersphere.

    Optimises ``mean_i ||a_i - p_i||^alpha`` over normalised vectors (Wang and Isola 2020,
    "Understanding Contrastive Representation Learning through Alignment and Uniformity on the
    Hypersphere"). With alpha 2 it equals ``2 - 2 * mean cos(a_i, p_i)``. Alone it rewards collapse;
    pair it with :func:`uniformity`.

    Args:
        anchor: (B, D) source-word vectors; need not be normalised.
        positive: (B, D) target-word vectors, row i the translation of anchor row i.
        alpha: Exponent on the distance; Wang and Isola use 2.

    Returns:
        Scalar tensor with grad.

    Raises:
        TLIError: The batch is empty.
        ValueError: Shapes differ, or alpha is not positive.
    """
    if anchor.dim() != 2 or anchor.shape != positive.shape:
        raise ValueError(
            f"alignment: anchor and positive must both be (B, D), got {tuple(anchor.shape)} "
            f"and {tuple(positive.shape)}"
        )
    if anchor.shape[0] < 1:
        raise TLIError("alignment needs a batch of at least 1 pair, got 0")
    if not alpha > 0:
        raise ValueError(f"alignment: alpha must be > 0, got {alpha}")
    dtype = _working_dtype(anchor)
    a = F.normalize(anchor.to(dtype), dim=-1)  # (B, D)
    p = F.normalize(positive.to(dtype), dim=-1)  # (B, D)
    return torch.linalg.vector_norm(a - p, dim=-1).pow(alpha).mean()


def state_drift(states: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """Preservation loss: how far a model's per-token states moved from a frozen reference.

    Optimises ``sum_t ||h_t - r_t||^2 / sum_t ||r_t||^2`` over the real tokens t of a batch of
    running text: the relative squared distance of the adapted model's hidden states ``h`` from
    the base model's ``r`` (feature distillation, as in FitNets, Romero et al. 2015, here towards
    the model's own frozen self). At the final layer the LM head reads these states, so keeping
    them close keeps the next-token distribution close without computing the V-sized logits. 0
    when nothing moved; 1 when the states moved as far as their own size.

    Args:
        states: (B, T, D) states of the adapted model (with grad).
        reference: (B, T, D) states of the frozen model on the same batch.
        mask: (B, T) attention mask, 1 for real tokens (padding is ignored).

    Returns:
        Scalar tensor with grad.

    Raises:
        ValueError: Shapes differ, or the mask has no real token.
    """
    if states.dim() != 3 or states.shape != reference.shape or mask.shape != states.shape[:2]:
        raise ValueError(
            f"state_drift: states and reference must be (B, T, D) and mask (B, T), got "
            f"{tuple(states.shape)}, {tuple(reference.shape)} and {tuple(mask.shape)}"
        )
    keep = mask.bool()  # (B, T)
    if not bool(keep.any()):
        raise ValueError("state_drift: the mask has no real token")
    dtype = _working_dtype(states)
    h = states.to(dtype)[keep]  # (n, D)
    r = reference.to(dtype)[keep]  # (n, D)
    return (h - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# centring


def center_batch(x: Tensor) -> Tensor:
    """Subtract the batch mean from every row, for "centred" variants of the losses.

    Mean-centring removes the common direction that makes pooled hidden states anisotropic
    (docs/design.md, fact 1), as MUSE and vecmap centre embeddings before mapping. Apply it to
    each language's batch separately, then pass the result to a loss (which normalises).

    Args:
        x: (B, D) vectors.

    Returns:
        (B, D) centred vectors, differentiable with respect to ``x``.

    Raises:
        TLIError: B < 2 (a single centred vector is zero).
        ValueError: ``x`` is not 2-D.
    """
    if x.dim() != 2:
        raise ValueError(f"center_batch: x must be (B, D), got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise TLIError(f"center_batch needs a batch of at least 2 vectors, got {x.shape[0]}")
    return x - x.mean(dim=0, keepdim=True)  # (B, D)


def update_running_mean(mean: Tensor | None, x: Tensor, momentum: float = 0.1) -> Tensor:
    """Exponential moving average of batch means, e.g. one per language for centring.

    ``new = (1 - momentum) * mean + momentum * x.mean(0)``, the ``torch.nn.BatchNorm`` convention
    (momentum is the weight of the new batch). Pass ``mean=None`` to start from the first batch's
    mean. The result is detached, so it can be kept across steps without holding the graph.

    Args:
        mean: (D,) running mean so far, or None.
        x: (B, D) the current batch.
        momentum: Weight of the current batch mean, in (0, 1].

    Returns:
        (D,) new running mean, detached, in the dtype of ``x``.

    Raises:
        ValueError: Shapes do not match, the batch is empty, or momentum is outside (0, 1].
    """
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"update_running_mean: x must be a non-empty (B, D), got {tuple(x.shape)}")
    if not 0 < momentum <= 1:
        raise ValueError(f"update_running_mean: momentum must be in (0, 1], got {momentum}")
    batch_mean = x.detach().mean(dim=0)  # (D,)
    if mean is None:
        return batch_mean
    if mean.shape != batch_mean.shape:
        raise ValueError(
            f"update_running_mean: mean {tuple(mean.shape)} does not match x's hidden size "
            f"{tuple(batch_mean.shape)}"
        )
    return torch.lerp(mean.detach().to(batch_mean), batch_mean, momentum)  # (D,)


# --------------------------------------------------------------------------------------------
# objective: a pair loss, optionally on centred vectors, plus a uniformity term


def contrastive_objective(
    anchor: Tensor,
    positive: Tensor,
    gold: Tensor | None = None,
    *,
    loss: str = "info_nce",
    center: str | tuple[Tensor, Tensor] = "none",
    uniformity_weight: float = 0.0,
    uniformity_t: float = 2.0,
    **hyperparameters: float,
) -> LossOutput:
    """One training objective at one layer: centring, a pair loss, and a uniformity term.

    Optimises ``pair_loss(c(a), c(p)) + w * (uniformity(c(a)) + uniformity(c(p))) / 2``, where
    ``c`` subtracts a per-language mean (or is the identity) and ``pair_loss`` is one of
    :data:`LOSSES`. Centring removes the shared direction that makes mean-pooled states
    anisotropic (docs/design.md, fact 1), so the pair loss ranks words by what distinguishes them;
    the uniformity term (Wang and Isola 2020) pushes the whole batch apart and penalises the
    collapse of docs/design.md, fact 2. ``pos_sim`` and ``neg_sim`` are those of the pair loss, on
    the vectors it saw.

    Args:
        anchor: (B, D) source-word vectors; need not be normalised.
        positive: (B, D) target-word vectors, row i the translation of anchor row i.
        gold: Optional (B, B) bool mask of correct candidates (see the module docstring).
        loss: Name of the pair loss in :data:`LOSSES`.
        center: ``"none"``; ``"batch"`` (subtract each language's batch mean,
            :func:`center_batch`); or a pair ``(source_mean, target_mean)`` of (D,) tensors to
            subtract (e.g. running means from :func:`update_running_mean`; treated as
            constants).
        uniformity_weight: Weight w of the uniformity term; 0 leaves it out.
        uniformity_t: Kernel scale of :func:`uniformity`.
        **hyperparameters: Passed to the pair loss (``margin``, ``temperature``).

    Returns:
        LossOutput whose ``loss`` includes the uniformity term.

    Raises:
        TLIError: As the pair loss; an unknown loss or centring.
        ValueError: Shapes do not match the contract.
    """
    if isinstance(center, tuple):
        source_mean, target_mean = center
        anchor = anchor - source_mean.detach().to(anchor)  # (B, D)
        positive = positive - target_mean.detach().to(positive)  # (B, D)
    elif center == "batch":
        anchor, positive = center_batch(anchor), center_batch(positive)  # (B, D) each
    elif center != "none":
        raise TLIError(f"center must be none, batch or a pair of means, got {center!r}")
    out = get_loss(loss)(anchor, positive, gold, **hyperparameters)
    if uniformity_weight:
        spread = (uniformity(anchor, uniformity_t) + uniformity(positive, uniformity_t)) / 2
        out = out._replace(loss=out.loss + uniformity_weight * spread)
    return out


# --------------------------------------------------------------------------------------------
# registry

PairLoss = Callable[..., LossOutput]

LOSSES: dict[str, PairLoss] = {
    "triplet_hardest": triplet_hardest,
    "triplet_semi_hard": triplet_semi_hard,
    "info_nce": info_nce,
}


def get_loss(name: str) -> PairLoss:
    """The pair loss registered under ``name`` (see :data:`LOSSES`).

    Args:
        name: One of ``LOSSES``' keys.

    Returns:
        The loss function: ``fn(anchor, positive, gold=None, **hyperparameters) -> LossOutput``.

    Raises:
        TLIError: Unknown name; the message lists the valid names.
    """
    try:
        return LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(LOSSES))
        raise TLIError(f"unknown loss {name!r}; valid losses: {valid}") from None
