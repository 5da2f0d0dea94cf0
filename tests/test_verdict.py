"""The verdict (``tli.verdict``): findings, the collapse flag, the headline and its table."""

import dataclasses
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tli.stats import mcnemar_exact
from tli.verdict import (
    STEPS,
    VERDICTS,
    Finding,
    VerdictFigures,
    collapse_flag,
    decide,
    geometry_finding,
    headline,
    retrieval_finding,
    retrieval_items,
)

from conftest import FUZZ_EXAMPLES, ROOT


def figs(**kw):
    """Figures of one set; margins follow from pairs and baseline, McNemar p from the counts."""
    base = dict(
        pair_pre=0.377,
        pair_post=0.377,
        pair_p=1.0,
        pair_log10_p=0.0,
        baseline_pre=0.350,
        baseline_post=0.350,
        margin_change_lo=-0.01,
        margin_change_hi=0.01,
        p1_pre=3 / 95,
        p1_lost=0,
        p1_gained=0,
        n=95,
    )
    base.update(kw)
    base["margin_pre"] = base["pair_pre"] - base["baseline_pre"]
    base["margin_post"] = base["pair_post"] - base["baseline_post"]
    base.setdefault("p1_p", mcnemar_exact(base["p1_lost"], base["p1_gained"]))
    base.setdefault(
        "p1_post", base["p1_pre"] + (base["p1_gained"] - base["p1_lost"]) / base["n"]
    )
    return VerdictFigures(**base)


# --- the rules on the cases the issue names ---------------------------------------------------


def test_a_collapse_is_flagged_and_named():
    # Raw cosine up significantly, the baseline up 111% as much, the margin CI below 0.
    fig = figs(
        pair_post=0.554,
        baseline_post=0.546,
        pair_p=0.0,
        pair_log10_p=-412.3,
        margin_change_lo=-0.022,
        margin_change_hi=-0.014,
    )
    v = decide(fig)
    assert v.code == "collapsed" and v.collapse and v.geometry == "fell"
    assert v.label.startswith("raw cosine rose but the space collapsed; margin fell; ")
    assert "retrieval change not detectable at n = 95 (needs ≥ 6 gained, none lost)" in v.label
    assert "p = 5.0e-413" in v.reason and "111% of the pair change" in v.reason
    assert "collapse flag raised" in v.reason and v.rank == -2


@pytest.mark.parametrize(
    ("p1_gained", "p1_lost", "code"), [(9, 1, "improved"), (8, 2, "margin_up")]
)
def test_the_aligned_figures_never_read_collapsed(p1_gained, p1_lost, code):
    # The aligned preset's control figures in the issue: pairs 0.349 -> 0.584, margin +0.024 ->
    # +0.092 with change CI [+0.040, +0.099]. The baseline rose 71% as much as the pairs, but
    # the margin rose: no collapse, whatever McNemar gives (p = 0.021 here, 0.109 there).
    fig = figs(
        pair_pre=0.349,
        pair_post=0.584,
        pair_p=1e-30,
        pair_log10_p=-30.0,
        baseline_pre=0.325,
        baseline_post=0.492,
        margin_change_lo=0.040,
        margin_change_hi=0.099,
        p1_pre=5 / 95,
        p1_gained=p1_gained,
        p1_lost=p1_lost,
    )
    v = decide(fig)
    assert v.code == code and not v.collapse and v.geometry == "rose"
    assert "collapse flag not raised" in v.reason and "71% of the pair change" in v.reason
    if code == "margin_up":
        assert v.label == (
            "margin improved; retrieval change not detectable at n = 95 "
            "(needs ≥ 6 gained, none lost)"
        )


