"""Markdown and text tables, rendered from results only (never from a model).

Each function takes a stage's result object (or the plain records a stage saved) and returns
text; the stage modules call these to write their ``.md`` files, and their result classes offer
them as methods (``EvalResult.markdown()``, ``ScanResult.table()``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tli.stats import format_p
from tli.verdict import retrieval_items

if TYPE_CHECKING:
    from tli.evaluate import EvalResult
    from tli.probe import ProbeConfig, ProbeResult
    from tli.scan import ScanResult
    from tli.sweep import Grid


# --- small formatters ----------------------------------------------------------------------------

def _applied(adapter: dict) -> str:
    """How the evaluation applied the adapter, in words (older results: merged)."""
    if str(adapter.get("applied", "merged")).startswith("unmerged"):
        return "attached unmerged (the base is quantized: merging would re-quantize it)"
    return "merged"


def _signed_percent(value: float) -> str:
    """A change already in percent, signed, e.g. -18.43%."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.2f}%"


def _num(value: float, spec: str) -> str:
    """A number, or n/a for NaN and inf/-inf for infinities."""
    if value is None or math.isnan(value):
        return "n/a"
    return format(value, spec) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _md(text: str) -> str:
    """Text for a Markdown table cell (pipes escaped)."""
    return text.replace("|", "\\|")


def retrieval_name(kind: str, languages: Sequence[str]) -> str:
    """A retrieval kind in the run's languages, e.g. ``s2t_nn`` -> ``Swahili→English NN``.

    ``t2s_centered`` -> ``English→Swahili centred NN``.
    """
    direction, _, method = kind.partition("_")
    a, b = languages if direction == "s2t" else tuple(languages)[::-1]
    return f"{a}→{b} {_METHOD_NAMES.get(method, method.upper())}".rstrip()


#: How each retrieval method is named in tables.
_METHOD_NAMES = {"nn": "NN", "csls": "CSLS", "centered": "centred NN"}


def _cell(text: str) -> str:
    """Text for one Markdown table cell: pipes escaped, line breaks as <br>, never empty."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "")
    text = text.replace("<", "&lt;").replace("\n", "<br>")
    return text if text.strip() else "(empty)"


def _share(k: int, n: int) -> str:
    """``k/n (x.x%)``."""
    return f"{k}/{n} ({100 * k / n:.1f}%)" if n else "n/a"


def p_at_1_ci(share: float, n: int, level: float = 0.95) -> str:
    """A P@1 with its Wilson interval, e.g. ``0.0526 [0.0227, 0.1173]``."""
    from tli.stats import wilson_interval

    if share is None or not math.isfinite(share) or not n:
        return "n/a"
    lo, hi = wilson_interval(int(round(share * n)), int(n), level)
    return f"{share:.4f} [{lo:.4f}, {hi:.4f}]"


def _p1_short(share: float, n: int, level: float = 0.95) -> str:
    """A P@1 with its Wilson interval in three decimals, e.g. ``0.053 [0.023, 0.117]``."""
    from tli.stats import wilson_interval

    if share is None or not math.isfinite(share) or not n:
        return "n/a"
    lo, hi = wilson_interval(int(round(share * n)), int(n), level)
    return f"{share:.3f} [{lo:.3f}, {hi:.3f}]"


def _signed(value: float, spec: str) -> str:
    """A signed number in ``spec``, or n/a."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+{spec}}"


def scores_line(
    scores: Sequence[Mapping[str, Any]], cfg: ProbeConfig, languages: Sequence[str]
) -> str:
    """One line of scored word translation per set and direction, for reports."""
    parts = []
    for name in dict.fromkeys(s["set"] for s in scores):
        cells = []
        for s in (s for s in scores if s["set"] == name):
            cells.append(
                f"{s['direction']} {_percent(s['base_acc'])} -> {_percent(s['tuned_acc'])} "
                f"(+{s['gained']}/-{s['lost']}, McNemar p = {format_p(s['p'])})"
            )
        parts.append(f"{name} " + ", ".join(cells))
    return (
        f"Word translation ({cfg.shots}-shot, exact match, base -> tuned; s2t = "
        f"{languages[0]} -> {languages[1]}): " + "; ".join(parts) + "."
    )


def _percent(share: float) -> str:
    """A share as a percentage with one decimal, e.g. 0.125 -> 12.5%."""
    return "n/a" if share is None or not math.isfinite(share) else f"{100 * share:.1f}%"


# --- scan -------------------------------------------------------------------------------------


