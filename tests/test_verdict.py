"""The verdict rules (``tli.verdict``): which figures make "improved", "collapsed", "worsened"."""

from tli.verdict import VERDICTS, VerdictFigures, decide


def figs(**kw):
    base = dict(
        pair_pre=0.377,
        pair_post=0.377,
        pair_p=1.0,
        pair_log10_p=0.0,
        baseline_pre=0.350,
        baseline_post=0.350,
        margin_pre=0.027,
        margin_post=0.027,
        margin_change_lo=-0.01,
        margin_change_hi=0.01,
        p1_pre=0.016,
        p1_post=0.016,
        p1_lost=3,
        p1_gained=3,
        p1_p=1.0,
    )
    base.update(kw)
    base["margin_pre"] = base["pair_pre"] - base["baseline_pre"]
    base["margin_post"] = base["pair_post"] - base["baseline_post"]
    return VerdictFigures(**base)


def test_verdict_on_the_papers_collapse():
    # docs/design.md, fact 2: 0.377 -> 0.554 on pairs, 0.350 -> 0.546 on mismatched pairs.
    fig = figs(
        pair_post=0.554,
        baseline_post=0.546,
        pair_p=0.0,
        pair_log10_p=-412.3,
        margin_change_lo=-0.022,
        margin_change_hi=-0.014,
    )
    v = decide(fig)
    assert v.code == "collapsed" and v.label == VERDICTS["collapsed"]
    assert "p = 5.0e-413" in v.reason and "111% of the pair change" in v.reason
    assert "McNemar p = 1.000" in v.reason


def test_verdict_improved_needs_margin_and_p_at_1():
    up = dict(pair_post=0.45, baseline_post=0.36, pair_p=1e-9, margin_change_lo=0.02)
    assert decide(figs(**up, p1_post=0.1, p1_gained=40, p1_lost=2, p1_p=1e-9)).code == "improved"
    # margin up, P@1 not significantly up
    assert decide(figs(**up, p1_post=0.02, p1_gained=5, p1_lost=2, p1_p=0.45)).code == "none"
    # P@1 up, margin CI includes 0
    no_margin = dict(up, margin_change_lo=-0.001)
    assert decide(figs(**no_margin, p1_gained=40, p1_lost=2, p1_p=1e-9)).code == "none"
    # improved wins over collapsed when both hold
    both = dict(pair_post=0.55, baseline_post=0.50, pair_p=1e-9, margin_change_lo=0.01)
    assert decide(figs(**both, p1_gained=40, p1_lost=2, p1_p=1e-9)).code == "improved"


def test_verdict_collapse_ratio_boundary():
    rise = dict(pair_post=0.477, pair_p=1e-6, margin_change_lo=-0.05, margin_change_hi=0.2)
    assert decide(figs(**rise, baseline_post=0.400)).code == "collapsed"  # share 0.50
    assert decide(figs(**rise, baseline_post=0.399)).code == "none"  # share 0.49
    assert decide(figs(**rise, baseline_post=0.399), collapse_ratio=0.4).code == "collapsed"
    # not significant: never a collapse
    assert decide(figs(**dict(rise, pair_p=0.2), baseline_post=0.45)).code == "none"


def test_verdict_worsened_and_nan():
    down = dict(pair_post=0.30, pair_p=1e-5, margin_change_lo=-0.08, margin_change_hi=-0.02)
    assert decide(figs(**down, p1_gained=1, p1_lost=30, p1_p=1e-7)).code == "worsened"
    assert decide(figs(**down, p1_gained=1, p1_lost=3, p1_p=0.6)).code == "none"
    nan = float("nan")
    assert decide(figs(pair_p=nan, margin_change_lo=nan, margin_change_hi=nan)).code == "none"