def test_a_changed_margin_is_never_no_change():
    # The held-out list of the issue: margin +0.014 -> +0.074, change CI [+0.031, +0.089],
    # P@1 1/61 -> 5/61 (McNemar p = 0.22): the old rules printed "no significant change".
    fig = figs(
        pair_pre=0.40,
        pair_post=0.55,
        pair_p=1e-12,
        baseline_pre=0.386,
        baseline_post=0.476,
        margin_change_lo=0.031,
        margin_change_hi=0.089,
        n=61,
        p1_pre=1 / 61,
        p1_gained=5,
        p1_lost=1,
    )
    v = decide(fig)
    assert fig.p1_p == pytest.approx(0.21875)
    assert v.label == (
        "margin improved; retrieval change not detectable at n = 61 (needs ≥ 6 gained, none lost)"
    )
    assert "no detectable change" not in v.label


def test_collapse_needs_all_three_conditions():
    rise = dict(pair_post=0.477, pair_p=1e-6, margin_change_lo=-0.05, margin_change_hi=0.2)
    assert decide(figs(**rise, baseline_post=0.400)).collapse  # share 0.50
    assert not decide(figs(**rise, baseline_post=0.399)).collapse  # share 0.49
    assert decide(figs(**rise, baseline_post=0.399), collapse_ratio=0.4).collapse
    # not significant: never a collapse
    assert not decide(figs(**dict(rise, pair_p=0.2), baseline_post=0.45)).collapse
    # the margin rose (CI above 0) although the baseline rose 95% as much: not a collapse
    up = dict(rise, margin_change_lo=0.001, margin_change_hi=0.01)
    assert not decide(figs(**up, baseline_post=0.445)).collapse
    # a collapse is never hidden by a retrieval gain: the headline names both
    v = decide(figs(**rise, baseline_post=0.445, p1_gained=20))
    assert v.code == "collapsed" and v.label.endswith("; retrieval rose") and v.retrieval == "rose"


def test_min_effect_keeps_tiny_significant_changes_unnamed():
    # A +0.0000 pair change with p = 0.022 that the baseline shares is not a collapse.
    tiny = dict(
        pair_pre=0.99940,
        pair_post=0.99943,
        baseline_pre=0.99910,
        baseline_post=0.99913,
        pair_p=0.022,
        margin_change_lo=-1e-5,
        margin_change_hi=1e-5,
    )
    assert decide(figs(**tiny)).code == "none"
    assert decide(figs(**tiny), min_effect=0.0).code == "collapsed"
    # a margin change whose CI excludes 0 but that is below the minimum is unchanged, and the
    # label says what it would have needed
    small = dict(pair_post=0.381, margin_change_lo=0.001, margin_change_hi=0.007)
    v = decide(figs(**small))
    assert v.geometry == "unchanged" and "needs |change| > 0.0050" in v.label
    assert decide(figs(**small), min_effect=0.001).geometry == "rose"
    # P@1: 7 gained of 1343 queries (p = 0.016) is 0.52% of them: named at 0.005, not at 0.006
    many = dict(n=1343, p1_pre=10 / 1343, p1_gained=7)
    assert decide(figs(**many)).retrieval == "rose"
    assert decide(figs(**many), min_effect=0.006).retrieval == "unchanged"
    assert retrieval_items(1343, alpha=0.05, min_effect=0.006) == 9


def test_worsened_mixed_and_nan():
    down = dict(pair_post=0.30, pair_p=1e-5, margin_change_lo=-0.08, margin_change_hi=-0.02)
    assert decide(figs(**down, p1_pre=0.4, p1_lost=30, p1_gained=1)).code == "worsened"
    v = decide(figs(**down, p1_pre=0.4, p1_lost=3, p1_gained=1))
    assert v.code == "margin_down" and v.label.startswith("margin fell; retrieval change not")
    assert decide(figs(**down, p1_gained=12)).label == "mixed: retrieval rose, margin fell"
    up = dict(margin_change_lo=0.02, margin_change_hi=0.05, baseline_post=0.315)
    v = decide(figs(**up, p1_pre=0.4, p1_lost=12))
    assert v.label == "mixed: margin improved, retrieval fell"
    nan = float("nan")
    v = decide(figs(pair_p=nan, margin_change_lo=nan, margin_change_hi=nan))
    assert v.code == "none" and "margin change not measurable at n = 95" in v.label