def scan_table(result: ScanResult, *, with_warnings: bool = True) -> str:
    """A short plain-text summary: one block per set, then the choice and the warnings."""
    src, tgt = result.languages
    lines = [
        f"scan of {result.model} ({src} → {tgt}): layers {result.layers[0]}.."
        f"{result.layers[-1]} (0 = embeddings, {result.num_layers} = final), pooling "
        f"{result.config.pooling}; P@1: {src} → {tgt} retrieval"
    ]
    pct = int(round(result.config.level * 100))
    for set_name, s in result.sets.items():
        chance = s["chance_p_at_1_s2t"][0]
        lines += [
            "",
            f"{set_name} ({result.n_pairs[set_name]} pairs; P@1 chance {chance:.4f})",
            f"{'layer':>5}  {'pair cos':>8}  {'baseline':>8}  "
            f"{f'margin [{pct}% CI]':>27}  {f'P@1 nn [{pct}% Wilson]':>20}  "
            f"{'P@1 csls':>20}  {'P@1 centred':>20}",
        ]
        n = result.n_pairs[set_name]
        centred = s.get("p_at_1_s2t_centered")  # absent in scans of older tli versions
        for i, layer in enumerate(result.layers):
            mark = "*" if layer == result.chosen_layer else " "
            mark = "+" if layer == result.next_best_layer else mark
            p1 = [s["p_at_1_s2t_nn"][i], s["p_at_1_s2t_csls"][i]]
            p1.append(centred[i] if centred else math.nan)
            lines.append(
                f"{layer:>4}{mark}  {s['pair_mean'][i]:8.4f}  {s['baseline'][i]:8.4f}  "
                f"{s['margin'][i]:+8.4f} [{s['margin_lo'][i]:+8.4f}, {s['margin_hi'][i]:+8.4f}]"
                + "".join(f"  {_p1_short(p, n, result.config.level):>20}" for p in p1)
            )
    key, sel = result.select_metric, result.select_set
    lines += [
        "",
        f"chosen layer (*): {result.chosen_layer}, by {result.config.select_by} "
        f"({key} on {sel} = {result.value(sel, key, result.chosen_layer):.4f})",
    ]
    if result.next_best_layer is not None:
        lines.append(
            f"next best (+): {result.next_best_layer} "
            f"({key} = {result.value(sel, key, result.next_best_layer):.4f})"
        )
    lines += [f"note: {n}" for n in result.notes]
    if result.yardsticks:
        lines += ["", *yardstick_text(result.yardsticks, result.layers, result.config.level)]
    if with_warnings:
        lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


# --- frozen yardsticks ------------------------------------------------------------------------


def _yard_cell(figures: Mapping[str, Any], key: str, i: int) -> str:
    """``0.095 [0.051, 0.170]`` of yardstick ``key`` (``<dir>_<yardstick>``) at index i."""
    p = figures.get(f"p_at_1_{key}")
    if not p:
        return "absent"
    return (
        f"{p[i]:.3f} [{figures[f'p_at_1_{key}_lo'][i]:.3f}, {figures[f'p_at_1_{key}_hi'][i]:.3f}]"
    )


def _best_text(yard: Mapping[str, Any], name: str, direction: str, layers: list[int]) -> str:
    """``Procrustes + CSLS at layer 14: 0.095 [0.051, 0.170] (9/95), MRR 0.160``, or absent."""
    from tli.yardsticks import best

    top = best(yard, name, direction, layers)
    if top is None:
        return "absent"
    n = top["hits"] / top["p_at_1"] if top["p_at_1"] else None
    count = f"{top['hits']}/{round(n)}" if n else f"{top['hits']} hits"
    return (
        f"{top['name']} at layer {top['layer']}: {top['p_at_1']:.3f} [{top['lo']:.3f}, "
        f"{top['hi']:.3f}] ({count}), MRR {top['mrr']:.3f}"
    )


def yardstick_text(yard: Mapping[str, Any], layers: list[int], level: float = 0.95) -> list[str]:
    """The frozen yardsticks as plain-text lines: s→t P@1 per layer and set, the best of each.

    Args:
        yard: :func:`tli.yardsticks.frozen_yardsticks` (as saved).
        layers: The layer of each value.
        level: Coverage of the Wilson intervals (for the header).
    """
    from tli.yardsticks import YARDSTICKS

    pct = int(round(level * 100))
    heads = {
        "procrustes_nn": "Procrustes NN",
        "procrustes_csls": "Procrustes CSLS",
        "procrustes_centered": "Procrustes centred",
        "centered": "centred, no map",
    }
    fit = (
        f"Procrustes fitted on the {yard.get('n_fit')} {yard.get('fit_set')} pairs"
        if yard.get("fit_set")
        else "no Procrustes map"
    )
    lines = [f"frozen yardsticks ({fit}; P@1 s→t [{pct}% Wilson])"]
    for name, figures in (yard.get("sets") or {}).items():
        tag = (
            " (in-sample: the map was fitted on these pairs)"
            if name in yard.get("in_sample", [])
            else ""
        )
        lines += [
            "",
            f"{name}{tag}",
            f"{'layer':>5}" + "".join(f"  {heads[k]:>22}" for k in YARDSTICKS),
        ]
        for i, layer in enumerate(layers):
            lines.append(
                f"{layer:>5}"
                + "".join(f"  {_yard_cell(figures, f's2t_{k}', i):>22}" for k in YARDSTICKS)
            )
        for direction, arrow in (("s2t", "s→t"), ("t2s", "t→s")):
            lines.append(f"best {arrow}: {_best_text(yard, name, direction, layers)}")
    for what, why in (yard.get("absent") or {}).items():
        lines.append(f"yardstick absent ({what}): {why}")
    return lines


