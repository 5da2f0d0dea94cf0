"""`tli sweep`: train a grid of objectives and judge each on the control set at the final layer.

A grid file (TOML) names the model, the shared training values, named objectives and the axes::

    [sweep]
    model = "gemma-3-270m"      # any tli model name
    # preset = "aligned"        # a named preset's training values and pooling as the base
    pooling = "mean"            # one pooling for training and evaluation
    # pairs = "my_pairs.tsv"    # default: the bundled lexicon and its split
    metric = "p_at_1_s2t_nn"    # what the ranked table sorts by
    jobs = 1                    # cells at once (processes); --jobs overrides

    [train]                     # TrainConfig values shared by every cell
    layer = 10                  # the target layer ('target' in loss_layers)
    epochs = 2

    [objectives.triplet]        # named bundles of TrainConfig values
    loss = "triplet_hardest"
    [objectives.info_nce]
    loss = "info_nce"

    [grid]                      # axes: 'objective' and any TrainConfig field (seed included)
    objective = ["triplet", "info_nce"]
    loss_layers = ["final", "target,final"]
    seed = [0, 1, 2]

Every cell (one value per axis) is trained with :func:`tli.train.train` on the trained split,
then the control split is embedded at the final layer by the base model (once for the whole
sweep) and by the base model with the cell's adapter, and compared with
:func:`tli.evaluate.compare` (margin with bootstrap CI, P@1 NN, CSLS and centred NN, raw cosine,
the verdict's findings and collapse flag).

Sweep directory::

    grid.toml        the grid, as given
    base.json        the base model's control figures (computed once)
    cells/NAME/      train/ (the training directory) and cell.json (written last: done)
    sweep.csv        one row per cell
    sweep.md         cells ranked by the metric, averaged over seeds with t-intervals
    heatmap.png      the metric per objective (rows) and remaining axes (columns)

A cell whose ``cell.json`` exists with the same config is skipped on a re-run, so an interrupted
sweep continues where it stopped (an unfinished training resumes from its checkpoint).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tli.config import MAX_RESAMPLES, build, check_int, read_toml, to_dict
from tli.embed import POOLINGS
from tli.errors import TLIError
from tli.io import atomic_write_json, atomic_write_text, ensure_dir
from tli.models import DEFAULT_MODEL
from tli.pipeline.presets import train_values
from tli.plots import plot_sweep_heatmap
from tli.tables import label as _label
from tli.tables import sweep_markdown
from tli.train import TrainConfig, plan

log = logging.getLogger("tli")

#: Figures of a cell, in sweep.csv's column order (all on the control set, final layer).
FIGURES = (
    "p_at_1_s2t_nn",
    "p_at_1_s2t_csls",
    "p_at_1_t2s_nn",
    "p_at_1_s2t_centered",
    "p_at_1_t2s_centered",
    "margin",
    "margin_lo",
    "margin_hi",
    "pair_mean",
    "baseline",
    "margin_change",
    "margin_change_lo",
    "margin_change_hi",
)
#: The figures of a state (pre or post); the rest are changes (post only).
LEVELS = tuple(k for k in FIGURES if not k.startswith("margin_change"))


@dataclass(frozen=True)
class SweepConfig:
    """The ``[sweep]`` table of a grid file."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model name (tli.models)"})
    preset: str | None = field(
        default=None,
        metadata={
            "help": "a named preset (tli run --preset) whose training values and pooling are "
            "the base of every cell, under [train]"
        },
    )
    pairs: str | None = field(
        default=None, metadata={"help": "pair file with a split column; default: the lexicon"}
    )
    pooling: str = field(default="mean", metadata={"help": "mean, mean_all or last"})
    metric: str = field(default="p_at_1_s2t_nn", metadata={"help": "ranking figure"})
    jobs: int = field(default=1, metadata={"help": "cells trained at once (processes)"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples of the CIs"})
    allow_overlap: bool = field(
        default=False,
        metadata={"help": "accept control pairs related to trained ones (one warning)"},
    )

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise TLIError(f"[sweep] pooling must be one of {', '.join(POOLINGS)}")
        if self.metric not in FIGURES:
            raise TLIError(f"[sweep] metric must be one of {', '.join(FIGURES)}")
        if self.jobs < 1:
            raise TLIError(f"[sweep] jobs must be >= 1, got {self.jobs}")
        check_int("[sweep] jobs", self.jobs, 1, 1024)
        check_int("[sweep] n_boot", self.n_boot, 1, MAX_RESAMPLES)


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its axis values and the resolved training config."""

    name: str
    axes: dict[str, Any]
    train: TrainConfig


@dataclass
class Grid:
    """A parsed grid file."""

    sweep: SweepConfig
    cells: list[Cell]
    axes: list[str]


def _cell_name(axes: Mapping[str, Any]) -> str:
    text = "__".join(f"{k}={_label(v)}" for k, v in axes.items())
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def parse_grid(data: Mapping[str, Any], where: str = "grid") -> Grid:
    """A :class:`Grid` from the grid file's tables; TLIErrors name the table and key."""
    known = {"sweep", "train", "objectives", "grid"}
    for key in data:
        if key not in known:
            raise TLIError(f"{where}: unknown table {key!r}; known: {', '.join(sorted(known))}")
    raw = dict(data.get("sweep", {}))
    preset: dict[str, Any] = {}
    if raw.get("preset") is not None:
        preset = train_values(raw["preset"], f"{where}: [sweep] preset")
        pooling = preset.pop("pooling", None)
        if pooling is not None:
            raw.setdefault("pooling", pooling)
    try:
        sweep = build(SweepConfig, raw)
    except TLIError as err:
        raise TLIError(f"{where}: [sweep] {err}") from None
    base = dict(data.get("train", {}))
    if "pooling" in base:
        raise TLIError(f"{where}: [train] pooling: set it once, in [sweep]")
    objectives = {k: dict(v) for k, v in dict(data.get("objectives", {})).items()}
    grid = dict(data.get("grid", {}))
    if not grid:
        raise TLIError(f"{where}: [grid] is empty; give at least one axis")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for axis, values in grid.items():
        if axis != "objective" and axis not in fields:
            raise TLIError(
                f"{where}: [grid] unknown axis {axis!r}; use 'objective' or a "
                f"TrainConfig field ({', '.join(sorted(fields))})"
            )
        if not isinstance(values, list) or not values:
            raise TLIError(f"{where}: [grid] {axis} must be a non-empty list")
    for name in grid.get("objective", []):
        if name not in objectives:
            raise TLIError(f"{where}: [grid] objective {name!r} has no [objectives.{name}] table")
    axes = list(grid)
    # A grid value for a list-valued field may be written "target,final" (one cell per string).
    hints = typing.get_type_hints(TrainConfig)
    listed = {k for k, tp in hints.items() if "tuple" in str(tp)}

    def as_field(key: str, value: Any) -> Any:
        if key in listed and isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    cells = []
    for combo in itertools.product(*(grid[a] for a in axes)):
        values = dict(zip(axes, combo, strict=True))
        layers = [preset, base]
        if "objective" in values:
            layers.append(objectives[values["objective"]])
        layers.append({k: as_field(k, v) for k, v in values.items() if k != "objective"})
        layers.append({"pooling": sweep.pooling, "save_every": 0})
        name = _cell_name(values)
        try:
            cfg = build(TrainConfig, *layers)
        except TLIError as err:
            raise TLIError(f"{where}: cell {name}: {err}") from None
        cells.append(Cell(name, values, cfg))
    if len({c.name for c in cells}) != len(cells):
        raise TLIError(f"{where}: two cells share a name; make the axis values distinct")
    return Grid(sweep, cells, axes)


def read_grid(path: Path) -> Grid:
    """Read and parse a grid TOML file."""
    return parse_grid(read_toml(path), where=str(path))


# --- running cells ------------------------------------------------------------------------


def _pair_sets(sweep: SweepConfig) -> Any:
    """The sweep's :class:`tli.pairs.PairSets` (:func:`tli.pairs.load_sets`)."""
    from tli.pairs import load_sets

    sets = load_sets(Path(sweep.pairs) if sweep.pairs else None)
    if len(sets.trained) < 2 or len(sets.control) < 2:
        raise TLIError(f"{sets.where}: the sweep needs a pair list with a trained and a "
                       "control split")  # fmt: skip
    sets.check_leakage(sweep.allow_overlap, "[sweep] allow_overlap = true")
    return sets


def _sets(sweep: SweepConfig) -> dict[str, list]:
    """The sweep's trained and control sets."""
    return _pair_sets(sweep).as_dict()


def check_grid(grid: Grid) -> None:
    """Every check a sweep can make before it writes anything or loads a model.

    The pairs (:func:`_sets`), the trackers, the model's device, and each cell's training settings
    against the model's structure on the meta device (:func:`tli.train.check_trainable`).
    """
    from tli.models import ModelConfig, check_loadable, load_config, meta_model
    from tli.surgery import num_layers
    from tli.train import check_tracker, check_trainable

    sweep = grid.sweep
    sets = _sets(sweep)
    for report_to in {c.train.report_to for c in grid.cells}:
        check_tracker(report_to)
    mcfg = ModelConfig(name=sweep.model)
    check_loadable(mcfg)
    _, config = load_config(sweep.model)
    n = num_layers(config)
    where = sweep.pairs or "the bundled lexicon"
    for cell in grid.cells:
        try:
            depth = plan(cell.train, n).load_depth
            check_trainable(cell.train, meta_model(mcfg, max_layer=depth), sets["trained"], where)
        except TLIError as err:
            raise TLIError(f"cell {cell.name}: {err}") from None


def _control_vectors(model: Any, tokenizer: Any, control: Sequence[Any], n: int, pooling: str):
    from tli.embed import embed_strings

    texts = [p.source for p in control] + [p.target for p in control]
    vec = embed_strings(model, tokenizer, texts, [n], num_layers=n, pooling=pooling)  # (1, 2B, D)
    b = len(control)
    return vec[:, :b], vec[:, b:]  # (1, B, D) each


def _figures(pre: tuple, post: tuple, control: Sequence[Any], sweep: SweepConfig) -> dict:
    from tli.evaluate import EvalConfig, compare
    from tli.pairs import gold_mask

    cfg = EvalConfig(pooling=sweep.pooling, n_boot=sweep.n_boot)
    figures, _, _ = compare(pre, post, gold_mask(control), cfg)
    out = {"pre": {}, "post": {}}
    for state in ("pre", "post"):
        for key in FIGURES:
            if key in figures[state]:
                out[state][key] = figures[state][key][0]
    for key in ("margin_change", "margin_change_lo", "margin_change_hi"):
        out["post"][key] = figures["bootstrap"][key][0]
    verdict = figures["verdicts"][0]
    out["verdict"] = verdict["code"]
    # the findings and the flag beside the headline (tli.verdict)
    out["findings"] = {
        key: verdict[key] for key in ("label", "geometry", "retrieval", "collapse", "rank")
    }
    out["n"] = figures["n"]
    return out


def run_cell(
    cell: Cell,
    sweep: SweepConfig,
    sweep_dir: Path,
    base: Any = None,
    threads: int | None = None,
    caches: dict | None = None,
) -> dict[str, Any]:
    """Train one cell and evaluate it on the control set; write and return its ``cell.json``.

    Args:
        cell: the cell.
        sweep: the sweep settings.
        sweep_dir: the sweep directory (holds ``base.safetensors``).
        base: a full-depth :class:`tli.models.LoadedModel` to evaluate with (loaded if None);
            it is left without adapters.
        threads: torch threads for this cell (parallel mode).
        caches: frozen-prefix caches shared by the cells of one sweep run (same base model,
            same word list), so each is built once.
    """
    from safetensors.torch import load_file

    from tli.adapters import attached, check_adapter, read_adapter
    from tli.models import ModelConfig, load_config, load_model
    from tli.surgery import num_layers
    from tli.train import latest_checkpoint, train

    if threads:
        torch.set_num_threads(threads)
    cell_dir = ensure_dir(sweep_dir / "cells" / cell.name)
    train_dir = cell_dir / "train"
    pair_sets = _pair_sets(sweep)
    sets = pair_sets.as_dict()
    mcfg = ModelConfig(name=sweep.model)
    _, config = load_config(sweep.model)
    n = num_layers(config)
    resume = latest_checkpoint(train_dir) is not None and not (train_dir / "train.json").exists()
    if train_dir.exists() and not resume and not (train_dir / "train.json").exists():
        shutil.rmtree(train_dir)
    if not (train_dir / "train.json").exists():
        loaded = load_model(mcfg, max_layer=plan(cell.train, n).load_depth)
        train(
            loaded,
            sets["trained"],
            cell.train,
            train_dir,
            resume=resume,
            model_config=to_dict(mcfg),
            progress=False,
            prefix_cache_store=caches,
            card={
                "languages": list(pair_sets.languages),
                "data": pair_sets.summary(),
                "command": f"tli sweep --grid {sweep_dir / 'grid.toml'} --out {sweep_dir} "
                f"(cell {cell.name})",
            },
        )
        del loaded
    info = json.loads((train_dir / "train.json").read_text())
    if base is None:
        base = load_model(mcfg)
    saved = load_file(sweep_dir / "base.safetensors")
    pre = (saved["source"], saved["target"])
    adapter = read_adapter(train_dir / "final")
    check_adapter(adapter, base)
    with attached(base, adapter, "evaluated") as tuned:
        post = _control_vectors(tuned, base.tokenizer, sets["control"], n, sweep.pooling)
    figures = _figures(pre, post, sets["control"], sweep)
    record = {
        "name": cell.name,
        "axes": cell.axes,
        "train": to_dict(cell.train),
        "train_seconds": info["seconds"],
        "steps": info["steps"],
        "final_loss": info["final_loss"],
        **figures,
    }
    atomic_write_json(cell_dir / "cell.json", record)
    return record


def _done(cell: Cell, sweep_dir: Path) -> dict[str, Any] | None:
    """The cell's record when it is finished with this config and every figure of this tli.

    A record of an older tli (no centred P@1, no findings) is not done: the cell is evaluated
    again from its finished training, which is not repeated.
    """
    path = sweep_dir / "cells" / cell.name / "cell.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("train") != json.loads(json.dumps(to_dict(cell.train))):
        return None
    if "findings" not in record or not set(FIGURES) <= set(record.get("post", {})):
        return None
    return record


def _base_figures(sweep: SweepConfig, sweep_dir: Path, base: Any) -> dict[str, Any]:
    from tli.io import atomic_write_safetensors

    sets = _sets(sweep)
    src, tgt = _control_vectors(
        base.model, base.tokenizer, sets["control"], base.num_layers, sweep.pooling
    )
    atomic_write_safetensors(
        sweep_dir / "base.safetensors", {"source": src.contiguous(), "target": tgt.contiguous()}
    )
    figures = _figures((src, tgt), (src, tgt), sets["control"], sweep)["pre"]
    record = {
        "model": sweep.model,
        "pooling": sweep.pooling,
        "control": len(sets["control"]),
        "trained": len(sets["trained"]),
        "num_layers": base.num_layers,
        **figures,
    }
    atomic_write_json(sweep_dir / "base.json", record)
    return record


def _cell_worker(args: tuple) -> dict[str, Any]:
    cell, sweep, sweep_dir, threads = args
    return run_cell(cell, sweep, Path(sweep_dir), threads=threads)


def run_sweep(
    grid: Grid, sweep_dir: Path | str, *, jobs: int | None = None, grid_text: str | None = None
) -> list[dict[str, Any]]:
    """Run every unfinished cell (one after another, or ``jobs`` processes), then summarise."""
    from tli.lock import locked_dir

    check_grid(grid)  # bad pairs or settings fail before anything is written or loaded
    with locked_dir(Path(sweep_dir), "sweep"):
        return _run_sweep(grid, Path(sweep_dir), jobs=jobs, grid_text=grid_text)


def _run_sweep(
    grid: Grid, sweep_dir: Path, *, jobs: int | None = None, grid_text: str | None = None
) -> list[dict[str, Any]]:
    from tli.models import ModelConfig, load_model

    jobs = jobs or grid.sweep.jobs
    if grid_text is not None:
        old = sweep_dir / "grid.toml"
        if old.is_file() and old.read_text() != grid_text:
            log.warning(
                "%s: the grid differs from the saved one; finished cells that match "
                "are kept, the rest run",
                sweep_dir,
            )
        atomic_write_text(old, grid_text)
    base = load_model(ModelConfig(name=grid.sweep.model))
    base_record = _base_figures(grid.sweep, sweep_dir, base)
    caches: dict = {}  # frozen-prefix caches of this sweep run
    todo = [c for c in grid.cells if _done(c, sweep_dir) is None]
    log.info(
        "sweep: %d cells, %d done, %d to run (%d at once)",
        len(grid.cells),
        len(grid.cells) - len(todo),
        len(todo),
        jobs,
    )
    start = time.perf_counter()
    if jobs == 1:
        for i, cell in enumerate(todo, 1):
            t = time.perf_counter()
            rec = run_cell(cell, grid.sweep, sweep_dir, base=base, caches=caches)
            log.info(
                "cell %d/%d %s: P@1 %.3f, margin %+.4f [%+.4f, %+.4f] (%.0f s)",
                i,
                len(todo),
                cell.name,
                rec["post"]["p_at_1_s2t_nn"],
                rec["post"]["margin"],
                rec["post"]["margin_lo"],
                rec["post"]["margin_hi"],
                time.perf_counter() - t,
            )
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        del base
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {
                pool.submit(_cell_worker, (c, grid.sweep, str(sweep_dir), threads)): c for c in todo
            }
            for future in cf.as_completed(futures):
                rec = future.result()
                log.info("cell %s: P@1 %.3f", rec["name"], rec["post"]["p_at_1_s2t_nn"])
    records = [_done(c, sweep_dir) for c in grid.cells]
    assert all(r is not None for r in records)
    summary = summarise(records, grid.axes, base_record, grid.sweep.metric)  # type: ignore[arg-type]
    atomic_write_text(sweep_dir / "sweep.csv", to_csv(records, grid.axes))  # type: ignore[arg-type]
    atomic_write_text(sweep_dir / "sweep.md", sweep_markdown(summary, base_record, grid))
    plot_sweep_heatmap(summary, grid.axes, grid.sweep.metric, sweep_dir / "heatmap.png")
    atomic_write_json(
        sweep_dir / "sweep.json",
        {
            "cells": len(records),
            "ran": len(todo),
            "jobs": jobs,
            "seconds": round(time.perf_counter() - start, 1),
            "ranked": summary,
        },
    )
    return records  # type: ignore[return-value]


# --- summaries ----------------------------------------------------------------------------


def to_csv(records: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> str:
    """One row per cell: axes, training time, control figures before and after."""
    buf = io.StringIO()
    cols = ["cell", *axes, "train_seconds", "steps", "final_loss", "verdict"]
    cols += ["geometry", "retrieval", "collapse"]
    cols += [f"pre_{k}" for k in LEVELS] + [f"post_{k}" for k in FIGURES]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in records:
        row = [r["name"], *(_label(r["axes"][a]) for a in axes)]
        row += [r["train_seconds"], r["steps"], r["final_loss"], r["verdict"]]
        row += [r["findings"][k] for k in ("geometry", "retrieval", "collapse")]
        row += [r["pre"].get(k) for k in LEVELS] + [r["post"].get(k) for k in FIGURES]
        writer.writerow(row)
    return buf.getvalue()


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval over seeds (the interval is the mean itself for one)."""
    x = [float(v) for v in values]
    mean = sum(x) / len(x)
    if len(x) < 2:
        return mean, mean, mean
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
    half = t.ppf((1 + level) / 2, len(x) - 1) * sd / math.sqrt(len(x))
    return mean, mean - half, mean + half


def summarise(
    records: Sequence[Mapping[str, Any]], axes: Sequence[str], base: Mapping[str, Any], metric: str
) -> list[dict[str, Any]]:
    """Cells grouped over seeds, ranked by the mean ``metric`` (then the mean margin)."""
    group_axes = [a for a in axes if a != "seed"]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        key = json.dumps({a: r["axes"][a] for a in group_axes})
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        row: dict[str, Any] = {"axes": json.loads(key), "seeds": len(rs)}
        for fig in (
            "p_at_1_s2t_nn",
            "p_at_1_s2t_csls",
            "p_at_1_t2s_nn",
            "p_at_1_s2t_centered",
            "margin",
            "pair_mean",
            "baseline",
        ):
            row[fig] = mean_ci([r["post"][fig] for r in rs])
        row["worst_margin_lo"] = min(r["post"]["margin_lo"] for r in rs)
        row["all_margin_ci_above_0"] = all(r["post"]["margin_lo"] > 0 for r in rs)
        row["train_seconds"] = sum(r["train_seconds"] for r in rs) / len(rs)
        row["verdicts"] = sorted({r["verdict"] for r in rs})
        row["collapse_flags"] = sum(bool(r["findings"]["collapse"]) for r in rs)
        row["ratio_vs_base"] = (
            row["p_at_1_s2t_nn"][0] / base["p_at_1_s2t_nn"] if base["p_at_1_s2t_nn"] else None
        )
        out.append(row)
    out.sort(key=lambda r: (r[metric][0] if metric in r else 0, r["margin"][0]), reverse=True)
    return out


# --- command line -------------------------------------------------------------------------