def test_detection_limits():
    # geometry: the CI half-width, at least min_effect
    g = geometry_finding(figs(margin_change_lo=-0.02, margin_change_hi=0.03), min_effect=0.005)
    assert g.smallest == pytest.approx(0.025)
    assert g.not_detectable() == "margin change not detectable at n = 95 (needs |change| > 0.0250)"
    # retrieval: 6 gained, none lost at alpha 0.05; 8 at 0.01; none at all with 5 queries
    r = retrieval_finding(figs(), alpha=0.05, min_effect=0.005)
    assert r.items == 6 and r.smallest == pytest.approx(6 / 95)
    assert retrieval_finding(figs(), alpha=0.01, min_effect=0.0).items == 8
    few = retrieval_finding(figs(n=5, p1_pre=0.2), alpha=0.05, min_effect=0.0)
    assert few.items is None and "too few queries" in few.not_detectable()


def test_the_reason_line_gives_every_figure():
    v = decide(figs(p1_pre=5 / 95, p1_gained=7, p1_lost=0, p1_name="P@1 (s2t, centered)"))
    assert v.reason.startswith("geometry unchanged: margin +0.0270 -> +0.0270 (+0.0000, 95% CI")
    # Wilson intervals of 5/95 and 12/95, McNemar on +7/-0, the detection limit
    assert "P@1 (s2t, centered) 0.0526 [0.0227, 0.1173] -> 0.1263 [0.0738, 0.2079]" in v.reason
    assert "+7/-0, McNemar p = 0.016; detects ≥ 6 gained, none lost (+0.0632)" in v.reason
    assert v.line("control", 18).startswith("control (layer 18): retrieval rose; margin change")


# --- the headline table ------------------------------------------------------------------------


def _finding(name, direction):
    if name == "geometry":
        return Finding("geometry", direction, 0.0, 95, 0.0123, None, "")
    return Finding("retrieval", direction, 0.0, 95, 6 / 95, 6, "")


def _cases():
    for g in ("rose", "unchanged", "fell"):
        for r in ("rose", "unchanged", "fell"):
            for c in (False, True):
                if not (c and g == "rose"):  # the flag needs a margin CI not above 0
                    yield g, r, c


def test_the_docs_table_is_the_headline_function():
    # docs/evaluation.md lists every case as | geometry | retrieval | collapse | code | rank |
    text = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    rows = set()
    for line in text.splitlines():
        cells = [c.strip().strip("*`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] in STEPS and cells[1] in STEPS:
            rows.add((cells[0], cells[1], cells[2], cells[3], cells[5]))
    expected = set()
    for g, r, c in _cases():
        code, label, rank = headline(_finding("geometry", g), _finding("retrieval", r), c)
        assert code in VERDICTS
        expected.add((g, r, "yes" if c else "no", code, str(rank)))
    assert rows == expected


# --- properties over the space of pre/post figures ---------------------------------------------


@st.composite
def figures(draw):
    n = draw(st.integers(1, 400))
    pre_hits = draw(st.integers(0, n))
    lost = draw(st.integers(0, pre_hits))
    gained = draw(st.integers(0, n - pre_hits))
    pair_pre = draw(st.floats(-0.2, 0.99))
    pair_change = draw(st.floats(-0.4, 0.4))
    baseline_pre = draw(st.floats(-0.2, 0.99))
    baseline_change = draw(st.floats(-0.4, 0.4))
    margin_change = pair_change - baseline_change
    below = draw(st.floats(0.0, 0.2))
    above = draw(st.floats(0.0, 0.2))
    pair_p = draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([1e-30, 0.01, 0.049, 0.051])))
    return VerdictFigures(
        pair_pre=pair_pre,
        pair_post=pair_pre + pair_change,
        pair_p=pair_p,
        pair_log10_p=math.log10(pair_p) if pair_p > 0 else -400.0,
        baseline_pre=baseline_pre,
        baseline_post=baseline_pre + baseline_change,
        margin_pre=pair_pre - baseline_pre,
        margin_post=pair_pre - baseline_pre + margin_change,
        margin_change_lo=margin_change - below,
        margin_change_hi=margin_change + above,
        p1_pre=pre_hits / n,
        p1_post=(pre_hits - lost + gained) / n,
        p1_lost=lost,
        p1_gained=gained,
        p1_p=mcnemar_exact(lost, gained),
        n=n,
    )