def yardstick_markdown(
    yard: Mapping[str, Any],
    layers: list[int],
    final_layer: int,
    *,
    adapter: Mapping[str, Any] | None = None,
) -> str:
    """The frozen yardsticks as Markdown: per set and direction the best and the final layer.

    Args:
        yard: :func:`tli.yardsticks.frozen_yardsticks` (as saved).
        layers: The layer of each value.
        final_layer: N, whose values get their own columns.
        adapter: Optional set name -> direction -> ``(p_at_1, n)`` of the adapter's final-layer
            centred retrieval, shown beside the yardsticks.
    """
    from tli.yardsticks import YARDSTICK_NAMES, YARDSTICKS

    i = layers.index(final_layer)
    head = (
        "| Set | Direction | Best frozen yardstick (any layer) "
        + "".join(f"| {YARDSTICK_NAMES[k]}, layer {final_layer} " for k in YARDSTICKS)
        + ("| Adapter, centred NN, layer " + str(final_layer) + " " if adapter else "")
        + "|"
    )
    cols = 3 + len(YARDSTICKS) + (1 if adapter else 0)
    lines = [head, "|" + "---|" * cols]
    for name, figures in (yard.get("sets") or {}).items():
        tag = " (in-sample)" if name in yard.get("in_sample", []) else ""
        for direction, arrow in (("s2t", "s→t"), ("t2s", "t→s")):
            extra = ""
            if adapter:
                p, n = adapter.get(name, {}).get(direction, (math.nan, 0))
                extra = f"| {_p1_short(p, n)} "
            lines.append(
                f"| {name}{tag} | {arrow} | {_md(_best_text(yard, name, direction, layers))} "
                + "".join(f"| {_yard_cell(figures, f'{direction}_{k}', i)} " for k in YARDSTICKS)
                + extra
                + "|"
            )
    absent = [f"- absent ({what}): {why}" for what, why in (yard.get("absent") or {}).items()]
    return "\n".join(lines + ([""] + absent if absent else []))


#: Under the yardstick table: what the yardsticks are.
YARDSTICK_NOTE = (
    "Frozen yardsticks: what the base model's own states retrieve without training. Procrustes: "
    "each list unit-normed, mean-centred and unit-normed again, then the orthogonal map W = U V^T "
    "from the SVD of X^T Y, fitted on the trained pairs only (MUSE's supervised refinement) and "
    "scored by nearest neighbour, CSLS and centred nearest neighbour; on the trained set it is "
    "in-sample. Centred NN, no map: each side's mean subtracted, no training at all. The best is "
    "the maximum over every layer and yardstick, chosen on the scored set itself, so it is an "
    "optimistic yardstick. P@1 with its Wilson interval."
)


# --- evaluation -------------------------------------------------------------------------------


def layer_name(result: EvalResult, layer: int) -> str:
    """A layer index with its roles: trained, final, embeddings."""
    tags = []
    if layer == result.target_layer:
        tags.append("trained")
    if layer == result.num_layers:
        tags.append("final")
    if layer == 0:
        tags.append("embeddings")
    return f"{layer} ({', '.join(tags)})" if tags else str(layer)


def table1(result: EvalResult, layer: int | None = None) -> str:
    """Table 1 in the paper's columns, plus baseline, margin and P@1 (Markdown)."""
    i = result.index(layer)
    kind = result.config.verdict_retrieval
    pct = int(round(result.config.level * 100))
    head = (
        "| Set | N | Pre mean (std) | Post mean (std) | Abs. change | % change | t | p "
        f"| Baseline pre → post | Margin pre → post | Margin change [{pct}% CI] "
        f"| P@1 {retrieval_name(kind, result.languages)} pre → post [{pct}% Wilson] "
        "| McNemar p |"
    )
    lines = [head, "|" + "---|" * 13]
    for name, s in result.sets.items():
        pre, post, ch, bt = s["pre"], s["post"], s["change"], s["bootstrap"]
        test = s["p_at_1_tests"][kind]
        lines.append(
            f"| {name} | {s['n']} | {ch['pre_mean'][i]:.4f} ({ch['pre_std'][i]:.4f}) "
            f"| {ch['post_mean'][i]:.4f} ({ch['post_std'][i]:.4f}) "
            f"| {ch['abs_change'][i]:+.4f} | {_signed_percent(ch['pct_change'][i])} "
            f"| {_num(ch['t'][i], '.2f')} | {format_p(ch['p'][i], ch['log10_p'][i])} "
            f"| {pre['baseline'][i]:.4f} → {post['baseline'][i]:.4f} "
            f"| {pre['margin'][i]:+.4f} → {post['margin'][i]:+.4f} "
            f"| {bt['margin_change'][i]:+.4f} [{bt['margin_change_lo'][i]:+.4f}, "
            f"{bt['margin_change_hi'][i]:+.4f}] "
            f"| {p_at_1_ci(pre[f'p_at_1_{kind}'][i], s['n'], result.config.level)} → "
            f"{p_at_1_ci(post[f'p_at_1_{kind}'][i], s['n'], result.config.level)} "
            f"| {format_p(test['p'][i])} |"
        )
    return "\n".join(lines)


def findings_table(result: EvalResult, layer: int | None = None) -> str:
    """The verdict's findings and collapse flag per set at one layer (Markdown)."""
    i = result.index(layer)
    cfg = result.config
    pct = int(round(cfg.level * 100))
    kind = cfg.verdict_retrieval
    lines = [
        f"| Set | N | Geometry: margin change [{pct}% CI] | detects | "
        f"Retrieval: P@1 {retrieval_name(kind, result.languages)} (+gained/−lost, McNemar p) "
        "| detects | Collapse flag | Headline |",
        "|" + "---|" * 8,
    ]
    for name, s in result.sets.items():
        v = result.verdict(name, layer)
        bt, test, n = s["bootstrap"], s["p_at_1_tests"][kind], s["n"]
        lo, hi = bt["margin_change_lo"][i], bt["margin_change_hi"][i]
        half = (hi - lo) / 2 if math.isfinite(lo) and math.isfinite(hi) else math.nan
        items = retrieval_items(n, alpha=cfg.alpha, min_effect=cfg.min_effect)
        g_detect = _num(max(half, cfg.min_effect) if math.isfinite(half) else half, ".4f")
        r_detect = f"≥ {items} gained, none lost" if items is not None else "nothing at this n"
        pre, post = s["pre"][f"p_at_1_{kind}"][i], s["post"][f"p_at_1_{kind}"][i]
        lines.append(
            f"| {name} | {n} | **{v.geometry or '?'}**: {bt['margin_change'][i]:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] | > {g_detect} "
            f"| **{v.retrieval or '?'}**: {pre:.4f} → {post:.4f} (+{test['gained'][i]}/"
            f"−{test['lost'][i]}, p = {format_p(test['p'][i])}) | {r_detect} "
            f"| {'**raised**' if v.collapse else 'not raised'} | {_md(v.label)} |"
        )
    return "\n".join(lines)


