"""The evaluation's verdict: did training align translations, or only raise raw cosine?

A pure function of summary numbers (no tensors, no models), so every rule can be tested on
constructed inputs. The rules, in the order they are checked (docs/evaluation.md explains them):

1. **alignment improved**: the margin (mean pair cosine minus the mismatched-pair baseline) rose
   significantly (the paired bootstrap CI of its change lies above 0) *and* retrieval P@1 rose
   significantly (exact McNemar test on the per-query top-1 hits, p < alpha, more hits gained
   than lost).
2. **raw cosine rose but the space collapsed**: the pair cosine rose significantly (paired
   t-test, p < alpha) and the mismatched baseline rose by at least ``collapse_ratio`` times as
   much (default 0.5: at least half of the rise is shared by unrelated word pairs). Since
   ``margin = pairs - baseline``, this is the same as ``margin change <= (1 - collapse_ratio) *
   pair change``.
3. **alignment worsened**: the mirror image of rule 1: the margin's CI lies below 0 and P@1 fell
   significantly.
4. **no significant change**: everything else; the reason line carries the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Verdict code -> the label printed in reports, in the order the rules are checked.
VERDICTS: dict[str, str] = {
    "improved": "alignment improved",
    "collapsed": "raw cosine rose but the space collapsed",
    "worsened": "alignment worsened",
    "none": "no significant change",
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
        level: Coverage of the margin-change CI (for the reason line).
        p1_name: What P@1 means here, e.g. ``P@1 (s2t, nn)`` (for the reason line).
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


@dataclass(frozen=True)
class Verdict:
    """One set's verdict at one layer.

    Attributes:
        code: A key of :data:`VERDICTS` (``improved``, ``collapsed``, ``worsened``, ``none``).
        label: The printed label, ``VERDICTS[code]``.
        reason: One line with the figures the decision rests on.
    """

    code: str
    label: str
    reason: str

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


def reason_line(fig: VerdictFigures) -> str:
    """The figures behind a verdict, in one line."""
    pct = int(round(fig.level * 100))
    share = (
        f", {100 * fig.baseline_change / fig.pair_change:.0f}% of the pair change"
        if fig.pair_change > 0 and math.isfinite(fig.baseline_change)
        else ""
    )
    return (
        f"pairs {fig.pair_pre:.4f} -> {fig.pair_post:.4f} ({fig.pair_change:+.4f}, "
        f"p = {_format_p(fig.pair_p, fig.pair_log10_p)}); "
        f"baseline {fig.baseline_pre:.4f} -> {fig.baseline_post:.4f} "
        f"({fig.baseline_change:+.4f}{share}); "
        f"margin {fig.margin_pre:+.4f} -> {fig.margin_post:+.4f} ({fig.margin_change:+.4f}, "
        f"{pct}% CI [{fig.margin_change_lo:+.4f}, {fig.margin_change_hi:+.4f}]); "
        f"{fig.p1_name} {fig.p1_pre:.4f} -> {fig.p1_post:.4f} "
        f"(+{fig.p1_gained}/-{fig.p1_lost}, McNemar p = {_format_p(fig.p1_p)})"
    )


def decide(fig: VerdictFigures, *, alpha: float = 0.05, collapse_ratio: float = 0.5) -> Verdict:
    """The verdict for one set at one layer, by the rules in this module's docstring.

    Args:
        fig: The figures of the set at the layer.
        alpha: Significance level of the t-test and of McNemar's test.
        collapse_ratio: Share of the pair-cosine rise that, when the mismatched baseline rises
            at least as much, makes the rise a collapse rather than alignment.

    Returns:
        The :class:`Verdict`, with the figures in its reason line.
    """
    margin_up = _lt(0.0, fig.margin_change_lo)
    margin_down = _lt(fig.margin_change_hi, 0.0)
    p1_up = fig.p1_gained > fig.p1_lost and _lt(fig.p1_p, alpha)
    p1_down = fig.p1_lost > fig.p1_gained and _lt(fig.p1_p, alpha)
    pair_up = _lt(0.0, fig.pair_change) and _lt(fig.pair_p, alpha)
    shared = not math.isnan(fig.baseline_change) and (
        fig.baseline_change >= collapse_ratio * fig.pair_change
    )
    if margin_up and p1_up:
        code = "improved"
    elif pair_up and shared:
        code = "collapsed"
    elif margin_down and p1_down:
        code = "worsened"
    else:
        code = "none"
    return Verdict(code, VERDICTS[code], reason_line(fig))