SETTINGS = st.fixed_dictionaries(
    {
        "alpha": st.sampled_from([0.01, 0.05, 0.1]),
        "collapse_ratio": st.sampled_from([0.25, 0.5, 1.0]),
        "min_effect": st.sampled_from([0.0, 0.005, 0.02]),
    }
)


def _better_margin(fig, delta):
    """The same figures with the margin higher by delta: the baseline lower, the pairs fixed."""
    return dataclasses.replace(
        fig,
        baseline_post=fig.baseline_post - delta,
        margin_post=fig.margin_post + delta,
        margin_change_lo=fig.margin_change_lo + delta,
        margin_change_hi=fig.margin_change_hi + delta,
    )


def _better_p1(fig, gain):
    """The same figures with one more hit: a miss turned into a gain, or a loss undone."""
    lost, gained = fig.p1_lost, fig.p1_gained
    if gain:
        gained += 1
    else:
        lost -= 1
    return dataclasses.replace(
        fig,
        p1_lost=lost,
        p1_gained=gained,
        p1_p=mcnemar_exact(lost, gained),
        p1_post=fig.p1_post + 1 / fig.n,
    )


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(figures(), st.floats(0.0, 0.3), SETTINGS)
def test_a_better_margin_never_makes_the_headline_worse(fig, delta, kw):
    before, after = decide(fig, **kw), decide(_better_margin(fig, delta), **kw)
    assert after.rank >= before.rank, (before.label, after.label)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(figures(), st.booleans(), SETTINGS)
def test_a_better_p_at_1_never_makes_the_headline_worse(fig, gain, kw):
    hits = round(fig.p1_post * fig.n)
    if (gain and hits == fig.n) or (not gain and fig.p1_lost == 0):
        return  # no room for one more hit this way
    before, after = decide(fig, **kw), decide(_better_p1(fig, gain), **kw)
    assert after.rank >= before.rank, (before.label, after.label)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(figures(), SETTINGS)
def test_improved_never_appears_when_the_margin_ci_includes_0(fig, kw):
    v = decide(fig, **kw)
    if not fig.margin_change_lo > 0:
        assert "improved" not in v.label and v.code != "improved" and v.geometry != "rose"
    assert v.rank == STEPS[v.geometry] + STEPS[v.retrieval] - int(v.collapse)
    if v.code == "none":  # "no detectable change" only when nothing changed
        assert v.geometry == v.retrieval == "unchanged" and not v.collapse


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(figures(), SETTINGS, st.floats(-1, 1), st.text(max_size=20))
def test_the_headline_depends_on_the_findings_only(fig, kw, noise, text):
    v = decide(fig, **kw)
    geometry = geometry_finding(fig, min_effect=kw["min_effect"])
    retrieval = retrieval_finding(fig, alpha=kw["alpha"], min_effect=kw["min_effect"])
    collapse, _ = collapse_flag(
        fig, alpha=kw["alpha"], collapse_ratio=kw["collapse_ratio"], min_effect=kw["min_effect"]
    )
    assert (v.code, v.label, v.rank) == headline(geometry, retrieval, collapse)
    # Other figures behind the same findings (change, text) give the same headline.
    other = headline(
        dataclasses.replace(geometry, change=noise, text=text),
        dataclasses.replace(retrieval, change=-noise, text=text[::-1]),
        collapse,
    )
    assert other == (v.code, v.label, v.rank)
    # and the label names the detection limits it quotes, nothing else numeric
    for number in re.findall(r"\d+\.\d+", v.label):
        assert number in (f"{geometry.smallest:.4f}",)