def retrieval_table(result: EvalResult, layer: int | None = None) -> str:
    """P@1 (Wilson interval) and MRR of every retrieval variant per set at one layer (Markdown).

    Nearest neighbour, CSLS and nearest neighbour after mean-centring each side, both directions,
    with McNemar's test of the per-query hits; the verdict's variant is marked.
    """
    from tli.metrics import RETRIEVALS

    i = result.index(layer)
    level = result.config.level
    pct = int(round(level * 100))
    lines = [
        f"| Set | Retrieval | P@1 pre [{pct}% Wilson] | P@1 post [{pct}% Wilson] "
        "| +gained/−lost | McNemar p | MRR pre → post |",
        "|" + "---|" * 7,
    ]
    for name, s in result.sets.items():
        for kind in RETRIEVALS:
            key = f"p_at_1_{kind}"
            if key not in s["pre"]:
                continue  # an evaluation of an older tli (no centred retrieval)
            direction, method = kind.split("_")
            test = s["p_at_1_tests"][kind]
            mark = " (verdict)" if kind == result.config.verdict_retrieval else ""
            lines.append(
                f"| {name} | {retrieval_name(kind, result.languages)}{mark} "
                f"| {p_at_1_ci(s['pre'][key][i], s['n'], level)} "
                f"| {p_at_1_ci(s['post'][key][i], s['n'], level)} "
                f"| +{test['gained'][i]}/−{test['lost'][i]} | {format_p(test['p'][i])} "
                f"| {s['pre'][f'mrr_{kind}'][i]:.4f} → {s['post'][f'mrr_{kind}'][i]:.4f} |"
            )
    return "\n".join(lines)


def layer_table(result: EvalResult, set_name: str) -> str:
    """One set at every layer (Markdown); the training and final layers are marked."""
    s = result.sets[set_name]
    pre, post, ch, bt = s["pre"], s["post"], s["change"], s["bootstrap"]
    nn, csls, centred = (
        retrieval_name(k, result.languages) for k in ("s2t_nn", "s2t_csls", "s2t_centered")
    )
    lines = [
        "| Layer | Pre | Post | Change | t | p | Baseline pre → post | Margin pre → post "
        f"| Margin change [CI] | P@1 {nn} pre → post [Wilson] | P@1 {csls} pre → post "
        f"| P@1 {centred} pre → post | Verdict |",
        "|" + "---|" * 13,
    ]
    n, level = s["n"], result.config.level

    def p1(state: Mapping[str, Any], kind: str, i: int) -> str:
        key = f"p_at_1_s2t_{kind}"
        return _p1_short(state[key][i], n, level) if key in state else "n/a"

    for i, layer in enumerate(result.layers):
        lines.append(
            f"| {layer_name(result, layer)} | {pre['pair_mean'][i]:.4f} "
            f"| {post['pair_mean'][i]:.4f} | {ch['abs_change'][i]:+.4f} "
            f"| {_num(ch['t'][i], '.2f')} | {format_p(ch['p'][i], ch['log10_p'][i])} "
            f"| {pre['baseline'][i]:.4f} → {post['baseline'][i]:.4f} "
            f"| {pre['margin'][i]:+.4f} → {post['margin'][i]:+.4f} "
            f"| {bt['margin_change'][i]:+.4f} [{bt['margin_change_lo'][i]:+.4f}, "
            f"{bt['margin_change_hi'][i]:+.4f}] "
            + "".join(f"| {p1(pre, k, i)} → {p1(post, k, i)} " for k in ("nn", "csls", "centered"))
            + f"| {s['verdicts'][i]['code']} |"
        )
    return "\n".join(lines)


def table2(result: EvalResult, set_name: str) -> str:
    """Table 2: per-pair examples of one set at the final layer (Markdown)."""
    i = result.index()
    pre, post = result.cosines[set_name]["pre"][i], result.cosines[set_name]["post"][i]
    pairs = result.pairs[set_name]
    titles = {
        "gains": "Largest gains (largest changes)",
        "losses": "Largest losses (smallest changes)",
        "random": f"Random sample (seed {result.config.seed})",
    }
    out = []
    for kind, title in titles.items():
        rows = result.examples[set_name][kind]
        out += [
            f"**{title}**",
            "",
            f"| {_md(result.languages[0])} | {_md(result.languages[1])} | Pre | Post | Change |",
            "|---|---|---|---|---|",
        ]
        for j in rows:
            out.append(
                f"| {_md(pairs[j][0])} | {_md(pairs[j][1])} | {pre[j]:.3f} | {post[j]:.3f} "
                f"| {post[j] - pre[j]:+.3f} |"
            )
        out.append("")
    return "\n".join(out).rstrip()


