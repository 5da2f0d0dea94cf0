"""`tli sweep`: train a grid of objectives and judge each on the control set at the final layer.

A grid file (TOML) names the model, the shared training values, named objectives and the axes::

    [sweep]
    model = "gemma-3-270m"      # any tli model name
    # preset = "aligned"        # a named preset's training values and pooling as the base
    pooling = "mean"            # one pooling for training and evaluation
    # pairs = "my_pairs.tsv"    # default: the bundled lexicon and its split
    metric = "p_at_1_s2t_nn"    # what the ranked table sorts by
    jobs = 1                    # cells at once (processes); --jobs overrides
    # validation = 0.2          # hold out this share of the trained pairs; rank on it
    # perplexity = true         # each cell's perplexity change on the bundled texts

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
the verdict's findings and collapse flag). The pairs a cell trained on are scored the same way
(``trained`` in its record: how well the adapter injected them).

**Validation split.** With ``validation = F`` (0 < F < 1), tli's leakage-free split
(:func:`tli.pairs.split_pairs`, seed ``validation_seed``) holds out a share F of the trained
pairs, whole groups of related words at a time: cells train on the rest and are also scored on
the held-out part (``validation`` in the record), and the ranking (sweep.md, the heatmap) uses
the validation figure. Control figures are still recorded per cell, for the report only: a
choice made on them would tune to the control set.

**Perplexity.** With ``perplexity = true`` each cell also gets the change of per-token
perplexity on the bundled everyday texts (:mod:`tli.perplexity`), per language, with its
paired bootstrap CI.

Sweep directory::

    grid.toml        the grid, as given
    base.json        the base model's control figures (computed once)
    cells/NAME/      train/ (the training directory) and cell.json (written last: done)
    validation.tsv   with validation: the trained pairs, the held-out part marked control
    sweep.csv        one row per cell
    sweep.md         cells ranked by the metric, averaged over seeds with t-intervals
    heatmap.png      the metric per objective (rows) and remaining axes (columns)

A cell whose ``cell.json`` exists with the same config is skipped on a re-run, so an interrupted
sweep continues where it stopped (an unfinished training resumes from its checkpoint).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
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

from tli.config import MAX_RESAMPLES, build, check_int, check_seed, read_toml, to_dict
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
    validation: float = field(
        default=0.0,
        metadata={
            "help": "share of the trained pairs held out as a validation split (whole groups "
            "of related words); cells train on the rest and are ranked on it. 0: off"
        },
    )
    validation_seed: int = field(default=0, metadata={"help": "seed of the validation split"})
    perplexity: bool = field(
        default=False,
        metadata={"help": "record each cell's perplexity change on the bundled texts"},
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
        if not 0 <= self.validation < 1:
            raise TLIError(f"[sweep] validation must be in [0, 1), got {self.validation}")
        check_seed("[sweep] validation_seed", self.validation_seed)


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


def _sets(sweep: SweepConfig, pair_sets: Any = None) -> dict[str, list]:
    """The sweep's sets: trained, control and validation.

    With ``validation``, the validation part is carved out of the trained pairs; the cells train
    on the rest, which is then ``trained``.
    """
    from tli.pairs import split_pairs, split_sets

    out = (pair_sets or _pair_sets(sweep)).as_dict()
    if sweep.validation > 0:
        parts = split_sets(
            split_pairs(
                out["trained"], control_fraction=sweep.validation, seed=sweep.validation_seed
            )
        )
        if len(parts["trained"]) < 2 or len(parts["control"]) < 2:
            raise TLIError(
                f"[sweep] validation = {sweep.validation}: the {len(out['trained'])} trained "
                f"pairs leave {len(parts['control'])} for validation and "
                f"{len(parts['trained'])} to train on; each needs at least 2"
            )
        out["trained"], out["validation"] = parts["trained"], parts["control"]
    return out


def _scored(sweep: SweepConfig) -> tuple[str, ...]:
    """The sets every cell is scored on, besides control (which is ``pre``/``post``)."""
    return ("trained", "validation") if sweep.validation > 0 else ("trained",)


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
    sets = _sets(sweep, pair_sets)
    mcfg = ModelConfig(name=sweep.model)
    _, config = load_config(sweep.model)
    n = num_layers(config)
    if (train_dir / "train.json").exists() and not _same_pairs(train_dir, sets["trained"]):
        log.info("%s: trained on other pairs (the split changed); training again", cell.name)
        shutil.rmtree(train_dir)
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
    adapter = read_adapter(train_dir / "final")
    check_adapter(adapter, base)
    scored: dict[str, Any] = {}
    with attached(base, adapter, "evaluated") as tuned:
        post = _control_vectors(tuned, base.tokenizer, sets["control"], n, sweep.pooling)
        for name in _scored(sweep):
            vectors = _control_vectors(tuned, base.tokenizer, sets[name], n, sweep.pooling)
            pre_set = (saved[f"{name}.source"], saved[f"{name}.target"])
            scored[name] = _figures(pre_set, vectors, sets[name], sweep)
        if sweep.perplexity:
            scored["perplexity"] = _perplexity_changes(tuned, base.tokenizer, saved, sweep)
    figures = _figures((saved["source"], saved["target"]), post, sets["control"], sweep)
    record = {
        "name": cell.name,
        "axes": cell.axes,
        "train": to_dict(cell.train),
        "split": _split_record(sweep, sets),
        "train_seconds": info["seconds"],
        "steps": info["steps"],
        "final_loss": info["final_loss"],
        **figures,
        **scored,
        # per control pair, whether centred retrieval ranks its translation first (s2t, final
        # layer): for paired comparisons with other retrievers on the same pairs
        "hits_s2t_centered": _centred_hits(post, sets["control"]),
    }
    atomic_write_json(cell_dir / "cell.json", record)
    return record


def _centred_hits(vectors: tuple, pairs: Sequence[Any]) -> list[int]:
    """1 where centred nearest-neighbour retrieval (s2t) ranks pair i's translation first."""
    from tli.metrics import centered_report
    from tli.pairs import gold_mask

    ranks = centered_report(vectors[0][0], vectors[1][0], gold_mask(pairs))["rank_centered"]
    return [int(r == 1) for r in ranks.tolist()]


