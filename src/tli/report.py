"""The report of a run directory: ``report.md`` and a self-contained ``report.html``.

Both are built from the saved results only (config, scan, evaluation, figures). The HTML page
embeds its figures as data URIs, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from tli.io import atomic_write_text, read_bytes, read_json, read_text
from tli.plots import TSNE_NOTE

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; }
th { background: #f3f3f3; }
code, pre { background: #f6f6f6; font-size: 0.85em; }
pre { padding: 0.8em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; }
.verdict { font-weight: 600; }
"""


def _section(title: str, *body: str) -> list[str]:
    return [f"## {title}", "", *body, ""]


def build_markdown(run_dir: Path) -> str:
    """The report as Markdown, with figures linked as ``figures/NAME.png``."""
    from tli.evaluate import EvalResult
    from tli.plots import RUN_FIGURES
    from tli.scan import ScanResult

    run_dir = Path(run_dir)
    record = read_json(run_dir / "run.json")
    scan = ScanResult.load(run_dir / "scan")
    ev = EvalResult.load(run_dir / "eval")
    train_info = read_json(run_dir / "train" / "train.json")
    stages = record["stages"]
    layer = stages["train"]["layer"]
    n = ev.num_layers
    src, tgt = ev.languages
    lines = [
        f"# TLI run: {ev.model.get('name', '?')}, {src} → {tgt}",
        "",
        f"Run directory `{run_dir.name}`. Language pair {src} → {tgt}. "
        f"Trained set {stages['pairs']['trained']} pairs, "
        f"control set {stages['pairs']['control']} pairs. Target layer {layer} "
        f"({stages['train']['layer_source']}); evaluation at the final layer {n}.",
        "",
    ]
    lines += _yardstick_section(run_dir, ev)
    lines += _section(
        "Verdicts (final layer)",
        *[f"- **{line}**" for line in ev.summary_lines()],
        "",
        ev.findings_table(),
        "",
        "Each verdict states two findings: **geometry** (did the margin, pair cosine minus the "
        "mismatched-pair baseline, rise or fall? its paired bootstrap CI decides) and "
        "**retrieval** (did P@1 rise or fall? McNemar's exact test decides), each with the "
        "smallest change its n could detect, and a **collapse flag** (raw cosine rose "
        "significantly, the baseline shared at least the configured part of the rise, and the "
        "margin did not rise). *Alignment improved* needs both findings to rise; the headline "
        "of every other case is in docs/evaluation.md.",
    )
    if (run_dir / "probe" / "probe.json").is_file():
        from tli.probe import probe_summary_line

        lines += _section(
            "Generated text (probe)",
            probe_summary_line(run_dir / "probe"),
            "",
            "Details: `probe/probe_scores.md`, `probe/probe.md`.",
        )
    warnings = list(scan.warnings) + list(ev.warnings)
    if warnings:
        lines += _section("Warnings", *[f"- {w}" for w in warnings])
    lines += _section(
        "Table 1: final layer, before and after",
        ev.table1(),
        "",
        f"At the target layer ({layer}):",
        "",
        ev.table1(layer),
    )
    lines += _section(
        "Retrieval: nearest neighbour, CSLS and centred (final layer)",
        ev.retrieval_table(),
        "",
        "P@1 with its 95% Wilson interval; centred: each side's mean vector subtracted over its "
        "own list before the nearest-neighbour search (MUSE). The verdict tests "
        f"`{ev.config.verdict_retrieval}`.",
    )
    lines += _section("Layer scan (before training)", "```", scan.table(), "```")
    for name in ev.sets:
        lines += _section(f"Table 2: examples, {name} set (final layer)", ev.table2(name))
    figs = []
    for fname, caption in RUN_FIGURES.items():
        if fname == YARDSTICKS_FIGURE:
            continue  # it leads the report
        if (run_dir / "figures" / fname).is_file():
            figs += [f"![{caption}](figures/{fname})", "", f"*{caption}*", ""]
            if fname == "tsne_post.png":
                figs += [TSNE_NOTE, ""]
    lines += _section("Figures", *figs)
    lines += _section(
        "Training",
        f"{train_info['steps']} steps, {train_info['trainable_parameters']:,} trainable "
        f"parameters, {train_info['seconds']:.1f} s ({train_info['steps_per_second']} steps/s), "
        f"final loss {train_info['final_loss']}. Adapter: `train/final/` (peft format, with "
        "its model card `README.md`); curves per step: `figures/training.png`.",
    )
    for name in ev.sets:
        lines += _section(f"Every layer, {name} set", ev.layer_table(name))
    config = read_text(run_dir / "config.toml")
    env = read_json(run_dir / "environment.json")
    lines += _section("Config", "```toml", config.rstrip(), "```")
    lines += _section("Environment", "```json", json.dumps(env, indent=2), "```")
    return "\n".join(lines).rstrip() + "\n"