def eval_markdown(result: EvalResult) -> str:
    """``evaluation.md``: verdicts, findings, Table 1 (final, every layer), retrieval, Table 2."""
    cfg, n = result.config, result.num_layers
    kind = cfg.verdict_retrieval
    trained_at = (
        f"trained at layer {result.target_layer}"
        if result.target_layer is not None
        else "training layer unknown (no tli_adapter.json)"
    )
    chance = ", ".join(
        f"{name} {s['pre'][f'chance_p_at_1_{kind[:3]}'][0]:.4f}" for name, s in result.sets.items()
    )
    src, tgt = result.languages
    lines = [
        f"# Evaluation: `{result.model['name']}` + adapter `{result.adapter['dir']}`",
        "",
        f"Language pair: {src} → {tgt}.",
        "",
        f"Base model ({result.model['model_type']}, {n} layers; layer 0 = input embeddings, "
        f"{n} = final) vs. the same model with the adapter {_applied(result.adapter)} "
        f"({trained_at}). "
        f"Pooling {cfg.pooling}; {cfg.n_boot} bootstrap resamples (seed {cfg.seed}), "
        f"{int(round(cfg.level * 100))}% intervals; significance level {cfg.alpha}; smallest "
        f"change named {cfg.min_effect}; P@1 chance level: {chance}. How to read this: "
        "docs/evaluation.md.",
        "",
        f"## Verdicts at the final layer ({n})",
        "",
        *[f"- {line}" for line in result.summary_lines()],
        "",
        findings_table(result),
        "",
        FINDINGS_NOTE,
    ]
    if result.target_layer is not None and result.target_layer != n:
        lines += [
            "",
            f"At the training layer ({result.target_layer}):",
            "",
            *[f"- {line}" for line in result.verdict_lines(result.target_layer)],
            "",
            findings_table(result, result.target_layer),
        ]
    if result.warnings:
        lines += ["", "Warnings:", "", *[f"- {w}" for w in result.warnings]]
    lines += [
        "",
        "## Do no harm: perplexity on everyday texts",
        "",
        perplexity_table(result.perplexity),
    ]
    if result.yardsticks:
        lines += [
            "",
            "## Frozen yardsticks: what the base model retrieves without training",
            "",
            yardstick_markdown(
                result.yardsticks, result.layers, n, adapter=adapter_retrieval(result)
            ),
            "",
            YARDSTICK_NOTE,
        ]
    lines += [
        "",
        f"## Table 1: translation-pair cosine at the final layer ({n})",
        "",
        table1(result),
        "",
        "Mean (std) of the per-pair cosine; change = post - pre; t and p: paired t-test "
        "(p in log space when it underflows); baseline: mean cosine of the mismatched "
        "pairs of the same lists; margin: pairs - baseline, with the paired bootstrap CI of "
        f"its change; P@1 {retrieval_name(kind, result.languages)}: retrieval with its Wilson "
        "interval, McNemar exact test of the per-query hits.",
        "",
        f"## Retrieval at the final layer ({n})",
        "",
        retrieval_table(result),
        "",
        RETRIEVAL_NOTE,
    ]
    for name in result.sets:
        lines += ["", f"## Table 1 at every layer: {name}", "", layer_table(result, name)]
    for name in result.sets:
        lines += [
            "",
            f"## Table 2: per-pair examples at the final layer ({n}): {name}",
            "",
            table2(result, name),
        ]
    return "\n".join(lines) + "\n"


def adapter_retrieval(result: EvalResult, layer: int | None = None) -> dict[str, dict]:
    """Set -> direction -> ``(P@1, n)`` of centred NN retrieval after training, at one layer."""
    i = result.index(layer)
    return {
        name: {
            d: (s["post"].get(f"p_at_1_{d}_centered", [math.nan] * (i + 1))[i], s["n"])
            for d in ("s2t", "t2s")
        }
        for name, s in result.sets.items()
    }


