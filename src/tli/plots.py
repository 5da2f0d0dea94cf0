"""Figures, drawn from saved results only (never from a model).

Each figure function takes a result object or the directory it was saved in, so a figure can be
redrawn later (``tli plot DIR``) without loading a model or recomputing anything. Files are
written atomically; matplotlib runs on the Agg backend and every figure is closed.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tli.errors import TLIError, first_line

if TYPE_CHECKING:
    from tli.scan import ScanResult

#: Colours of the sets, in order of appearance (trained first).
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


@contextmanager
def _reading(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a damaged or foreign results file into a TLIError naming it.

    Wraps only the reading and unpacking of saved results (never the drawing): a missing
    key, a wrong type or an unparsable number there means the file is not what tli wrote.
    """
    try:
        yield
    except TLIError:
        raise
    except FileNotFoundError:
        raise TLIError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TLIError(f"{path}: cannot read: {first_line(err)}") from None
    except (KeyError, IndexError, TypeError, ValueError, csv.Error) as err:
        raise TLIError(
            f"{path}: not a tli result or damaged ({type(err).__name__}: {first_line(err)})"
        ) from None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Render a figure to PNG bytes and write them atomically; close the figure."""
    from tli.io import atomic_write_bytes

    plt = _pyplot()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_scan(result: ScanResult | str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Figure 1: the layer scan, with the controls the paper's figure lacked.

    Top panel: bars of the mean translation-pair cosine per layer and set (the paper's Fig. 1),
    the mismatched-pair baseline drawn over them, the chosen layer as a red dashed line, and
    retrieval P@1 (source -> target, nearest neighbour) with its chance level on a second y
    axis, beside the frozen yardsticks (:mod:`tli.yardsticks`: a Procrustes map fitted on the
    trained pairs, scored by CSLS; centred NN without a map). Bottom panel: the margin (pairs
    minus baseline) with its bootstrap CI, and the centred margin when the scan computed it.

    Args:
        result: A :class:`tli.scan.ScanResult`, or a scan directory to read it from.
        path: Where to write the PNG.

    Returns:
        ``path``.
    """
    from tli.scan import ScanResult

    if not isinstance(result, ScanResult):
        result = ScanResult.load(result)
    plt = _pyplot()
    layers = result.layers
    names = list(result.sets)
    src, tgt = result.languages
    colours = {n: _COLOURS[i % len(_COLOURS)] for i, n in enumerate(names)}
    width = 0.8 / len(names)
    offsets = {n: (i - (len(names) - 1) / 2) * width for i, n in enumerate(names)}

    fig, (ax, ax_m) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=(max(7.0, 0.42 * len(layers) + 3.5), 7.0),
        gridspec_kw={"height_ratios": [3, 1.5]},
        layout="constrained",
    )
    ax_p = ax.twinx()
    lowest = 0.0
    for n in names:
        s = result.sets[n]
        x = [layer + offsets[n] for layer in layers]
        label = f"{n} ({result.n_pairs.get(n, '?')} pairs)"
        ax.bar(
            x,
            s["pair_mean"],
            width=width * 0.95,
            color=colours[n],
            alpha=0.55,
            label=f"{label}: mean pair cosine",
        )
        half = width * 0.95 / 2
        ax.hlines(
            s["baseline"],
            [v - half for v in x],
            [v + half for v in x],
            color="black",
            linewidth=2,
            label="mismatched-pair baseline" if n == names[0] else None,
        )
        ax_p.plot(
            layers,
            s["p_at_1_s2t_nn"],
            color=colours[n],
            marker="o",
            markersize=3,
            linestyle=":",
            linewidth=1.2,
            label=f"{n}: P@1 {src}→{tgt} (NN)",
        )
        lowest = min(lowest, *s["pair_mean"], *s["baseline"])
    yard_sets = (result.yardsticks or {}).get("sets", {})
    yard_top = [0.0]
    for n in names:
        figures = yard_sets.get(n, {})
        for key, style, text in (
            ("p_at_1_s2t_procrustes_csls", "--", "frozen Procrustes + CSLS"),
            ("p_at_1_s2t_centered", "-", "frozen centred NN, no map"),
        ):
            in_sample = n in result.yardsticks.get("in_sample", [])
            if key in figures and not (in_sample and "procrustes" in key):
                # an in-sample map (fitted on this set) memorises it: its P@1 is in the
                # scan's table, not on this axis, where it would flatten every other line
                ax_p.plot(
                    layers,
                    figures[key],
                    color=colours[n],
                    marker="s" if "procrustes" in key else "^",
                    markersize=3,
                    linestyle=style,
                    linewidth=1.0,
                    alpha=0.8,
                    label=f"{n}: P@1 src→tgt, {text}",
                )
                yard_top.append(max(figures[key]))
    chance = {n: result.sets[n]["chance_p_at_1_s2t"][0] for n in names}
    for n in names:
        ax_p.axhline(
            chance[n],
            color=colours[n],
            linestyle="-.",
            linewidth=0.9,
            label=f"{n}: P@1 chance ({chance[n]:.4f})",
        )
    top_p = max(max(max(result.sets[n]["p_at_1_s2t_nn"]) for n in names), *yard_top)
    ax_p.set_ylim(0, max(0.05, 1.15 * top_p, 2 * max(chance.values())))
    ax_p.set_ylabel(f"P@1 ({src} → {tgt})")
    chosen = result.chosen_layer
    ax.axvline(
        chosen,
        color="red",
        linestyle="--",
        linewidth=1.5,
        label=f"chosen layer {chosen} (by {result.config.select_by})",
    )
    ax_m.axvline(chosen, color="red", linestyle="--", linewidth=1.5)
    ax.set_ylim(lowest - 0.05 if lowest < 0 else 0.0, 1.02)
    ax.set_ylabel("mean cosine")

    for n in names:
        s = result.sets[n]
        ax_m.fill_between(
            layers, s["margin_lo"], s["margin_hi"], color=colours[n], alpha=0.2, linewidth=0
        )
        ax_m.plot(
            layers,
            s["margin"],
            color=colours[n],
            marker="o",
            markersize=3,
            label=f"{n}: margin ({int(round(100 * result.config.level))}% CI)",
        )
        if n in result.centered:
            ax_m.plot(
                layers,
                result.centered[n]["margin"],
                color=colours[n],
                linestyle="--",
                linewidth=1,
                label=f"{n}: margin after centring",
            )
    ax_m.axhline(0.0, color="black", linewidth=0.8)
    ax_m.set_ylabel("margin\n(pairs − baseline)")
    ax_m.set_xlabel(f"layer (0 = embeddings, {result.num_layers} = final)")
    step = max(1, len(layers) // 40)
    ax_m.set_xticks(layers[::step])
    ax_m.set_xlim(layers[0] - 0.6, layers[-1] + 0.6)
    ax_m.legend(fontsize=7, loc="best")

    handles, labels = ax.get_legend_handles_labels()
    more_h, more_l = ax_p.get_legend_handles_labels()
    fig.legend(handles + more_h, labels + more_l, loc="outside lower center", ncol=2, fontsize=7)
    fig.suptitle(
        f"{result.model}, {src} → {tgt}: alignment per layer ({result.config.pooling} "
        f"pooling); chosen layer {chosen}",
        fontsize=10,
    )
    return _save(fig, path)


def tsne_perplexity(n_points: int) -> float:
    """A perplexity that suits the sample: 30 for large samples, (n - 1) / 3 for small ones."""
    return float(max(2.0, min(30.0, (n_points - 1) / 3)))


def tsne_sample(pairs: dict[str, list], n: int, seed: int) -> dict[str, list[int]]:
    """The seeded sample of pair indices per set used by both t-SNE figures (same pairs)."""
    import random

    rng = random.Random(seed)
    total = sum(len(v) for v in pairs.values()) or 1
    out = {}
    for name, items in pairs.items():
        k = min(len(items), max(2, round(n * len(items) / total)))
        out[name] = sorted(rng.sample(range(len(items)), k))
    return out


def plot_tsne(
    eval_dir: str | os.PathLike[str],
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    *,
    n_pairs: int = 40,
    seed: int = 0,
) -> list[Path]:
    """Figures 2 and 3: t-SNE of final-layer vectors before and after training.

    The same seeded sample of pairs in both, trained (circles) and control (triangles) marked;
    source words blue, targets red, a grey line per pair (the paper's Figs. 2-3). Each figure
    is its own t-SNE fit (scikit-learn, cosine metric, PCA initialisation, seeded).
    """
    import numpy as np
    from sklearn.manifold import TSNE

    from tli.evaluate import load_vectors

    tensors, meta = load_vectors(eval_dir)
    src_lang, tgt_lang = meta.get("languages", ("source", "target"))
    plt = _pyplot()
    written = []
    for when, path in (("pre", before), ("post", after)):
        points, labels, kinds = [], [], []
        with _reading(Path(eval_dir) / "vectors.safetensors"):
            final = int(meta["final_layer"])
            pairs = meta["pairs"]
            sample = tsne_sample(pairs, n_pairs, seed)
            for name, rows in sample.items():
                src = tensors[f"{name}.{when}.source.layer{final}"][rows]
                tgt = tensors[f"{name}.{when}.target.layer{final}"][rows]
                points += [src, tgt]
                labels += [pairs[name][j][0] for j in rows] + [pairs[name][j][1] for j in rows]
                kinds += [(name, "source")] * len(rows) + [(name, "target")] * len(rows)
            if not points:
                raise ValueError("no vectors")
        x = np.concatenate([p.numpy() for p in points])
        xy = TSNE(
            n_components=2,
            perplexity=tsne_perplexity(len(x)),
            metric="cosine",
            init="pca",
            random_state=seed,
        ).fit_transform(x)
        fig, ax = plt.subplots(figsize=(9, 7.5))
        start = 0
        for name, rows in sample.items():
            k = len(rows)
            src, tgt = xy[start : start + k], xy[start + k : start + 2 * k]
            start += 2 * k
            marker = "o" if name == "trained" else "^"
            for a, b in zip(src, tgt, strict=True):
                ax.plot([a[0], b[0]], [a[1], b[1]], color="0.75", lw=0.8, zorder=1)
            ax.scatter(
                src[:, 0],
                src[:, 1],
                c="tab:blue",
                marker=marker,
                s=28,
                zorder=2,
                label=f"{src_lang} ({name})",
            )
            ax.scatter(
                tgt[:, 0],
                tgt[:, 1],
                c="tab:red",
                marker=marker,
                s=28,
                zorder=2,
                label=f"{tgt_lang} ({name})",
            )
        for (px, py), text in zip(xy, labels, strict=True):
            ax.annotate(
                text, (px, py), fontsize=6, alpha=0.8, xytext=(2, 2), textcoords="offset points"
            )
        title = "before training (pre)" if when == "pre" else "after training (post)"
        ax.set_title(
            f"t-SNE of final-layer (layer {final}) vectors, {src_lang} → {tgt_lang}, {title}; "
            f"perplexity {tsne_perplexity(len(x)):.0f}",
            fontsize=10,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        written.append(_save(fig, path))
    return written


def plot_layer_curves(eval_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Per-layer pair cosine, baseline and P@1 (NN, centred NN) pre and post; frozen yardstick.

    The frozen yardstick is the Procrustes map with CSLS (:mod:`tli.yardsticks`), drawn when the
    evaluation computed it.
    """
    from tli.evaluate import EvalResult

    result = EvalResult.load(eval_dir)
    layers = result.layers
    names = list(result.sets)
    src, tgt = result.languages
    with _reading(Path(eval_dir) / "evaluation.json"):
        for name in names:
            for when in ("pre", "post"):
                for key in ("pair_mean", "baseline", "p_at_1_s2t_nn"):
                    if len(result.sets[name][when][key]) != len(layers):
                        raise ValueError(f"{name}.{when}.{key} does not have one value per layer")
        if not names:
            raise ValueError("no sets")
    plt = _pyplot()
    fig, axes = plt.subplots(
        2, len(names), figsize=(5.5 * len(names), 7), squeeze=False, sharex=True
    )
    for col, name in enumerate(names):
        figs = result.sets[name]
        top, bottom = axes[0][col], axes[1][col]
        for when, style in (("pre", "--"), ("post", "-")):
            top.plot(
                layers,
                figs[when]["pair_mean"],
                style,
                color="tab:blue",
                label=f"pair cosine ({when})",
            )
            top.plot(
                layers,
                figs[when]["baseline"],
                style,
                color="0.4",
                label=f"mismatched baseline ({when})",
            )
            bottom.plot(
                layers,
                figs[when]["p_at_1_s2t_nn"],
                style,
                color="tab:green",
                label=f"P@1 {src}→{tgt} NN ({when})",
            )
            if "p_at_1_s2t_centered" in figs[when]:  # absent in evaluations of older tli
                bottom.plot(
                    layers,
                    figs[when]["p_at_1_s2t_centered"],
                    style,
                    color="tab:purple",
                    label=f"P@1 {src}→{tgt} centred NN ({when})",
                )
        yard = (result.yardsticks or {}).get("sets", {}).get(name, {})
        in_sample = name in (result.yardsticks or {}).get("in_sample", [])
        if "p_at_1_s2t_procrustes_csls" in yard and not in_sample:  # in-sample: in the tables
            bottom.plot(
                layers,
                yard["p_at_1_s2t_procrustes_csls"],
                "-.",
                color="tab:orange",
                marker="s",
                markersize=3,
                label="P@1 s->t frozen Procrustes + CSLS",
            )
        chance = figs["pre"].get("chance_p_at_1_s2t")
        if chance:
            bottom.plot(layers, chance, ":", color="0.6", label="chance")
        for ax in (top, bottom):
            if result.target_layer is not None:
                ax.axvline(result.target_layer, color="red", ls="--", lw=0.8)
            ax.grid(alpha=0.3)
        top.set_title(f"{name} (N = {figs['n']})")
        top.set_ylabel("cosine")
        bottom.set_ylabel("P@1")
        bottom.set_xlabel("layer (0 = embeddings, N = final); red: target layer")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_change_histogram(eval_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Histogram of the per-pair final-layer cosine change: trained, control and mismatched.

    If mismatched pairs move as much as translation pairs, the gain is collapse, not alignment.
    """
    import numpy as np

    from tli.evaluate import EvalResult

    result = EvalResult.load(eval_dir)
    final = result.num_layers
    i = result.index(final)
    changes = {
        name: result.cosines[name]["post"][i] - result.cosines[name]["pre"][i]
        for name in result.sets
    }
    with _reading(Path(eval_dir) / "evaluation.json"):
        if not changes:
            raise ValueError("no sets")
        if not result.mismatched:
            raise ValueError("no mismatched_change (an evaluation of an older tli)")
        mismatched = np.concatenate([np.asarray(v) for v in result.mismatched.values()])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = {f"{k} pairs": np.asarray(v) for k, v in changes.items()}
    series["mismatched pairs"] = mismatched
    lo = min(float(v.min()) for v in series.values())
    hi = max(float(v.max()) for v in series.values())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 40)
    colours = {
        "trained pairs": "tab:blue",
        "control pairs": "tab:orange",
        "mismatched pairs": "0.5",
    }
    for label, values in series.items():
        ax.hist(
            values,
            bins=bins,
            alpha=0.5,
            density=True,
            label=f"{label} (mean {values.mean():+.3f})",
            color=colours.get(label),
        )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"cosine change at the final layer ({final}), post - pre")
    ax.set_ylabel("density")
    ax.set_title("per-pair change: translation pairs vs. mismatched pairs", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _wilson_bar(share: float, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """``(share, below, above)`` for an error bar of a P@1 with its Wilson interval."""
    from tli.stats import wilson_interval

    if share is None or not math.isfinite(share) or not n:
        return math.nan, 0.0, 0.0
    lo, hi = wilson_interval(int(round(share * n)), int(n), level)
    return share, share - lo, hi - share


def yardstick_bars(
    eval_dir: str | os.PathLike[str], probe_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """The numbers of :func:`plot_yardsticks`, read from saved results only.

    Returns:
        ``{"direction", "kind", "final", "sets": {set: [(label, p, below, above, note)]},
        "perplexity": [(name, change %, below, above)] , "perplexity_note", "rank_note"}``;
        an absent bar has ``p`` NaN and a ``note`` saying why.
    """
    from tli.evaluate import EvalResult
    from tli.probe import load_rank
    from tli.yardsticks import best

    ev = EvalResult.load(eval_dir)
    rank = load_rank(probe_dir) if probe_dir is not None and Path(probe_dir).is_dir() else None
    kind = ev.config.verdict_retrieval
    direction = kind.split("_")[0]
    final = ev.num_layers
    i = ev.index(final)
    yard = ev.yardsticks or {}
    with _reading(Path(eval_dir) / "evaluation.json"):
        out: dict[str, list] = {}
        for name in ("control", "trained"):
            if name not in ev.sets:
                continue
            s, n = ev.sets[name], ev.sets[name]["n"]
            bars = [
                (f"base, layer {final}", *_wilson_bar(s["pre"][f"p_at_1_{kind}"][i], n), ""),
            ]
            top = best(yard, name, direction, ev.layers) if yard else None
            if top is None:
                why = "; ".join((yard.get("absent") or {}).values()) or "not computed"
                bars.append(("best frozen yardstick", math.nan, 0.0, 0.0, f"absent: {why}"))
            else:
                tag = " (in-sample)" if name in yard.get("in_sample", []) else ""
                bars.append(
                    (
                        f"best frozen: {top['name']},\nlayer {top['layer']}{tag}",
                        top["p_at_1"],
                        top["p_at_1"] - top["lo"],
                        top["hi"] - top["p_at_1"],
                        "",
                    )
                )
            row = next(
                (
                    r
                    for r in (rank or {}).get("scores", [])
                    if r["set"] == name and r["direction"] == direction
                ),
                None,
            )
            for which in ("raw", "calibrated"):
                label = f"LM ranking ({which})"
                if row is None:
                    why = (
                        "tli probe --rank did not run"
                        if rank is None
                        else f"the LM ranking skipped this set or direction ({direction})"
                    )
                    bars.append((label, math.nan, 0.0, 0.0, f"absent: {why}"))
                else:
                    p = row[f"p_at_1_{which}"]
                    extra = f" ({row['n']} items)" if row["n"] != n else ""
                    bars.append(
                        (
                            label + extra,
                            p,
                            p - row[f"p_at_1_{which}_lo"],
                            row[f"p_at_1_{which}_hi"] - p,
                            "",
                        )
                    )
            bars.append(
                (f"adapter, layer {final}", *_wilson_bar(s["post"][f"p_at_1_{kind}"][i], n), "")
            )
            out[name] = bars
        harm = ev.perplexity or {}
        ppl = [
            (
                r["name"],
                100 * r["change"],
                100 * (r["change"] - r["lo"]),
                100 * (r["hi"] - r["change"]),
            )
            for r in (harm.get("sets") or {}).values()
        ]
        note = (
            ""
            if harm.get("enabled")
            else f"perplexity absent: {harm.get('reason') or 'not measured'}"
        )
    return {
        "direction": direction,
        "kind": kind,
        "final": final,
        "sets": out,
        "n": {name: ev.sets[name]["n"] for name in out},
        "perplexity": ppl,
        "perplexity_note": note,
        "model": ev.model.get("name", "?"),
    }


def plot_yardsticks(
    eval_dir: str | os.PathLike[str],
    path: str | os.PathLike[str],
    probe_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The yardstick figure that leads the report: what the adapter adds, and what it costs.

    One bar chart per set (control, trained) of the verdict's retrieval P@1 with 95% Wilson
    intervals: the base model at the final layer, the best frozen yardstick of the base model
    (:mod:`tli.yardsticks`, any layer; in-sample on the trained set), the LM's own ranking
    (``probe_rank.json`` of ``probe_dir``, raw and calibrated) and the adapter at the final
    layer; an absent bar says why. Beside them, the perplexity change of each text set with
    its paired bootstrap CI (the do-no-harm check). Drawn from saved files only.

    Args:
        eval_dir: An evaluation directory (``evaluation.json``).
        path: Where to write the PNG.
        probe_dir: A probe directory with ``probe_rank.json``, if any.
    """
    data = yardstick_bars(eval_dir, probe_dir)
    plt = _pyplot()
    names = list(data["sets"])
    fig, axes = plt.subplots(
        1,
        len(names) + 1,
        figsize=(4.6 * len(names) + 3.4, 5.4),
        gridspec_kw={"width_ratios": [3] * len(names) + [1.6]},
        squeeze=False,
    )
    colours = ["0.55", "tab:orange", "tab:green", "tab:olive", "tab:blue"]
    top = 0.05
    for ax, name in zip(axes[0], names, strict=False):
        bars = data["sets"][name]
        x = list(range(len(bars)))
        heights = [0.0 if math.isnan(b[1]) else b[1] for b in bars]
        ax.bar(x, heights, color=colours[: len(bars)], alpha=0.85)
        ax.errorbar(
            x,
            heights,
            yerr=[[b[2] for b in bars], [b[3] for b in bars]],
            fmt="none",
            ecolor="black",
            capsize=4,
            linewidth=1,
        )
        for j, b in enumerate(bars):
            if math.isnan(b[1]):
                ax.text(j, 0.005, b[4], rotation=90, ha="center", va="bottom", fontsize=6.5)
            else:
                ax.text(j, b[1] + b[3] + 0.005, f"{b[1]:.3f}", ha="center", fontsize=7)
                top = max(top, b[1] + b[3])
        ax.set_xticks(x, [b[0] for b in bars], rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{name} ({data['n'][name]} pairs)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[0][: len(names)]:
        ax.set_ylim(0, min(1.05, top * 1.25 + 0.02))
    axes[0][0].set_ylabel(f"P@1 {data['kind']} (95% Wilson)")
    ax = axes[0][-1]
    if data["perplexity"]:
        x = list(range(len(data["perplexity"])))
        changes = [r[1] for r in data["perplexity"]]
        ax.bar(x, changes, color=["tab:red" if c > 0 else "tab:cyan" for c in changes], alpha=0.8)
        ax.errorbar(
            x,
            changes,
            yerr=[[r[2] for r in data["perplexity"]], [r[3] for r in data["perplexity"]]],
            fmt="none",
            ecolor="black",
            capsize=4,
        )
        for j, c in enumerate(changes):
            text = f"x{1 + c / 100:.3g}" if c > 100 else f"{c:+.1f}%"  # many-fold: the ratio
            ax.text(j, c, text, ha="center", va="bottom" if c >= 0 else "top", fontsize=7)
        ax.set_xticks(x, [r[0] for r in data["perplexity"]], rotation=35, ha="right", fontsize=7)
        ax.axhline(0, color="black", linewidth=0.8)
        if max(abs(c) + r[3] for c, r in zip(changes, data["perplexity"], strict=True)) > 100:
            ax.set_yscale("symlog", linthresh=10)  # a many-fold rise: linear within +-10%
    else:
        ax.text(
            0.5,
            0.5,
            data["perplexity_note"],
            ha="center",
            va="center",
            wrap=True,
            fontsize=7,
            transform=ax.transAxes,
        )
        ax.set_xticks([])
    ax.set_title("do no harm:\nperplexity change (95% CI)", fontsize=9)
    ax.set_ylabel("adapted / base - 1 (%)")
    fig.suptitle(
        f"{data['model']}: what the adapter adds, against yardsticks of the frozen model "
        f"(final layer {data['final']})",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


def read_train_log(train_dir: str | os.PathLike[str]) -> dict[str, list[float]]:
    """The columns of a training directory's ``train_log.csv`` (step, epoch, loss, ... lr)."""
    path = Path(train_dir) / "train_log.csv"
    with _reading(path):
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
        if not rows:
            raise ValueError("no steps")
        columns = ("step", "epoch", "loss", "pos_sim", "neg_sim", "lr")
        return {c: [float(r[c]) for r in rows] for c in columns}


def plot_training(train_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Training curves per step from ``train_log.csv``: loss, similarities, learning rate.

    Top: the loss. Middle: the mean cosine of each anchor with its positive (``pos_sim``) and
    with its in-batch negatives (``neg_sim``, as the loss weighs them). Bottom: the learning
    rate (warm-up, then linear decay). Dotted lines mark the end of each epoch.

    Args:
        train_dir: A training directory (``train_log.csv`` inside).
        path: Where to write the PNG.
    """
    log = read_train_log(train_dir)
    config = Path(train_dir) / "train_config.json"
    loss_name = ""
    if config.is_file():
        with _reading(config):
            import json

            loss_name = str(json.loads(config.read_text(encoding="utf-8"))["train"]["loss"])
    plt = _pyplot()
    steps = log["step"]
    marker = "o" if len(steps) < 30 else None
    fig, (ax_l, ax_s, ax_r) = plt.subplots(
        3, 1, sharex=True, figsize=(8, 7), gridspec_kw={"height_ratios": [2, 2, 1]}
    )
    ax_l.plot(steps, log["loss"], color="tab:purple", marker=marker, markersize=3, lw=1)
    ax_l.set_ylabel(f"loss ({loss_name})" if loss_name else "loss")
    ax_s.plot(steps, log["pos_sim"], color="tab:blue", marker=marker, markersize=3, lw=1,
              label="pos_sim: anchor · its translation")  # fmt: skip
    ax_s.plot(steps, log["neg_sim"], color="0.45", marker=marker, markersize=3, lw=1,
              label="neg_sim: anchor · in-batch negatives")  # fmt: skip
    ax_s.set_ylabel("cosine")
    ax_s.legend(fontsize=8, loc="best")
    ax_r.plot(steps, log["lr"], color="tab:green", lw=1.2)
    ax_r.set_ylabel("learning rate")
    ax_r.set_xlabel("step")
    ends = [s for s, e, nxt in zip(steps, log["epoch"], log["epoch"][1:], strict=False) if nxt != e]
    for ax in (ax_l, ax_s, ax_r):
        for end in ends:
            ax.axvline(end + 0.5, color="black", ls=":", lw=0.8)
        ax.grid(alpha=0.3)
    epochs = int(max(log["epoch"]))
    fig.suptitle(
        f"training: {len(steps)} steps, {epochs} epoch{'s' if epochs != 1 else ''} "
        "(dotted: end of an epoch)",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


#: What the t-SNE figures cannot show; printed under them in the report (and in the docs).
TSNE_NOTE = (
    "t-SNE is fitted separately before and after training and keeps only neighbourhoods, not "
    "distances or scale, so Figures 2-3 cannot show a collapse (every word moving closer to "
    "every other): read that from the margin, in Table 1 and the findings above, and from "
    "the per-pair change histogram (translation pairs against mismatched pairs)."
)

#: Figures of a run directory: file name -> what it shows.
RUN_FIGURES = {
    "yardsticks.png": "Yardsticks: base, best frozen yardstick, LM ranking and adapter retrieval "
    "(P@1, 95% Wilson), and the perplexity change",
    "scan.png": "Figure 1: layer scan (pair cosine, baseline, P@1, margin)",
    "tsne_pre.png": "Figure 2: t-SNE of final-layer vectors before training",
    "tsne_post.png": "Figure 3: t-SNE of final-layer vectors after training",
    "layers.png": "per-layer pair cosine, baseline and P@1 (NN and centred NN) before and after, "
    "and the frozen Procrustes yardstick",
    "change_hist.png": "per-pair change: trained, control and mismatched pairs",
    "training.png": "training curves: loss, positive/negative similarity, learning rate per step",
}


def draw_run_figures(
    run_dir: str | os.PathLike[str], *, n_pairs: int = 40, seed: int = 0
) -> list[Path]:
    """Draw every figure of a run directory into ``figures/`` from its saved results."""
    from tli.evaluate import EvalResult, load_vectors
    from tli.io import ensure_dir
    from tli.scan import ScanResult

    root = Path(run_dir)
    eval_dir = root / "eval"
    has_eval = (eval_dir / "evaluation.json").is_file()
    # Read every input before drawing anything: damaged results fail in a second, as one line.
    scan = ScanResult.load(root / "scan") if (root / "scan" / "scan.json").is_file() else None
    has_log = (root / "train" / "train_log.csv").is_file()
    if has_log:
        read_train_log(root / "train")
    if has_eval:
        from tli.probe import load_rank

        EvalResult.load(eval_dir)
        load_vectors(eval_dir)
        load_rank(root / "probe")
    out = ensure_dir(root / "figures")
    written = []
    if scan is not None:
        written.append(plot_scan(scan, out / "scan.png"))
    if has_eval:
        written.append(plot_yardsticks(eval_dir, out / "yardsticks.png", root / "probe"))
        written += plot_tsne(
            eval_dir, out / "tsne_pre.png", out / "tsne_post.png", n_pairs=n_pairs, seed=seed
        )
        written.append(plot_layer_curves(eval_dir, out / "layers.png"))
        written.append(plot_change_histogram(eval_dir, out / "change_hist.png"))
    if has_log:
        written.append(plot_training(root / "train", out / "training.png"))
    return written


# --- command line ---------------------------------------------------------------------------


def plot_sweep_heatmap(
    summary: Sequence[Mapping[str, Any]], axes: Sequence[str], metric: str, path: Path
) -> Path:
    """A sweep's mean ``metric`` per first axis (rows) and the remaining non-seed axes (columns).

    Args:
        summary: The ranked rows of :func:`tli.sweep.summarise` (saved in ``sweep.json``).
        axes: The grid's axes, in order.
        metric: The figure shown.
        path: Where to write the PNG.
    """
    from tli.tables import label as _label

    plt = _pyplot()

    group_axes = [a for a in axes if a != "seed"]
    row_axis, col_axes = (group_axes[0], group_axes[1:]) if group_axes else ("", [])
    rows = list(dict.fromkeys(_label(r["axes"].get(row_axis, "")) for r in summary))
    cols = list(
        dict.fromkeys(
            ", ".join(f"{a}={_label(r['axes'][a])}" for a in col_axes) or "-" for r in summary
        )
    )
    grid = [[math.nan] * len(cols) for _ in rows]
    for r in summary:
        i = rows.index(_label(r["axes"].get(row_axis, "")))
        j = cols.index(", ".join(f"{a}={_label(r['axes'][a])}" for a in col_axes) or "-")
        grid[i][j] = r[metric][0]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(cols), 1.2 + 0.6 * len(rows)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.3f}", ha="center", va="center", color="w")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylabel(row_axis)
    ax.set_title(f"control {metric} (mean over seeds)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def plot_compare(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """The headline figures of several runs or sweep cells, one group of marks per run.

    Three panels at the final layer, each run on the x axis and each set in its colour: pair
    cosine (bar) with the mismatched baseline (black tick), after training, and the values
    before as hollow circles; the margin after training with its bootstrap CI; retrieval P@1
    after training with its Wilson interval, before as hollow circles.

    Args:
        records: :func:`tli.compare.load_compared`'s records.
        path: Where to write the PNG.
    """
    plt = _pyplot()
    names = list(dict.fromkeys(s for r in records for s in r["sets"]))
    colours = {n: _COLOURS[i % len(_COLOURS)] for i, n in enumerate(names)}
    width = 0.8 / max(len(names), 1)
    fig, axes = plt.subplots(
        1, 3, figsize=(max(10.0, 3.2 * len(records) + 4), 4.6), layout="constrained"
    )
    ax_c, ax_m, ax_p = axes
    for i, r in enumerate(records):
        for j, name in enumerate(names):
            s = r["sets"].get(name)
            if s is None:
                continue
            x = i + (j - (len(names) - 1) / 2) * width
            first = i == 0 or all(name not in q["sets"] for q in records[:i])
            colour = colours[name]
            ax_c.bar(x, s["pair_post"], width=width * 0.9, color=colour, alpha=0.6,
                     label=f"{name}: pair cosine" if first else None)  # fmt: skip
            ax_c.hlines(s["baseline_post"], x - width * 0.45, x + width * 0.45, color="black",
                        lw=2, label="baseline" if first and j == 0 else None)  # fmt: skip
            ax_c.plot(x, s["pair_pre"], "o", mfc="none", color=colour, ms=6)
            err = [[s["margin_post"] - s["margin_lo"]], [s["margin_hi"] - s["margin_post"]]]
            ax_m.errorbar(x, s["margin_post"], yerr=err, fmt="o", color=colour, capsize=4,
                          label=name if first else None)  # fmt: skip
            ax_m.plot(x, s["margin_pre"], "o", mfc="none", color=colour, ms=6)
            lo, hi = s["p1_post_ci"]
            p1_err = [[s["p1_post"] - lo], [hi - s["p1_post"]]]
            ax_p.errorbar(x, s["p1_post"], yerr=p1_err, fmt="s", color=colour, capsize=4,
                          label=name if first else None)  # fmt: skip
            ax_p.plot(x, s["p1_pre"], "o", mfc="none", color=colour, ms=6)
    labels = [f"{r['name']}\n{r['languages'][0]}→{r['languages'][1]}" for r in records]
    for ax in axes:
        ax.set_xticks(range(len(records)), labels, fontsize=8, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    ax_c.set_title("pair cosine (bar), baseline (tick)", fontsize=9)
    ax_c.set_ylabel("cosine, final layer")
    ax_m.axhline(0, color="black", lw=0.8)
    ax_m.set_title("margin with 95% bootstrap CI", fontsize=9)
    ax_m.set_ylabel("pair cosine − baseline")
    ax_p.set_title("P@1 with 95% Wilson interval", fontsize=9)
    ax_p.set_ylabel("P@1 (source → target, nearest neighbour)")
    ax_p.set_ylim(bottom=0)
    ax_c.legend(fontsize=7, loc="lower right")
    ax_m.legend(fontsize=7, loc="best")
    fig.suptitle("after training (filled) and before (hollow circles), per run and set",
                 fontsize=10)  # fmt: skip
    return _save(fig, path)