def _same_pairs(train_dir: Path, pairs: Sequence[Any]) -> bool:
    """Whether ``train_dir`` was trained on exactly ``pairs`` (its ``pairs.tsv``)."""
    from tli.pairs import read_pairs

    path = train_dir / "pairs.tsv"
    if not path.is_file():
        return False
    done = [(p.source, p.target) for p in read_pairs(path)]
    return done == [(p.source, p.target) for p in pairs]


def _split_record(sweep: SweepConfig, sets: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The split a cell was trained and scored on (part of its identity)."""
    return {
        "validation": sweep.validation,
        "validation_seed": sweep.validation_seed if sweep.validation > 0 else None,
        **{f"{k}_pairs": len(v) for k, v in sets.items()},
    }


def _perplexity_changes(model: Any, tokenizer: Any, saved: Mapping[str, Any], sweep: SweepConfig):
    """Per language, the perplexity change of ``model`` against the base NLLs in ``saved``."""
    from tli.perplexity import load_texts, perplexity_change, sentence_nll

    out = {}
    for code, texts in load_texts().items():
        tuned = sentence_nll(model, tokenizer, texts)
        base = (saved[f"nll.{code}"].numpy(), saved[f"tokens.{code}"].numpy())
        out[code] = perplexity_change(base, tuned, n_boot=sweep.n_boot)
    return out


def _done(cell: Cell, sweep_dir: Path, sweep: SweepConfig) -> dict[str, Any] | None:
    """The cell's record when it is finished with this config, split and every figure asked for.

    A record of an older tli (no centred P@1, no findings, no trained-set figures) or one
    without the perplexity now asked for is not done: the cell is evaluated again from its
    finished training, which is not repeated. A record of another validation split is not done
    either, and its training (on other pairs) is repeated.
    """
    path = sweep_dir / "cells" / cell.name / "cell.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("train") != json.loads(json.dumps(to_dict(cell.train))):
        return None
    if "findings" not in record or not set(FIGURES) <= set(record.get("post", {})):
        return None
    split = record.get("split") or {}
    if split.get("validation", 0.0) != sweep.validation or (
        sweep.validation > 0 and split.get("validation_seed") != sweep.validation_seed
    ):
        return None
    if any(name not in record for name in _scored(sweep)):
        return None
    if sweep.perplexity and "perplexity" not in record:
        return None
    return record


def _base_settings(sweep: SweepConfig, sets: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """What the base figures depend on: kept in base.json, to reuse them on a re-run."""
    return {
        "model": sweep.model,
        "pooling": sweep.pooling,
        "n_boot": sweep.n_boot,
        "perplexity": sweep.perplexity,
        "pairs": {k: [[p.source, p.target, *p.alternatives] for p in v] for k, v in sets.items()},
    }


def _base_figures(sweep: SweepConfig, sweep_dir: Path, base: Any) -> dict[str, Any]:
    from tli.io import atomic_write_safetensors

    sets = _sets(sweep)
    settings = _base_settings(sweep, sets)
    digest = hashlib.blake2b(json.dumps(settings).encode(), digest_size=16).hexdigest()
    saved = sweep_dir / "base.json"
    if saved.is_file() and (sweep_dir / "base.safetensors").is_file():
        record = json.loads(saved.read_text())
        if record.get("settings") == digest:
            return record  # the same model, pooling and sets: nothing to recompute
    src, tgt = _control_vectors(
        base.model, base.tokenizer, sets["control"], base.num_layers, sweep.pooling
    )
    tensors = {"source": src.contiguous(), "target": tgt.contiguous()}
    scored: dict[str, Any] = {}
    for name in _scored(sweep):
        s, t = _control_vectors(
            base.model, base.tokenizer, sets[name], base.num_layers, sweep.pooling
        )
        tensors[f"{name}.source"], tensors[f"{name}.target"] = s.contiguous(), t.contiguous()
        scored[name] = _figures((s, t), (s, t), sets[name], sweep)["pre"]
    if sweep.perplexity:
        from tli.perplexity import load_texts, perplexity, sentence_nll

        scored["perplexity"] = {}
        for code, texts in load_texts().items():
            nll, counts = sentence_nll(base.model, base.tokenizer, texts)
            tensors[f"nll.{code}"] = torch.from_numpy(nll)
            tensors[f"tokens.{code}"] = torch.from_numpy(counts)
            scored["perplexity"][code] = perplexity(nll, counts)
    atomic_write_safetensors(sweep_dir / "base.safetensors", tensors)
    if sweep.validation > 0:
        from tli.pairs import write_pairs

        # validation rows as "control": `tli evaluate --pairs validation.tsv` scores them so
        write_pairs(
            [dataclasses.replace(p, split="trained") for p in sets["trained"]]
            + [dataclasses.replace(p, split="control") for p in sets["validation"]],
            sweep_dir / "validation.tsv",
        )
    figures = _figures((src, tgt), (src, tgt), sets["control"], sweep)["pre"]
    record = {
        "model": sweep.model,
        "pooling": sweep.pooling,
        "control": len(sets["control"]),
        "trained": len(sets["trained"]),
        "validation": len(sets.get("validation", [])),
        "num_layers": base.num_layers,
        **figures,
        "sets": scored,
        "settings": digest,
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
    todo = [c for c in grid.cells if _done(c, sweep_dir, grid.sweep) is None]
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
    records = [_done(c, sweep_dir, grid.sweep) for c in grid.cells]
    assert all(r is not None for r in records)
    summary = summarise(records, grid.axes, base_record, grid.sweep.metric)  # type: ignore[arg-type]
    shown = ranking_key(grid.sweep.metric, grid.sweep)
    atomic_write_text(sweep_dir / "sweep.csv", to_csv(records, grid.axes))  # type: ignore[arg-type]
    atomic_write_text(sweep_dir / "sweep.md", sweep_markdown(summary, base_record, grid))
    plot_sweep_heatmap(summary, grid.axes, shown, sweep_dir / "heatmap.png")
    atomic_write_json(
        sweep_dir / "sweep.json",
        {
            "cells": len(records),
            "ran": len(todo),
            "jobs": jobs,
            "seconds": round(time.perf_counter() - start, 1),
            "ranked_by": shown,
            "ranked": summary,
        },
    )
    return records  # type: ignore[return-value]


# --- summaries ----------------------------------------------------------------------------


#: The figures of each scored set (trained, validation) in sweep.csv and the summary.
SET_FIGURES = ("p_at_1_s2t_nn", "p_at_1_s2t_csls", "p_at_1_s2t_centered", "margin")


def ranking_key(metric: str, sweep: SweepConfig) -> str:
    """The summary key a sweep ranks by.

    The validation figure when there is a validation split (control never drives a choice
    then), else the control figure.
    """
    return f"validation_{metric}" if sweep.validation > 0 else metric


def _extra_sets(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return [k for k in ("trained", "validation") if all(k in r for r in records)]


def to_csv(records: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> str:
    """One row per cell: axes, training time, control figures before and after.

    Then the trained and validation sets' figures after training, and the perplexity changes,
    when they were scored.
    """
    buf = io.StringIO()
    extra = _extra_sets(records)
    ppl = [c for c in ("sw", "en") if all(c in r.get("perplexity", {}) for r in records)]
    cols = ["cell", *axes, "train_seconds", "steps", "final_loss", "verdict"]
    cols += ["geometry", "retrieval", "collapse"]
    cols += [f"pre_{k}" for k in LEVELS] + [f"post_{k}" for k in FIGURES]
    cols += [f"{name}_{k}" for name in extra for k in SET_FIGURES]
    cols += [f"ppl_{c}_{k}" for c in ppl for k in ("change", "lo", "hi")]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in records:
        row = [r["name"], *(_label(r["axes"][a]) for a in axes)]
        row += [r["train_seconds"], r["steps"], r["final_loss"], r["verdict"]]
        row += [r["findings"][k] for k in ("geometry", "retrieval", "collapse")]
        row += [r["pre"].get(k) for k in LEVELS] + [r["post"].get(k) for k in FIGURES]
        row += [r[name]["post"][k] for name in extra for k in SET_FIGURES]
        row += [r["perplexity"][c][k] for c in ppl for k in ("change", "lo", "hi")]
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
    """Cells grouped over seeds, ranked by the mean ``metric`` (then the mean control margin).

    With validation figures in the records, the ranking uses the validation set's ``metric``
    (``validation_<metric>`` in each row); the control figures are reported, never ranked by.
    """
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
        for name in _extra_sets(rs):
            for fig in SET_FIGURES:
                row[f"{name}_{fig}"] = mean_ci([r[name]["post"][fig] for r in rs])
        if all("perplexity" in r for r in rs):
            for code in rs[0]["perplexity"]:
                row[f"ppl_{code}"] = mean_ci([r["perplexity"][code]["change"] for r in rs])
        out.append(row)
    key = f"validation_{metric}" if out and f"validation_{metric}" in out[0] else metric
    out.sort(key=lambda r: (r[key][0] if key in r else 0, r["margin"][0]), reverse=True)
    return out


# --- command line -------------------------------------------------------------------------