def perplexity_table(harm: Mapping[str, Any]) -> str:
    """The do-no-harm check as Markdown: per text set the perplexities and the change."""
    if not harm or not harm.get("enabled"):
        why = (harm or {}).get("reason") or "not measured by this evaluation"
        return f"Not measured: {why}."
    first = next(iter(harm["sets"].values()), {})
    pct = int(round(100 * first.get("level", 0.95)))
    lines = [
        "| Texts | Sentences | Tokens | Base perplexity | Adapted perplexity "
        f"| Change [{pct}% paired bootstrap CI] | Source |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in harm["sets"].values():
        lines.append(
            f"| {_md(r['name'])} | {r['n_sentences']} | {r['n_tokens']} | {r['base']:.2f} "
            f"| {r['tuned']:.2f} | {100 * r['change']:+.1f}% [{100 * r['lo']:+.1f}, "
            f"{100 * r['hi']:+.1f}] | {_md(r['source'])} |"
        )
    lines += [
        "",
        "Per-token perplexity of each sentence set, scored sentence by sentence with the "
        "tokenizer's special tokens; the change is adapted / base - 1, its interval a paired "
        "percentile bootstrap over sentences. An interval containing 0 does not show that there "
        "is no harm, only that this check cannot see harm of that size (docs/perplexity.md).",
    ]
    return "\n".join(lines)


#: Under the findings table: what the columns mean.
FINDINGS_NOTE = (
    "Geometry: the margin change with its paired bootstrap CI (rose / fell when the CI excludes 0 "
    "and the change is at least the smallest change named); *detects*: the CI's half-width, the "
    "change this n could tell from 0. Retrieval: McNemar's exact test on the per-query top-1 "
    "hits; *detects*: the fewest hits gained, none lost, that reach p < alpha. Collapse flag: "
    "the pair cosine rose significantly, the baseline rose by at least the collapse ratio of "
    "that rise, and the margin CI is not above 0. The headline is a fixed function of the two "
    "findings and the flag (docs/evaluation.md)."
)

#: Under the retrieval table: what the variants are.
RETRIEVAL_NOTE = (
    "NN: nearest neighbour by cosine; CSLS: cross-domain similarity local scaling (k from the "
    "config); centred NN: nearest neighbour after subtracting each side's mean vector over its "
    "own list (MUSE). A hit on any listed alternative counts; ties count against the query."
)


# --- probe ------------------------------------------------------------------------------------


def rank_markdown(rank: Mapping[str, Any], max_items: int = 40) -> str:
    """``probe_rank.md``: the LM-ranking yardstick per set and direction, and some items."""
    cfg = rank["config"]
    lines = [
        f"# LM ranking: {rank['model'].get('name', '?')} ranks every candidate translation",
        "",
        f"Each item gets the {cfg['shots']}-shot prompt of the scored translation (shots from the "
        "trained set, never the item or a related pair); every translation of the set is a "
        "candidate, scored by its mean token log-probability as the continuation. Raw ranks by "
        f"that score; calibrated subtracts each candidate's score after the content-free word "
        "'N/A' (Zhao et al. 2021). P@1 with its 95% Wilson interval; ties count against the item. "
        "The base model, no adapter. How to read it: docs/probe.md.",
        "",
        "| Set | Direction | Items | Candidates | P@1 raw | P@1 calibrated | MRR raw "
        "| MRR calibrated | Chance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rank["scores"]:
        lines.append(
            f"| {r['set']} | {r['direction']} | {r['n']} | {r['n_candidates']} "
            f"| {r['p_at_1_raw']:.3f} [{r['p_at_1_raw_lo']:.3f}, {r['p_at_1_raw_hi']:.3f}] "
            f"({r['hits_raw']}) | {r['p_at_1_calibrated']:.3f} [{r['p_at_1_calibrated_lo']:.3f}, "
            f"{r['p_at_1_calibrated_hi']:.3f}] ({r['hits_calibrated']}) | {r['mrr_raw']:.3f} "
            f"| {r['mrr_calibrated']:.3f} | {r['chance']:.4f} |"
        )
    lines += [
        "",
        f"## Items (first {max_items})",
        "",
        "| Set | Direction | Word | Top raw (rank of gold) | Top calibrated (rank of gold) |",
        "|---|---|---|---|---|",
    ]
    for item in rank["items"][:max_items]:
        lines.append(
            f"| {item['set']} | {item['direction']} | {_cell(item['word'])} "
            f"| {_cell(item['top_raw'])} ({item['rank_raw']}) "
            f"| {_cell(item['top_calibrated'])} ({item['rank_calibrated']}) |"
        )
    return "\n".join(lines) + "\n"


def rank_line(rank: Mapping[str, Any]) -> str:
    """One line of the LM ranking for a report."""
    parts = [
        f"{r['set']} {r['direction']} P@1 {r['p_at_1_raw']:.3f} raw, "
        f"{r['p_at_1_calibrated']:.3f} calibrated ({r['hits_raw']} and {r['hits_calibrated']} "
        f"of {r['n']}; {r['n_candidates']} candidates)"
        for r in rank["scores"]
    ]
    return f"LM ranking ({rank['config']['shots']}-shot, base model): " + "; ".join(parts) + "."


def probe_markdown(result: ProbeResult) -> str:
    """``probe.md``: one table row per prompt."""
    data = result.probe_json()
    lines = [
        f"# Probe: {result.model.get('name', '?')} with adapter `{result.adapter.get('dir', '?')}`",
        "",
        f"Greedy decoding, at most {result.config.max_new_tokens} new tokens; the same prompt "
        f"for both models. The tuned output differs from the base output in "
        f"{data['n_changed']} of {data['n_prompts']} prompts.",
        "",
        "| set | template | prompt | base output | tuned output |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result.rows:
        mark = "" if r["base"] != r["tuned"] else " (same)"
        lines.append(
            f"| {r['set']} | {r['template']} | {_cell(r['prompt'])} | {_cell(r['base'])} | "
            f"{_cell(r['tuned'])}{mark} |"
        )
    if result.warnings:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in result.warnings]]
    return "\n".join(lines) + "\n"


def score_table(result: ProbeResult) -> str:
    """The scores as a Markdown table: one row per set and direction."""
    lines = [
        "| set | direction | n | exact base | exact tuned | change | lost | gained | "
        "McNemar p | chrF base | chrF tuned | chrF change |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in result.scores:
        lines.append(
            f"| {s['set']} | {result.direction_name(s['direction'])} | {s['n']} | "
            f"{_share(s['base'], s['n'])} | {_share(s['tuned'], s['n'])} | "
            f"{_signed(100 * s['acc_change'], '.1f')} pt | {s['lost']} | {s['gained']} | "
            f"{format_p(s['p'])} | {s['base_chrf']:.1f} | {s['tuned_chrf']:.1f} | "
            f"{_signed(s['chrf_change'], '.1f')} |"
        )
    return "\n".join(lines)


def scores_markdown(result: ProbeResult, max_examples: int = 30) -> str:
    """``probe_scores.md``: the table, how it was computed, the items whose hit changed."""
    cfg = result.config
    example = next((i["prompt"] for i in result.items), "")
    cut_base = sum(s["base_cut"] for s in result.scores)
    cut_tuned = sum(s["tuned_cut"] for s in result.scores)
    lines = [
        f"# Scored word translation: {result.model.get('name', '?')}, base vs. adapter "
        f"`{result.adapter.get('dir', '?')}`",
        "",
        score_table(result),
        "",
        f"Few-shot prompts with {cfg.shots} shots drawn from the trained set only, never the "
        "item itself nor a pair sharing its source or a translation; the same prompt for "
        f"both models; greedy decoding, at most {cfg.score_max_new_tokens} new tokens. The "
        "answer is the first non-blank line of the output, NFC, lower-cased, with "
        "punctuation and quotes stripped from its ends. *Exact*: the answer equals the gold "
        "translation or a listed alternative (target -> source: any source listing that "
        "translation), normalised the same way. *lost* / *gained*: items right before and "
        "wrong after, and the reverse; McNemar's exact two-sided test on them. *chrF*: "
        "sacrebleu sentence chrF (char 6-grams, beta 2) of the normalised answer against "
        "the best gold string, averaged. An answer whose line the token limit cut (no line "
        "break, no end of text) counts as a miss"
        + (
            f" ({cut_base} base, {cut_tuned} tuned)."
            if cut_base or cut_tuned
            else " (there were none)."
        ),
        "",
        "Example prompt:",
        "",
        "```",
        example,
        "```",
    ]
    changed = [i for i in result.items if i["base_hit"] != i["tuned_hit"]]
    lines += ["", f"## Items whose hit changed ({len(changed)})", ""]
    if changed:
        lines += [
            "| set | direction | word | gold | base answer | tuned answer |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for i in changed[:max_examples]:
            lines.append(
                f"| {i['set']} | {i['direction']} | {_cell(i['word'])} | "
                f"{_cell('; '.join(i['gold']))} | {_cell(i['base_answer'])} | "
                f"{_cell(i['tuned_answer'])} |"
            )
        if len(changed) > max_examples:
            lines += ["", f"... and {len(changed) - max_examples} more in probe_scores.json."]
    else:
        lines.append("None.")
    if result.warnings:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in result.warnings]]
    return "\n".join(lines) + "\n"


def probe_summary(result: ProbeResult) -> str:
    """One line for a report: the scores when scored, else how many outputs changed."""
    if result.scored:
        return scores_line(result.scores, result.config, result.languages)
    data = result.probe_json()
    return (
        f"Probe: the tuned output differs from the base output in {data['n_changed']} of "
        f"{data['n_prompts']} prompts (no scored translation)."
    )


# --- sweep ------------------------------------------------------------------------------------


def label(value: Any) -> str:
    """A grid value as text (lists joined by +)."""
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)