#: The figure that leads the report (:func:`tli.plots.plot_yardsticks`).
YARDSTICKS_FIGURE = "yardsticks.png"


def _yardstick_section(run_dir: Path, ev: Any) -> list[str]:
    """The report's first section: the yardstick figure, the do-no-harm line and the tables."""
    from tli.probe import load_rank
    from tli.tables import (
        YARDSTICK_NOTE,
        adapter_retrieval,
        perplexity_table,
        rank_line,
        yardstick_markdown,
    )

    body: list[str] = []
    if (run_dir / "figures" / YARDSTICKS_FIGURE).is_file():
        caption = (
            "Yardsticks: P@1 "
            f"{ev.config.verdict_retrieval} with 95% Wilson intervals of the base model at the "
            "final layer, the best frozen yardstick (any layer), the LM's own ranking and the "
            "adapter at the final layer; right: the perplexity change"
        )
        body += [f"![{caption}](figures/{YARDSTICKS_FIGURE})", "", f"*{caption}*", ""]
    body += [f"**{ev.harm_line()}**", ""]
    rank = load_rank(run_dir / "probe")
    body += [
        rank_line(rank) + " Details: `probe/probe_rank.md`."
        if rank
        else "LM ranking: absent (it did not run; `[probe] rank = true`, or `tli probe --rank`).",
        "",
    ]
    if ev.yardsticks:
        body += [
            yardstick_markdown(
                ev.yardsticks, ev.layers, ev.num_layers, adapter=adapter_retrieval(ev)
            ),
            "",
            YARDSTICK_NOTE,
            "",
        ]
    else:
        body += ["Frozen yardsticks: absent (an evaluation of an older tli).", ""]
    body += ["Perplexity:", "", perplexity_table(ev.perplexity)]
    return _section("Yardsticks and do no harm", *body)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(read_bytes(path)).decode("ascii")


def build_html(markdown_text: str, run_dir: Path, title: str) -> str:
    """One self-contained HTML page: the Markdown rendered, figures inlined."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])

    def inline(match: re.Match) -> str:
        src = match.group(1)
        path = Path(run_dir) / src
        return f'src="{_data_uri(path)}"' if path.is_file() else match.group(0)

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(run_dir: Path | str) -> dict[str, Any]:
    """Write ``report.md`` and then ``report.html`` (the stage marker) into the run directory."""
    run_dir = Path(run_dir)
    text = build_markdown(run_dir)
    atomic_write_text(run_dir / "report.md", text)
    title = text.splitlines()[0].lstrip("# ").strip()
    atomic_write_text(run_dir / "report.html", build_html(text, run_dir, title))
    return {"markdown": str(run_dir / "report.md"), "html": str(run_dir / "report.html")}


def write_compare_html(markdown_text: str, out_dir: Path, path: Path) -> Path:
    """``compare.html``: ``tli compare``'s Markdown as one self-contained page."""
    atomic_write_text(path, build_html(markdown_text, Path(out_dir), "tli compare"))
    return Path(path)
