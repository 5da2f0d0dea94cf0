"""The evaluation's verdict: two findings, a collapse flag, and a headline made of them.

Pure functions of summary numbers (no tensors, no models), so every rule can be tested on
constructed inputs. Per set and layer (docs/evaluation.md has the full table):

- **geometry finding**: the margin (mean pair cosine minus the mismatched-pair baseline) *rose*
  when the paired bootstrap CI of its change lies above 0, *fell* when it lies below 0, and is
  *unchanged* otherwise. It states the smallest change its n could detect: the CI's half-width
  (a change whose interval kept that width would have to exceed it to exclude 0).
- **retrieval finding**: P@1 *rose* / *fell* when McNemar's exact test on the per-query top-1
  hits gives p < alpha with more hits gained / lost, and is *unchanged* otherwise. It states the
  fewest hits gained, with none lost, that could reach p < alpha (6 at alpha = 0.05, whatever n).
- **collapse flag**: raised when the raw pair cosine rose significantly (paired t-test), the
  baseline rose by at least ``collapse_ratio`` of that rise, *and* the margin-change CI is not
  above 0. A rise the baseline shares but the margin still outgrows is not a collapse.
- **minimum effect**: a change smaller than ``min_effect`` (cosine for the pair cosine and the
  margin, share of queries for P@1) is never named, however small its p-value: with a thousand
  pairs a t-test finds changes far below anything that matters.

The headline (:func:`headline`) is a fixed function of the two directions and the flag (plus
the detection limits it quotes), and it never reads "no detectable change" when a finding
changed. Its ``rank`` orders headlines from best to worst: ``step(geometry) + step(retrieval) -
collapse``, so a better margin or P@1, all else equal, never gives a worse headline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: A finding's direction -> its step in :attr:`Verdict.rank`.
STEPS: dict[str, int] = {"fell": -1, "unchanged": 0, "rose": 1}

#: Headline code -> what it means. The label adds the detection limits (docs/evaluation.md).
VERDICTS: dict[str, str] = {
    "improved": "alignment improved: margin and retrieval rose",
    "margin_up": "margin improved; retrieval unchanged",
    "retrieval_up": "retrieval rose; margin unchanged",
    "mixed": "one finding rose, the other fell",
    "none": "no detectable change",
    "margin_down": "margin fell; retrieval unchanged",
    "retrieval_down": "retrieval fell; margin unchanged",
    "worsened": "alignment worsened: margin and retrieval fell",
    "collapsed": "raw cosine rose but the space collapsed",
}


@dataclass(frozen=True)
class VerdictFigures:
    """The numbers a verdict is decided from: one set at one layer, before and after.

    Attributes:
        pair_pre: Mean translation-pair cosine before.
        pair_post: Mean translation-pair cosine after.
        pair_p: Two-sided paired t-test p-value of the per-pair cosine change.
        pair_log10_p: Its base-10 logarithm (finite where ``pair_p`` underflows to 0).
        baseline_pre: Mismatched-pair baseline before.
        baseline_post: Mismatched-pair baseline after.
        margin_pre: Margin (pairs minus baseline) before.
        margin_post: Margin after.
        margin_change_lo: Lower end of the paired bootstrap CI of ``margin_post - margin_pre``.
        margin_change_hi: Upper end of that CI.
        p1_pre: Retrieval P@1 before.
        p1_post: Retrieval P@1 after.
        p1_lost: Queries whose top-1 hit was lost (McNemar's b).
        p1_gained: Queries whose top-1 hit was gained (McNemar's c).
        p1_p: Exact McNemar p-value of the hit change.
        n: Number of pairs (queries).
        level: Coverage of the margin-change CI and of the Wilson intervals.
        p1_name: What P@1 means here, e.g. ``P@1 (s2t, centered)`` (for the reason line).
    """

    pair_pre: float
    pair_post: float
    pair_p: float
    pair_log10_p: float
    baseline_pre: float
    baseline_post: float
    margin_pre: float
    margin_post: float
    margin_change_lo: float
    margin_change_hi: float
    p1_pre: float
    p1_post: float
    p1_lost: int
    p1_gained: int
    p1_p: float
    n: int
    level: float = 0.95
    p1_name: str = "P@1"

    @property
    def pair_change(self) -> float:
        """Change of the mean pair cosine, post - pre."""
        return self.pair_post - self.pair_pre

    @property
    def baseline_change(self) -> float:
        """Change of the mismatched-pair baseline, post - pre."""
        return self.baseline_post - self.baseline_pre

    @property
    def margin_change(self) -> float:
        """Change of the margin, post - pre (equals pair change - baseline change)."""
        return self.margin_post - self.margin_pre

    @property
    def p1_change(self) -> float:
        """Change of P@1 as a share of the queries: (gained - lost) / n."""
        return (self.p1_gained - self.p1_lost) / self.n if self.n else math.nan


@dataclass(frozen=True)
class Finding:
    """One finding (geometry or retrieval) of one set at one layer.

    Attributes:
        name: ``geometry`` (the margin) or ``retrieval`` (P@1).
        direction: ``rose``, ``fell`` or ``unchanged``.
        change: The observed change: of the margin (cosine), or of P@1 (share of queries).
        n: Number of pairs (queries).
        smallest: The smallest change this n could detect and name, in the unit of ``change``:
            the margin-change CI's half-width (at least ``min_effect``); for retrieval,
            ``items / n``. NaN when unknown.
        items: Retrieval only: the fewest hits gained, with none lost, that the verdict would
            name (McNemar p < alpha and at least ``min_effect``); None when no change among n
            queries could be (and always for geometry).
        text: The figures, in one line.
    """

    name: str
    direction: str
    change: float
    n: int
    smallest: float
    items: int | None
    text: str

    def not_detectable(self) -> str:
        """Why an unchanged finding says nothing: the change this n would have needed."""
        if self.name == "retrieval":
            if self.items is None:
                return (
                    f"retrieval change not detectable at n = {self.n} (too few queries for "
                    "any change to reach significance)"
                )
            return (
                f"retrieval change not detectable at n = {self.n} "
                f"(needs ≥ {self.items} gained, none lost)"
            )
        if not math.isfinite(self.smallest):
            return f"margin change not measurable at n = {self.n}"
        return (
            f"margin change not detectable at n = {self.n} "
            f"(needs |change| > {self.smallest:.4f})"
        )


@dataclass(frozen=True)
class Verdict:
    """One set's verdict at one layer.

    Attributes:
        code: A key of :data:`VERDICTS`.
        label: The headline, :func:`headline` of the findings.
        reason: The findings and the collapse flag with their figures, in one line.
        geometry: The geometry finding's direction (``rose``, ``fell``, ``unchanged``).
        retrieval: The retrieval finding's direction.
        collapse: Whether the collapse flag is raised.
        rank: The headline's order, best first: ``step(geometry) + step(retrieval) - collapse``
            (-3..2).
    """

    code: str
    label: str
    reason: str
    geometry: str = ""
    retrieval: str = ""
    collapse: bool = False
    rank: int = 0

    def line(self, set_name: str, layer: int | None = None) -> str:
        """``set (layer L): label: reason``, the form printed on stdout and in the report."""
        where = set_name if layer is None else f"{set_name} (layer {layer})"
        return f"{where}: {self.label}: {self.reason}"


def _lt(value: float, bound: float) -> bool:
    """``value < bound``, False for NaN."""
    return not math.isnan(value) and value < bound


def _format_p(p: float, log10_p: float | None = None) -> str:
    from tli.stats import format_p

    return format_p(p, log10_p)


def _wilson(share: float, n: int, level: float) -> str:
    """``[lo, hi]``, the Wilson interval of a P@1 ``share`` of ``n`` queries."""
    from tli.stats import wilson_interval

    if not n or not math.isfinite(share):
        return "[n/a]"
    lo, hi = wilson_interval(int(round(share * n)), n, level)
    return f"[{lo:.4f}, {hi:.4f}]"


def retrieval_items(n: int, *, alpha: float, min_effect: float) -> int | None:
    """The fewest hits gained, none lost, that the verdict names among ``n`` queries.

    McNemar's exact test must reach p < alpha (:func:`tli.stats.mcnemar_min_gain`) and the
    change must be at least ``min_effect`` of the queries. None when more than n are needed.
    """
    from tli.stats import mcnemar_min_gain

    k = mcnemar_min_gain(alpha)
    assert k is not None  # no limit on n here
    k = max(k, math.ceil(min_effect * n - 1e-9))
    return None if k > n else k


def geometry_finding(fig: VerdictFigures, *, min_effect: float) -> Finding:
    """The margin's finding: rose / fell / unchanged by its paired bootstrap CI."""
    change, lo, hi = fig.margin_change, fig.margin_change_lo, fig.margin_change_hi
    if _lt(0.0, lo) and change >= min_effect:
        direction = "rose"
    elif _lt(hi, 0.0) and change <= -min_effect:
        direction = "fell"
    else:
        direction = "unchanged"
    half = (hi - lo) / 2 if math.isfinite(lo) and math.isfinite(hi) else math.nan
    smallest = max(half, min_effect) if math.isfinite(half) else math.nan
    pct = int(round(fig.level * 100))
    text = (
        f"geometry {direction}: margin {fig.margin_pre:+.4f} -> {fig.margin_post:+.4f} "
        f"({change:+.4f}, {pct}% CI [{lo:+.4f}, {hi:+.4f}]; detects |change| > {smallest:.4f})"
    )
    return Finding("geometry", direction, change, fig.n, smallest, None, text)


def retrieval_finding(fig: VerdictFigures, *, alpha: float, min_effect: float) -> Finding:
    """The P@1 finding: rose / fell / unchanged by McNemar's exact test on the hits."""
    change = fig.p1_change
    big = math.isfinite(change) and abs(change) >= min_effect
    if fig.p1_gained > fig.p1_lost and _lt(fig.p1_p, alpha) and big:
        direction = "rose"
    elif fig.p1_lost > fig.p1_gained and _lt(fig.p1_p, alpha) and big:
        direction = "fell"
    else:
        direction = "unchanged"
    items = retrieval_items(fig.n, alpha=alpha, min_effect=min_effect)
    smallest = items / fig.n if items is not None else math.nan
    pct = int(round(fig.level * 100))
    detects = (
        f"detects ≥ {items} gained, none lost (+{smallest:.4f})"
        if items is not None
        else "detects no change at this n"
    )
    pre, post = (_wilson(p, fig.n, fig.level) for p in (fig.p1_pre, fig.p1_post))
    text = (
        f"retrieval {direction}: {fig.p1_name} {fig.p1_pre:.4f} {pre} -> {fig.p1_post:.4f} "
        f"{post} ({pct}% Wilson; "
        f"+{fig.p1_gained}/-{fig.p1_lost}, McNemar p = {_format_p(fig.p1_p)}; {detects})"
    )
    return Finding("retrieval", direction, change, fig.n, smallest, items, text)


def collapse_flag(
    fig: VerdictFigures, *, alpha: float, collapse_ratio: float, min_effect: float
) -> tuple[bool, str]:
    """Whether the raw-cosine rise is collapse, and the figures that say so (one line).

    Raised when the pair cosine rose significantly and by at least ``min_effect``, the
    baseline rose by at least ``collapse_ratio`` times as much, and the margin-change CI is
    not above 0. NaN figures never raise it.
    """
    pair, base = fig.pair_change, fig.baseline_change
    pair_up = math.isfinite(pair) and pair > 0 and pair >= min_effect and _lt(fig.pair_p, alpha)
    shared = math.isfinite(base) and base >= collapse_ratio * pair
    lo = fig.margin_change_lo
    margin_not_up = math.isfinite(lo) and lo <= 0.0
    raised = bool(pair_up and shared and margin_not_up)
    share = (
        f", {100 * base / pair:.0f}% of the pair change" if pair > 0 and math.isfinite(base) else ""
    )
    text = (
        f"collapse flag {'raised' if raised else 'not raised'}: pairs {fig.pair_pre:.4f} -> "
        f"{fig.pair_post:.4f} ({pair:+.4f}, p = {_format_p(fig.pair_p, fig.pair_log10_p)}); "
        f"baseline {fig.baseline_pre:.4f} -> {fig.baseline_post:.4f} ({base:+.4f}{share}); "
        f"margin CI {'above 0' if _lt(0.0, lo) else 'not above 0'}"
    )
    return raised, text


def headline(geometry: Finding, retrieval: Finding, collapse: bool) -> tuple[str, str, int]:
    """The headline of a verdict: a fixed function of the two findings and the flag.

    Returns:
        ``(code, label, rank)``; the table in docs/evaluation.md lists every case.
    """
    g, r = geometry.direction, retrieval.direction
    rank = STEPS[g] + STEPS[r] - int(collapse)
    if collapse:
        parts = [
            "margin fell" if g == "fell" else geometry.not_detectable(),
            {"rose": "retrieval rose", "fell": "retrieval fell"}.get(
                r, retrieval.not_detectable()
            ),
        ]
        return "collapsed", "raw cosine rose but the space collapsed; " + "; ".join(parts), rank
    table = {
        ("rose", "rose"): ("improved", "alignment improved"),
        ("rose", "unchanged"): ("margin_up", f"margin improved; {retrieval.not_detectable()}"),
        ("rose", "fell"): ("mixed", "mixed: margin improved, retrieval fell"),
        ("unchanged", "rose"): ("retrieval_up", f"retrieval rose; {geometry.not_detectable()}"),
        ("unchanged", "unchanged"): (
            "none",
            f"no detectable change: {geometry.not_detectable()}; {retrieval.not_detectable()}",
        ),
        ("unchanged", "fell"): ("retrieval_down", f"retrieval fell; {geometry.not_detectable()}"),
        ("fell", "rose"): ("mixed", "mixed: retrieval rose, margin fell"),
        ("fell", "unchanged"): ("margin_down", f"margin fell; {retrieval.not_detectable()}"),
        ("fell", "fell"): ("worsened", "alignment worsened"),
    }
    code, label = table[(g, r)]
    return code, label, rank


def decide(
    fig: VerdictFigures,
    *,
    alpha: float = 0.05,
    collapse_ratio: float = 0.5,
    min_effect: float = 0.005,
) -> Verdict:
    """The verdict for one set at one layer: findings, flag and headline.

    Args:
        fig: The figures of the set at the layer.
        alpha: Significance level of the t-test and of McNemar's test.
        collapse_ratio: Share of the pair-cosine rise that, when the mismatched baseline rises
            at least as much and the margin does not rise, makes the rise a collapse.
        min_effect: The smallest change a finding or the flag names (cosine for the pair
            cosine and the margin, share of queries for P@1).

    Returns:
        The :class:`Verdict`, with the findings' figures in its reason line.
    """
    geometry = geometry_finding(fig, min_effect=min_effect)
    retrieval = retrieval_finding(fig, alpha=alpha, min_effect=min_effect)
    collapse, flag = collapse_flag(
        fig, alpha=alpha, collapse_ratio=collapse_ratio, min_effect=min_effect
    )
    code, label, rank = headline(geometry, retrieval, collapse)
    reason = f"{geometry.text}; {retrieval.text}; {flag}"
    return Verdict(code, label, reason, geometry.direction, retrieval.direction, collapse, rank)