def _ci(v: Sequence[float], spec: str = ".3f") -> str:
    """``mean [lo, hi]``."""
    return f"{v[0]:{spec}} [{v[1]:{spec}}, {v[2]:{spec}}]"


def sweep_markdown(
    summary: Sequence[Mapping[str, Any]], base: Mapping[str, Any], grid: Grid
) -> str:
    """The ranked table (sweep.md).

    With a validation split the rows are ranked by the validation figure, and columns for the
    validation and trained sets (centred P@1) and the perplexity changes come first.
    """
    axes = [a for a in grid.axes if a != "seed"]
    validation = bool(summary) and "validation_p_at_1_s2t_centered" in summary[0]
    trained = bool(summary) and "trained_p_at_1_s2t_centered" in summary[0]
    ppl = [c for c in ("sw", "en") if summary and f"ppl_{c}" in summary[0]]
    lines = [
        f"# Sweep: {len(grid.cells)} cells on {base['model']} ({base['pooling']} pooling)",
        "",
        f"Control set ({base['control']} pairs, never trained), final layer {base['num_layers']}."
        " Each row: mean over seeds [95% t-interval over seeds]; `worst margin lo` is the lowest"
        " per-seed bootstrap lower bound of the margin (> 0: every seed's margin CI excludes 0).",
        "",
    ]
    if validation:
        lines += [
            f"Ranked by `{grid.sweep.metric}` on the validation split: "
            f"{base.get('validation', '?')} of the trained pairs held out of training "
            f"(`validation = {grid.sweep.validation}`, seed {grid.sweep.validation_seed}; "
            f"validation.tsv); the cells trained on the other {base['trained']}. The control "
            "columns are reported, not ranked by.",
            "",
        ]
    extra_head, extra_cols = "", 0
    if validation:
        extra_head += "| val P@1 centred "
        extra_cols += 1
    if trained:
        extra_head += "| trained P@1 centred "
        extra_cols += 1
    for code in ppl:
        extra_head += f"| ppl {code} "
        extra_cols += 1
    lines += [
        f"Base model: P@1 s2t NN {p_at_1_ci(base['p_at_1_s2t_nn'], base['control'])}, CSLS "
        f"{base['p_at_1_s2t_csls']:.3f}, centred NN "
        f"{p_at_1_ci(base['p_at_1_s2t_centered'], base['control'])} (95% Wilson),"
        f" margin {base['margin']:+.4f} [{base['margin_lo']:+.4f}, {base['margin_hi']:+.4f}],"
        f" pair cosine {base['pair_mean']:.3f}, baseline {base['baseline']:.3f}. `verdicts`:"
        " the headline codes over seeds (docs/evaluation.md); `collapse`: seeds whose collapse"
        " flag is raised.",
        "",
        "| rank | " + " | ".join(axes) + " | seeds " + extra_head + "| P@1 s2t NN | x base "
        "| P@1 s2t CSLS | P@1 s2t centred | P@1 t2s NN | margin | worst margin lo | pair cos "
        "| baseline | train s | verdicts | collapse |",
        "|" + "---|" * (len(axes) + 14 + extra_cols),
    ]
    for i, r in enumerate(summary, 1):
        ratio = f"{r['ratio_vs_base']:.1f}" if r["ratio_vs_base"] is not None else "-"
        extra = ""
        if validation:
            extra += f"{_ci(r['validation_p_at_1_s2t_centered'])} | "
        if trained:
            extra += f"{_ci(r['trained_p_at_1_s2t_centered'])} | "
        for code in ppl:
            extra += f"{_ci(tuple(100 * x for x in r[f'ppl_{code}']), '+.1f')}% | "
        lines.append(
            f"| {i} | "
            + " | ".join(label(r["axes"][a]) for a in axes)
            + f" | {r['seeds']} | {extra}{_ci(r['p_at_1_s2t_nn'])} | {ratio} | "
            f"{_ci(r['p_at_1_s2t_csls'])} | {_ci(r['p_at_1_s2t_centered'])} | "
            f"{_ci(r['p_at_1_t2s_nn'])} | "
            f"{_ci(r['margin'], '+.4f')} | {r['worst_margin_lo']:+.4f} | "
            f"{r['pair_mean'][0]:.3f} | {r['baseline'][0]:.3f} | {r['train_seconds']:.0f} | "
            f"{', '.join(r['verdicts'])} | {r['collapse_flags']}/{r['seeds']} |"
        )
    return "\n".join(lines) + "\n"


