"""``tli compare``: the headline figures of several runs or sweep cells, side by side.

Each directory is read from its saved results only (no model):

* a run directory (``tli run``): ``eval/evaluation.json`` at the final layer, every set, and
  ``train/train.json`` for the training time;
* a sweep cell (``tli sweep``'s ``cells/NAME/``): ``cell.json``, the control set at the final
  layer.

Per directory and set, :func:`load_compared` gives one plain record: pair cosine, baseline and
margin before and after, the margin's bootstrap CI and the CI of its change, retrieval P@1
(source -> target, nearest neighbour) before and after with the Wilson interval of each, the
verdict, and the training time. :func:`write_comparison` writes ``compare.md``,
``compare.html`` (the figure inlined), ``compare.png`` and ``compare.json``; the rendering is
:func:`tli.tables.compare_markdown`, :func:`tli.plots.plot_compare` and
:func:`tli.report.write_compare_html`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tli.errors import TLIError, first_line
from tli.io import atomic_write_json, atomic_write_text, ensure_dir

#: The retrieval the comparison shows: the verdict's default (source -> target, nearest neighbour
#: after mean-centring each side), or nearest neighbour in results of a tli that lacked it.
RETRIEVALS = ("s2t_centered", "s2t_nn")
#: Coverage of the P@1 intervals.
LEVEL = 0.95
#: File names written by :func:`write_comparison`.
MD_NAME, HTML_NAME, PNG_NAME, JSON_NAME = (
    "compare.md",
    "compare.html",
    "compare.png",
    "compare.json",
)


def wilson(share: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson interval of a P@1 (:func:`tli.stats.wilson_interval`): hits = share x n."""
    from tli.stats import wilson_interval

    if not n or share is None or not math.isfinite(share):
        return math.nan, math.nan
    return wilson_interval(int(round(share * n)), int(n), level)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TLIError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TLIError(f"{path}: cannot read: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise TLIError(f"{path}: not a tli result (expected a JSON object)")
    return data


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _record(
    pre: dict[str, Any], post: dict[str, Any], n: int, change: tuple[Any, Any, Any], verdict: str
) -> dict[str, Any]:
    """One set's headline figures from its before/after summaries at one layer."""
    kind = next(k for k in RETRIEVALS if f"p_at_1_{k}" in pre or k == RETRIEVALS[-1])
    p1_pre, p1_post = _num(pre[f"p_at_1_{kind}"]), _num(post[f"p_at_1_{kind}"])
    return {
        "n": int(n),
        "p1_retrieval": kind,
        "pair_pre": _num(pre["pair_mean"]),
        "pair_post": _num(post["pair_mean"]),
        "baseline_pre": _num(pre["baseline"]),
        "baseline_post": _num(post["baseline"]),
        "margin_pre": _num(pre["margin"]),
        "margin_post": _num(post["margin"]),
        "margin_lo": _num(post["margin_lo"]),
        "margin_hi": _num(post["margin_hi"]),
        "margin_change": _num(change[0]),
        "margin_change_lo": _num(change[1]),
        "margin_change_hi": _num(change[2]),
        "p1_pre": p1_pre,
        "p1_post": p1_post,
        "p1_pre_ci": list(wilson(p1_pre, int(n))),
        "p1_post_ci": list(wilson(p1_post, int(n))),
        "verdict": verdict,
    }


def _from_run(root: Path) -> dict[str, Any]:
    path = root / "eval" / "evaluation.json"
    data = _read(path)
    try:
        n_layers = int(data["num_layers"])
        i = [int(x) for x in data["layers"]].index(n_layers)
        sets = {}
        for name, s in data["sets"].items():
            at = {
                w: {k: v[i] for k, v in s[w].items() if isinstance(v, list)}
                for w in ("pre", "post")
            }
            boot = s["bootstrap"]
            change = (boot["margin_change"][i], boot["margin_change_lo"][i],
                      boot["margin_change_hi"][i])  # fmt: skip
            sets[name] = _record(
                at["pre"], at["post"], s["n"], change, data["verdicts"][name]["label"]
            )
        model = data["model"]["name"]
        languages = list(data.get("languages", ["source", "target"]))
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise TLIError(
            f"{path}: not a tli evaluation ({type(err).__name__}: {first_line(err)})"
        ) from None
    seconds = _train_seconds(root / "train" / "train.json")
    preset = None
    if (root / "config.toml").is_file():
        from tli.config import read_toml

        preset = read_toml(root / "config.toml").get("preset")
    return {
        "kind": "run",
        "model": model,
        "languages": languages,
        "layer": n_layers,
        "train_seconds": seconds,
        "detail": f"preset {preset}" if preset else "",
        "sets": sets,
    }


def _train_seconds(path: Path) -> float:
    if not path.is_file():
        return math.nan
    try:
        return float(_read(path)["seconds"])
    except (KeyError, TypeError, ValueError) as err:
        raise TLIError(f"{path}: not a tli training record ({first_line(err)})") from None


def _from_cell(root: Path) -> dict[str, Any]:
    from tli.verdict import VERDICTS

    path = root / "cell.json"
    data = _read(path)
    try:
        pre, post = data["pre"], data["post"]
        change = (post["margin_change"], post["margin_change_lo"], post["margin_change_hi"])
        verdict = VERDICTS.get(data["verdict"], str(data["verdict"]))
        sets = {"control": _record(pre, post, data["n"], change, verdict)}
        axes = ", ".join(f"{k}={v}" for k, v in data.get("axes", {}).items())
        seconds = float(data["train_seconds"])
    except (KeyError, TypeError, ValueError) as err:
        raise TLIError(
            f"{path}: not a tli sweep cell ({type(err).__name__}: {first_line(err)})"
        ) from None
    meta_path = root / "train" / "final" / "tli_adapter.json"
    meta = _read(meta_path) if meta_path.is_file() else {}
    train_config = root / "train" / "train_config.json"
    model = meta.get("model")
    if model is None and train_config.is_file():
        model = _read(train_config).get("model", {}).get("name")
    return {
        "kind": "sweep cell",
        "model": model or "?",
        "languages": list(meta.get("languages", ["source", "target"])),
        "layer": meta.get("num_layers"),
        "train_seconds": seconds,
        "detail": axes,
        "sets": sets,
    }


def _names(dirs: Sequence[Path]) -> list[str]:
    """Short distinct names: the last path part, or as many parts as make them distinct."""
    parts = [d.resolve().parts for d in dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]


def load_compared(dirs: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """One record per directory (run or sweep cell), in the order given.

    Raises:
        TLIError: A directory is neither a finished run nor a finished sweep cell, or its
            results are damaged; nothing is written before every one has been read.
    """
    if not dirs:
        raise TLIError("nothing to compare: give at least one run or sweep-cell directory")
    paths = [Path(d) for d in dirs]
    records = []
    for path, name in zip(paths, _names(paths), strict=True):
        if not path.is_dir():
            raise TLIError(f"{path}: no such directory")
        if (path / "cell.json").is_file():
            record = _from_cell(path)
        elif (path / "eval" / "evaluation.json").is_file():
            record = _from_run(path)
        else:
            raise TLIError(
                f"{path}: neither a finished run (eval/evaluation.json) nor a finished sweep cell "
                "(cell.json)"
            )
        records.append({"name": name, "path": str(path.resolve()), **record})
    return records


def write_comparison(
    records: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """Write ``compare.md``, ``compare.png``, ``compare.html`` and ``compare.json``."""
    from tli.plots import plot_compare
    from tli.report import write_compare_html
    from tli.tables import compare_markdown

    out = ensure_dir(out_dir)
    text = compare_markdown(records, figure=PNG_NAME)
    plot_compare(records, out / PNG_NAME)
    atomic_write_text(out / MD_NAME, text)
    write_compare_html(text, out, out / HTML_NAME)
    atomic_write_json(out / JSON_NAME, {"level": LEVEL, "runs": records})
    return [out / MD_NAME, out / HTML_NAME, out / PNG_NAME, out / JSON_NAME]
