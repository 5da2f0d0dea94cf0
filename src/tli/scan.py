"""The layer scan: the paper's pilot study (sec. 3.2), with the controls it lacked.

For every layer 0..N (0 = input embeddings, N = final; docs/design.md, fact 3) and every set of
pairs (trained, control), the scan reports the paper's metric (mean and std of the translation
pair cosine) beside what is needed to read it: the mismatched-pair baseline, the margin (pairs
minus baseline) with a seeded bootstrap CI, and retrieval (P@1, P@5, MRR; nearest neighbour,
CSLS, and nearest neighbour after mean-centring each side; both directions). With ``center`` it
adds every other metric after the same centring too (centred margin, centred CSLS). Beside them
stand the frozen yardsticks of :mod:`tli.yardsticks` (a Procrustes map fitted on the trained
pairs, scored by NN, CSLS and centred NN; centred NN without a map), per layer. It then
chooses a layer by one rule (``select_by``), reports the next best, and warns when the choice
looks like anisotropy rather than alignment.

All strings of all sets are embedded once, at every layer, in one decoder pass per batch
(:func:`tli.embed.embed`); the maths is :func:`tli.metrics.alignment_summary`. A
:class:`ScanResult` is written to a directory as ``scan.csv`` (long format), ``scan.json``
(config, summaries, choice) and ``scan.png`` (Figure 1), and read back by :meth:`ScanResult.load`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tli.config import (
    MAX_BATCH,
    MAX_RESAMPLES,
    check_int,
    check_one_of,
    check_range,
    check_seed,
    check_unit,
)
from tli.embed import POOLINGS, Embedding, Pooling
from tli.errors import TLIError
from tli.pairs import check_sets, gold_mask
from tli.yardsticks import from_json as yardsticks_from_json

log = logging.getLogger("tli")

#: ``select_by`` value -> the summary key whose argmax chooses the layer.
SELECT_METRICS: dict[str, str] = {
    "cosine": "pair_mean",
    "margin": "margin",
    "p_at_1": "p_at_1_s2t_nn",
}
SELECT_BY: tuple[str, ...] = tuple(SELECT_METRICS)
SelectBy = Literal["cosine", "margin", "p_at_1"]
#: The sets a layer can be chosen on.
SELECT_ON: tuple[str, ...] = ("trained", "control")
SelectOn = Literal["trained", "control"]
#: Prefix of the metric names of the centred variants (``--center``) in ``scan.csv``.
CENTERED_PREFIX = "centered_"
#: Prefix of the frozen yardsticks' metric names in ``scan.csv`` (:mod:`tli.yardsticks`).
YARDSTICK_PREFIX = "yardstick_"
#: File names inside a scan directory.
CSV_NAME, JSON_NAME, PNG_NAME = "scan.csv", "scan.json", "scan.png"


@dataclass(frozen=True)
class ScanConfig:
    """How to scan the layers and choose one. Every default is the paper's unless noted."""

    pooling: Pooling = field(
        default="mean",
        metadata={
            "help": "how token states become one vector: mean (over the word's own tokens), "
            "mean_all (all attention-masked tokens, BOS included: the paper's pilot, sec. 3.2) "
            "or last. tli pools one way everywhere (docs/design.md, fact 3), so the default is "
            "mean",
        },
    )
    center: bool = field(
        default=False,
        metadata={
            "help": "also report every metric (margin, CSLS, ...) after subtracting each "
            "side's mean vector over its set, per layer (the centring of MUSE and vecmap; not "
            "in the paper). Centred nearest-neighbour retrieval is always reported"
        },
    )
    select_by: SelectBy = field(
        default="cosine",
        metadata={
            "help": "rule that chooses the layer: cosine (argmax of mean pair cosine; paper, "
            "sec. 3.2), margin (pair minus mismatched baseline) or p_at_1 (retrieval "
            "source->target, nearest neighbour); ties go to the larger margin",
        },
    )
    select_on: SelectOn = field(
        default="trained",
        metadata={
            "help": "set whose metrics choose the layer (default trained: choosing on the "
            "control set would let the held-out pairs steer training; the paper scanned all)"
        },
    )
    batch_size: int = field(
        default=64, metadata={"help": "strings per forward pass (not in the paper)"}
    )
    n_boot: int = field(
        default=1000, metadata={"help": "bootstrap resamples of the margin CI (not in the paper)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})
    level: float = field(default=0.95, metadata={"help": "coverage of the margin CI"})
    csls_k: int = field(
        default=10,
        metadata={"help": "neighbourhood size of CSLS (Conneau et al. 2018, MUSE: k = 10)"},
    )
    baseline_warn: float = field(
        default=0.9,
        metadata={
            "help": "warn when the chosen layer's mismatched baseline is above this "
            "(docs/design.md, fact 1: 0.91-0.99 at layers 1-17 of gemma-3-270m)"
        },
    )

    def __post_init__(self) -> None:
        check_one_of("pooling", self.pooling, POOLINGS)
        check_one_of("select_by", self.select_by, SELECT_BY)
        check_one_of("select_on", self.select_on, SELECT_ON)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("n_boot", self.n_boot, 1, MAX_RESAMPLES)
        check_int("csls_k", self.csls_k, 1, MAX_BATCH)
        check_seed("seed", self.seed)
        if not isinstance(self.center, bool):
            raise TLIError(f"center must be true or false, got {self.center!r}")
        check_unit("level", self.level)
        check_range("baseline_warn", self.baseline_warn, -1.0, 1.0)


Summary = dict[str, list[float]]  # metric -> one value per scanned layer


@dataclass
class ScanResult:
    """What a scan found: per-set, per-layer summaries and the chosen layer.

    Attributes:
        config: The scan's configuration.
        model: The model's name as given.
        num_layers: N, the model's depth; layer indices run 0..N.
        layers: The scanned layer indices (0..N for a full model).
        sets: Set name -> :func:`tli.metrics.alignment_summary` (one value per scanned layer).
        centered: The same for the centred vectors; empty without ``config.center``.
        n_pairs: Set name -> number of pairs.
        chosen_layer: The layer that ``config.select_by`` chose on set ``select_set``.
        next_best_layer: The runner-up by the same rule (None with one layer).
        select_set: The set the choice was made on.
        warnings: Doubts about the choice (also logged on the ``tli`` logger).
        notes: Facts about the choice worth knowing (e.g. layer N is the evaluated layer).
        timings: Seconds: ``embed_s``, ``metrics_s``, ``total_s`` (and ``load_s`` from the CLI).
        inputs: Where the pairs came from (set by the CLI: ``pairs``, ``control`` file names).
        yardsticks: The frozen yardsticks per set and layer
            (:func:`tli.yardsticks.frozen_yardsticks`); empty in scans of older tli versions.
        languages: The source and target language names, for labels.
        embedding: The pooled vectors of every string at every scanned layer and how they were
            made (:class:`tli.embed.Embedding`), kept in memory for a later stage of the same
            process (the evaluation's base vectors); never saved.
    """

    config: ScanConfig
    model: str
    num_layers: int
    layers: list[int]
    sets: dict[str, Summary]
    centered: dict[str, Summary]
    n_pairs: dict[str, int]
    chosen_layer: int
    next_best_layer: int | None
    select_set: str
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    yardsticks: dict[str, Any] = field(default_factory=dict)
    languages: tuple[str, str] = ("source", "target")
    embedding: Embedding | None = field(default=None, repr=False, compare=False)

    @property
    def select_metric(self) -> str:
        """The summary key that chose the layer, e.g. ``pair_mean``."""
        return SELECT_METRICS[self.config.select_by]

    def value(self, set_name: str, metric: str, layer: int, *, centered: bool = False) -> float:
        """One metric of one set at one layer."""
        table = self.centered if centered else self.sets
        return table[set_name][metric][self.layers.index(layer)]

    # --- files --------------------------------------------------------------------------

    def rows(self) -> list[tuple[int, str, str, float]]:
        """Long-format rows ``(layer, set, metric, value)``; centred and yardstick ones prefixed."""
        out = []
        yard = (self.yardsticks or {}).get("sets", {})
        for prefix, table in (
            ("", self.sets),
            (CENTERED_PREFIX, self.centered),
            (YARDSTICK_PREFIX, yard),
        ):
            for set_name, summary in table.items():
                for metric, values in summary.items():
                    for layer, value in zip(self.layers, values, strict=True):
                        out.append((layer, set_name, prefix + metric, value))
        return sorted(out, key=lambda r: (r[0], list(self.sets).index(r[1])))

    def to_csv(self) -> str:
        """``scan.csv``: columns layer, set, metric, value (full float precision)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(("layer", "set", "metric", "value"))
        for layer, set_name, metric, value in self.rows():
            writer.writerow((layer, set_name, metric, repr(float(value))))
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        """``scan.json``: everything needed to understand, redraw and repeat the scan."""
        from tli import __version__

        sel = self.select_set
        key = self.select_metric
        return {
            "stage": "scan",
            "tli_version": __version__,
            "model": self.model,
            "inputs": dict(self.inputs),
            "languages": list(self.languages),
            "num_layers": self.num_layers,
            "layers": list(self.layers),
            "config": dataclasses.asdict(self.config),
            "n_pairs": dict(self.n_pairs),
            "selection": {
                "select_by": self.config.select_by,
                "metric": key,
                "set": sel,
                "chosen_layer": self.chosen_layer,
                "chosen_value": self.value(sel, key, self.chosen_layer),
                "next_best_layer": self.next_best_layer,
                "next_best_value": None
                if self.next_best_layer is None
                else self.value(sel, key, self.next_best_layer),
            },
            "chosen_layer": self.chosen_layer,
            "next_best_layer": self.next_best_layer,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "timings": dict(self.timings),
            "sets": self.sets,
            "centered": self.centered,
            "yardsticks": self.yardsticks,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``scan.csv`` and, last, ``scan.json`` atomically into a directory.

        ``scan.json`` is written last, so a directory with a ``scan.json`` holds a whole scan.
        Figure 1 is drawn from the saved result by :func:`tli.plots.plot_scan`.
        """
        from tli.io import atomic_write_json, atomic_write_text, ensure_dir

        directory = ensure_dir(directory)
        atomic_write_text(directory / CSV_NAME, self.to_csv())
        atomic_write_json(directory / JSON_NAME, self.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ScanResult:
        """Read a scan back from its directory (``scan.json``; the CSV is derived from it)."""
        path = Path(directory)
        path = path / JSON_NAME if path.is_dir() else path
        from tli.io import read_text

        if not path.exists():
            raise TLIError(f"{path}: no such file (not a scan directory?)")
        try:
            data = json.loads(read_text(path))  # a regular file only: a FIFO would block
        except (ValueError, RecursionError) as err:
            raise TLIError(f"{path}: cannot read: {err}") from None
        try:
            if data.get("stage") != "scan":
                raise KeyError("stage")
            names = {f.name for f in dataclasses.fields(ScanConfig)}
            config = ScanConfig(**{k: v for k, v in data["config"].items() if k in names})
            return cls(
                config=config,
                model=str(data["model"]),
                num_layers=int(data["num_layers"]),
                layers=[int(x) for x in data["layers"]],
                sets=_floats(data["sets"]),
                centered=_floats(data.get("centered") or {}),
                n_pairs={k: int(v) for k, v in data["n_pairs"].items()},
                chosen_layer=int(data["chosen_layer"]),
                next_best_layer=None
                if data.get("next_best_layer") is None
                else int(data["next_best_layer"]),
                select_set=str(data["selection"]["set"]),
                warnings=list(data.get("warnings", [])),
                notes=list(data.get("notes", [])),
                timings={k: float(v) for k, v in data.get("timings", {}).items()},
                inputs={k: str(v) for k, v in data.get("inputs", {}).items()},
                yardsticks=yardsticks_from_json(data.get("yardsticks")),
                languages=tuple(data.get("languages", ("source", "target"))),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise TLIError(f"{path}: not a tli scan result ({type(err).__name__}: {err})") from None

    # --- text ---------------------------------------------------------------------------

    def table(self, *, with_warnings: bool = True) -> str:
        """A short plain-text summary: one block per set, then the choice and the warnings."""
        from tli.tables import scan_table

        return scan_table(self, with_warnings=with_warnings)


def _floats(table: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[str, Summary]:
    """JSON summaries back to floats (JSON ``null`` was a NaN)."""
    return {
        s: {m: [math.nan if v is None else float(v) for v in vals] for m, vals in d.items()}
        for s, d in table.items()
    }


# --- choosing a layer -----------------------------------------------------------------------


def select_layer(
    summary: Mapping[str, Sequence[float]], layers: Sequence[int], select_by: str
) -> tuple[int, int | None]:
    """The best and the next-best layer by one rule.

    Every scanned layer is eligible, 0 and N included (the paper scanned them all and took the
    argmax); :func:`check_choice` reports what a choice of 0 or N means.

    Args:
        summary: Metric -> one value per layer (one set's :func:`tli.metrics.alignment_summary`).
        layers: The layer index of each value.
        select_by: A key of :data:`SELECT_METRICS`.

    Returns:
        ``(chosen, next_best)``; ``next_best`` is None when only one layer was scanned. Ties in
        the rule's metric go to the larger margin, then to the lower layer; NaN ranks last.
    """
    if select_by not in SELECT_METRICS:
        raise TLIError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    values = summary[SELECT_METRICS[select_by]]
    margins = summary.get("margin", [0.0] * len(values))

    def score(v: float) -> float:
        return -math.inf if v is None or math.isnan(v) else v

    order = sorted(
        range(len(layers)), key=lambda i: (-score(values[i]), -score(margins[i]), layers[i])
    )
    return layers[order[0]], (layers[order[1]] if len(order) > 1 else None)


def check_choice(
    sets: Mapping[str, Mapping[str, Sequence[float]]],
    layers: Sequence[int],
    chosen: int,
    num_layers: int,
    *,
    baseline_warn: float = 0.9,
    level: float = 0.95,
) -> tuple[list[str], list[str]]:
    """Warnings and notes about a chosen layer, for every set.

    Warns when the margin CI includes zero (or lies below it), when the mismatched baseline is
    above ``baseline_warn`` (docs/design.md, fact 1), and when layer 0 is chosen (no block lies
    below it, so training there has nothing to train; docs/design.md, fact 4). Notes when layer N is
    chosen (the layer the evaluation measures).

    Returns:
        ``(warnings, notes)``, each a list of one-line messages.
    """
    i = list(layers).index(chosen)
    pct = int(round(level * 100))
    warnings: list[str] = []
    for name, s in sets.items():
        lo, hi, base = s["margin_lo"][i], s["margin_hi"][i], s["baseline"][i]
        if hi < 0:
            warnings.append(
                f"layer {chosen}, {name}: translations are less similar than mismatched pairs "
                f"(margin {s['margin'][i]:+.4f}, {pct}% CI [{lo:+.4f}, {hi:+.4f}])"
            )
        elif lo <= 0:
            warnings.append(
                f"layer {chosen}, {name}: the margin's {pct}% CI [{lo:+.4f}, {hi:+.4f}] includes "
                "zero: translation pairs are not measurably closer than mismatched pairs"
            )
        if base > baseline_warn:
            warnings.append(
                f"layer {chosen}, {name}: mismatched-pair baseline {base:.4f} > {baseline_warn}: "
                f"the high cosine there (pairs {s['pair_mean'][i]:.4f}) is anisotropy, "
                "not alignment"
            )
    if chosen == 0:
        warnings.append(
            "layer 0 is the input embeddings: no block lies below it, so an adapter trained "
            "there receives no gradient"
        )
    notes = []
    if chosen == num_layers:
        notes.append(
            f"layer {chosen} is the final layer, the one the evaluation measures: training "
            "there optimises the evaluation's own representation"
        )
    return warnings, notes


def build_result(
    cfg: ScanConfig,
    *,
    model: str,
    num_layers: int,
    layers: Sequence[int],
    sets: dict[str, Summary],
    n_pairs: Mapping[str, int],
    centered: dict[str, Summary] | None = None,
    timings: Mapping[str, float] | None = None,
    yardsticks: dict[str, Any] | None = None,
) -> ScanResult:
    """Choose the layer from computed summaries, check the choice, and log the warnings."""
    if not sets:
        raise TLIError("nothing to scan: no set has pairs")
    select_set = cfg.select_on if cfg.select_on in sets else next(iter(sets))
    notes = []
    if select_set != cfg.select_on:
        notes.append(f"no set {cfg.select_on!r}; the layer was chosen on {select_set!r}")
    layers = [int(x) for x in layers]
    chosen, next_best = select_layer(sets[select_set], layers, cfg.select_by)
    warnings, more = check_choice(
        sets, layers, chosen, num_layers, baseline_warn=cfg.baseline_warn, level=cfg.level
    )
    for message in warnings:
        log.warning("%s", message)
    return ScanResult(
        config=cfg,
        model=model,
        num_layers=num_layers,
        layers=layers,
        sets=sets,
        centered=centered or {},
        n_pairs=dict(n_pairs),
        chosen_layer=chosen,
        next_best_layer=next_best,
        select_set=select_set,
        warnings=warnings,
        notes=notes + more,
        timings=dict(timings or {}),
        yardsticks=dict(yardsticks or {}),
    )


# --- the scan -------------------------------------------------------------------------------


def run_scan(
    loaded: Any,
    sets: Mapping[str, Sequence[Any]],
    cfg: ScanConfig | None = None,
    *,
    languages: tuple[str, str] = ("source", "target"),
) -> ScanResult:
    """Scan every layer of a model on sets of word pairs and choose a layer.

    Args:
        loaded: A :class:`tli.models.LoadedModel`. A full model is scanned at 0..N; a model
            built with ``max_layer=L`` at 0..L.
        sets: Set name (e.g. ``trained``, ``control``) -> its :class:`tli.pairs.Pair` list.
            Empty sets are skipped; a set needs at least 2 pairs (a baseline needs mismatched
            pairs).
        cfg: The scan's configuration (defaults: :class:`ScanConfig`).
        languages: The source and target language names, for labels.

    Returns:
        The :class:`ScanResult`; warnings about the choice are also logged. Its ``embedding``
        holds the embedded strings, for :func:`tli.evaluate.evaluate` to reuse.
    """
    from tli.embed import embed
    from tli.metrics import alignment_summary
    from tli.yardsticks import frozen_yardsticks

    cfg = cfg or ScanConfig()
    start = time.perf_counter()
    sets = check_sets(sets, "the scan")
    depth = loaded.num_layers if not loaded.truncated else loaded.depth
    layers = list(range(depth + 1))
    # Every distinct string once, whatever set or side it comes from.
    texts = list(
        dict.fromkeys(s for pairs in sets.values() for p in pairs for s in (p.source, p.target))
    )
    where = {text: i for i, text in enumerate(texts)}
    vectors = embed(loaded, texts, layers, pooling=cfg.pooling, batch_size=cfg.batch_size)
    embedded = time.perf_counter()  # (L, S, D) for S distinct strings

    def side(attr: str) -> dict[str, torch.Tensor]:
        return {
            name: vectors[:, [where[getattr(p, attr)] for p in pairs]]  # (L, B, D)
            for name, pairs in sets.items()
        }

    src, tgt = side("source"), side("target")
    golds = {name: gold_mask(pairs) for name, pairs in sets.items()}

    def summaries(s: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> dict[str, Summary]:
        return {
            name: alignment_summary(
                s[name],
                t[name],
                golds[name],
                n_boot=cfg.n_boot,
                seed=cfg.seed,
                csls_k=cfg.csls_k,
                level=cfg.level,
            )
            for name in sets
        }

    summary = summaries(src, tgt)
    centered: dict[str, Summary] = {}
    if cfg.center:
        centered = summaries(_center_language(src), _center_language(tgt))
    measured = time.perf_counter()
    yardsticks = frozen_yardsticks(src, tgt, golds, csls_k=cfg.csls_k, level=cfg.level)
    done = time.perf_counter()
    timings = {
        "embed_s": embedded - start,
        "metrics_s": measured - embedded,
        "yardsticks_s": done - measured,
        "total_s": done - start,
        "n_strings": float(len(texts)),
    }
    log.debug("scan: %d strings, %d layers, %.2f s", len(texts), len(layers), done - start)
    result = build_result(
        cfg,
        model=loaded.name,
        num_layers=loaded.num_layers,
        layers=layers,
        sets=summary,
        n_pairs={name: len(pairs) for name, pairs in sets.items()},
        centered=centered,
        timings=timings,
        yardsticks=yardsticks,
    )
    result.languages = (str(languages[0]), str(languages[1]))
    result.embedding = Embedding(
        loaded.model, tuple(texts), tuple(layers), cfg.pooling, cfg.batch_size, vectors
    )
    return result


def _center_language(by_set: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Centre one language's vectors per set and layer, by the set's own mean.

    The same centring as :func:`tli.metrics.centered_similarity`, so the centred P@1 of
    ``--center`` equals the always-reported ``p_at_1_<dir>_centered``, and a set's figures
    depend on its own vectors only (the control set scores the same in the scan, the
    evaluation and a sweep, which embeds it alone).
    """
    from tli.metrics import center

    return {name: center(x.to(torch.float64)) for name, x in by_set.items()}  # (L, B, D) each


# --- command line ---------------------------------------------------------------------------