# --- compare ----------------------------------------------------------------------------------


def _f(value: float, spec: str) -> str:
    """A number, or n/a when it is missing (NaN)."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def compare_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The headline figures of runs or sweep cells side by side (one row per run and set).

    Args:
        records: :func:`tli.compare.load_compared`'s records (as saved in ``compare.json``).
    """
    lines = [
        "| Run | Set | Languages | N | Pair cosine pre → post | Baseline pre → post "
        "| Margin pre → post | Margin post [95% CI] | Margin change [95% CI] "
        "| P@1 pre → post [95% Wilson CI] | Verdict | Training s |",
        "|" + "---|" * 12,
    ]
    for r in records:
        src, tgt = r["languages"]
        for name, s in r["sets"].items():
            lo, hi = s["p1_post_ci"]
            lines.append(
                f"| {_md(r['name'])} | {name} | {_md(src)} → {_md(tgt)} | {s['n']} "
                f"| {_f(s['pair_pre'], '.4f')} → {_f(s['pair_post'], '.4f')} "
                f"| {_f(s['baseline_pre'], '.4f')} → {_f(s['baseline_post'], '.4f')} "
                f"| {_f(s['margin_pre'], '+.4f')} → {_f(s['margin_post'], '+.4f')} "
                f"| {_f(s['margin_post'], '+.4f')} [{_f(s['margin_lo'], '+.4f')}, "
                f"{_f(s['margin_hi'], '+.4f')}] "
                f"| {_f(s['margin_change'], '+.4f')} [{_f(s['margin_change_lo'], '+.4f')}, "
                f"{_f(s['margin_change_hi'], '+.4f')}] "
                f"| {_f(s['p1_pre'], '.4f')} → {_f(s['p1_post'], '.4f')} "
                f"[{_f(lo, '.3f')}, {_f(hi, '.3f')}] "
                f"({_md(retrieval_name(s.get('p1_retrieval', 's2t_nn'), r['languages']))}) "
                f"| {_md(s['verdict'])} | {_f(r['train_seconds'], '.0f')} |"
            )
    return "\n".join(lines)


def compare_markdown(records: Sequence[Mapping[str, Any]], figure: str | None = None) -> str:
    """``compare.md``: what was compared, the table, how to read it, and the figure."""
    lines = ["# Comparison", "", "| Run | Kind | Model | Details | Directory |", "|" + "---|" * 5]
    for r in records:
        lines.append(
            f"| {_md(r['name'])} | {r['kind']} | `{_md(str(r['model']))}` "
            f"| {_md(r['detail']) or '-'} | `{_md(r['path'])}` |"
        )
    lines += [
        "",
        compare_table(records),
        "",
        "At the final layer. Pair cosine: mean cosine of each source word with its "
        "translation; baseline: mean cosine of mismatched pairs from the same lists; margin: "
        "pairs - baseline, with its bootstrap CI and the paired bootstrap CI of its change; "
        "P@1: source → target retrieval among the set's targets (a listed alternative counts), "
        "by nearest neighbour after mean-centring each side (the verdict's default; plain "
        "nearest neighbour for results of a tli that lacked it, as each cell names), with the "
        "Wilson interval of the post value; verdict: tli's rules "
        "(docs/evaluation.md); training s: wall time of the training steps. A sweep cell holds "
        "the control set only.",
    ]
    if figure:
        lines += ["", f"![headline figures per run and set]({figure})"]
    return "\n".join(lines) + "\n"
