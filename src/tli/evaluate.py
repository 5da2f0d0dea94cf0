"""Evaluation: the base model vs. the base model with the adapter merged (paper, sec. 3.5 and 4).

Every string of every set is embedded at every layer 0..N (0 = input embeddings, N = final;
docs/design.md, fact 3), in one decoder pass per batch, first by the base model and then by the same
model with the LoRA adapter merged (``merge_and_unload``). Per set and layer the evaluation
reports the paper's figures (mean (std) of the per-pair cosine pre and post, absolute and %
change, paired t-test) and what is needed to read them: Wilcoxon, a bootstrap CI of the mean
change, Cohen's d_z, the mismatched-pair baseline, the margin (pairs minus baseline) with a
*paired* bootstrap CI of its change, and retrieval P@1/P@5/MRR (nearest neighbour and CSLS, both
directions, and nearest neighbour after mean-centring each side) with an exact McNemar test of
each P@1 change. A verdict per set and layer (:mod:`tli.verdict`) states two findings (margin,
retrieval), a collapse flag and a headline made of them, so a rise in raw cosine is never read
as alignment when the baseline shares it (docs/design.md, fact 2). The headline layer is the final
one (the paper's protocol); the adapter's training layer is marked in every table.

An evaluation directory holds::

    pairs.csv            source, target, set, layer, pre, post, change (every pair, every layer)
    evaluation.json      config, model, adapter, per set and layer every figure, verdicts, timings
    evaluation.md        verdicts and findings, Table 1 (final and every layer), retrieval, Table 2
    vectors.safetensors  final- and training-layer vectors pre and post, for figures (t-SNE)

:meth:`EvalResult.load` reads a directory back; :func:`load_vectors` reads the vectors.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tli.adapters import (
    ADAPTER_META,
    AdapterInfo,
    Merged,
    attached,
    check_adapter,
    check_base,
    is_quantized,
    model_facts,
    quantization_note,
    read_adapter,
)
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
from tli.errors import TLIError, first_line
from tli.io import nan_from_null
from tli.metrics import (
    RETRIEVALS,
    Retrieval,
    mismatched_change,
    paired_margin_bootstrap,
    top1_hits,
)
from tli.pairs import check_sets, gold_mask
from tli.verdict import Verdict, VerdictFigures, decide
from tli.yardsticks import from_json as yardsticks_from_json

log = logging.getLogger("tli")

#: File names inside an evaluation directory.
CSV_NAME, JSON_NAME, MD_NAME, VECTORS_NAME = (
    "pairs.csv",
    "evaluation.json",
    "evaluation.md",
    "vectors.safetensors",
)
#: The yardstick figure (:func:`tli.plots.plot_yardsticks`), beside the evaluation's files.
YARDSTICKS_PNG = "yardsticks.png"


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate an adapter. The paper's protocol is the default where it says one."""

    pooling: Pooling = field(
        default="mean",
        metadata={
            "help": "mean (the word's own tokens), mean_all (all attention-masked tokens, the "
            "paper's sec. 3.5) or last; use the pooling the adapter was trained with "
            "(docs/design.md, fact 3: one pooling everywhere)"
        },
    )
    batch_size: int = field(
        default=64, metadata={"help": "strings per forward pass (not in the paper)"}
    )
    n_boot: int = field(
        default=1000,
        metadata={"help": "bootstrap resamples of every CI (not in the paper; tli)"},
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the bootstraps and of Table 2's random sample"}
    )
    level: float = field(default=0.95, metadata={"help": "coverage of the bootstrap CIs"})
    csls_k: int = field(
        default=10,
        metadata={"help": "neighbourhood size of CSLS (Conneau et al. 2018, MUSE: k = 10)"},
    )
    alpha: float = field(
        default=0.05,
        metadata={"help": "significance level of the t-test and McNemar test in the verdict"},
    )
    collapse_ratio: float = field(
        default=0.5,
        metadata={
            "help": "collapse flag: the pair cosine rose significantly, the mismatched "
            "baseline rose by at least this share of it, and the margin-change CI is not "
            "above 0 (docs/evaluation.md)"
        },
    )
    min_effect: float = field(
        default=0.005,
        metadata={
            "help": "the smallest change a verdict names, however small its p-value: in "
            "cosine for the pair cosine and the margin, in share of queries for P@1 "
            "(docs/evaluation.md; not in the paper)"
        },
    )
    verdict_retrieval: Retrieval = field(
        default="s2t_centered",
        metadata={
            "help": "the P@1 the verdict's retrieval finding tests: s2t_centered (source -> "
            "target, nearest neighbour after mean-centring each side; the default, "
            "docs/evaluation.md says why), s2t_nn, s2t_csls, or the t2s_ variants"
        },
    )
    n_examples: int = field(
        default=5,
        metadata={
            "help": "Table 2 rows per kind (largest gains, largest losses, random sample); "
            "the paper shows 8 hand-picked rows"
        },
    )
    procrustes: bool = field(
        default=True,
        metadata={
            "help": "fit the frozen Procrustes yardstick on the trained pairs (docs/scan.md): one "
            "SVD of a D x D matrix per layer, about a minute per layer at D = 4096 on a CPU; "
            "false keeps the map-free centred yardstick and says so"
        },
    )
    perplexity: bool = field(
        default=True,
        metadata={
            "help": "do no harm: per-token perplexity of the base and the adapted model on the "
            "bundled Swahili and English sentences (and --texts files), with a paired bootstrap "
            "CI of the change (docs/perplexity.md; not in the paper). Off (--no-perplexity) "
            "saves two passes of the full model over the texts; the output then says so"
        },
    )
    texts: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "more text files for the perplexity check, comma-separated, each NAME=PATH "
            "or PATH (named by its stem); one sentence per line, UTF-8"
        },
    )
    perplexity_batch_size: int = field(
        default=8,
        metadata={"help": "sentences per forward pass of the perplexity check (bounds B x T x V)"},
    )

    def __post_init__(self) -> None:
        check_one_of("pooling", self.pooling, POOLINGS)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("n_boot", self.n_boot, 1, MAX_RESAMPLES)
        check_int("csls_k", self.csls_k, 1, MAX_BATCH)
        check_int("n_examples", self.n_examples, 0, MAX_BATCH)
        check_seed("seed", self.seed)
        check_int("perplexity_batch_size", self.perplexity_batch_size, 1, MAX_BATCH)
        check_unit("level", self.level)
        check_unit("alpha", self.alpha)
        check_range("collapse_ratio", self.collapse_ratio, 0.0, 100.0, lo_open=True)
        check_range("min_effect", self.min_effect, 0.0, 1.0)
        check_one_of("verdict_retrieval", self.verdict_retrieval, RETRIEVALS)
        if not isinstance(self.perplexity, bool):
            raise TLIError(f"perplexity must be true or false, got {self.perplexity!r}")
        texts = tuple(self.texts)
        object.__setattr__(self, "texts", texts)
        for spec in texts:
            if not isinstance(spec, str) or not spec.strip():
                raise TLIError(f"texts must be file paths (NAME=PATH or PATH), got {spec!r}")


# --- pure functions ---------------------------------------------------------------------------


def compare(
    pre: tuple[torch.Tensor, torch.Tensor],
    post: tuple[torch.Tensor, torch.Tensor],
    gold: torch.Tensor,
    cfg: EvalConfig,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Every figure of one set before and after, at every layer; pure maths, no model.

    Args:
        pre: ``(src, tgt)`` vectors ``(L, B, D)`` before; row i of tgt translates row i of src.
        post: The same after.
        gold: Bool mask ``(B, B)`` of correct candidates (diagonal plus alternatives).
        cfg: Bootstrap, CSLS and verdict settings.

    Returns:
        ``(figures, pre_cos, post_cos)``: ``figures`` maps ``n`` to B and ``pre`` / ``post``
        (:func:`tli.metrics.alignment_summary`), ``change`` (:func:`tli.stats.summarize_change`
        of the per-pair cosines), ``bootstrap`` (:func:`paired_margin_bootstrap`),
        ``p_at_1_tests`` (per retrieval: ``lost``, ``gained``, McNemar ``p``) each to one value
        per layer, and ``verdicts`` to one ``{code, label, reason}`` per layer; ``pre_cos`` and
        ``post_cos`` are the per-pair cosines, float64 ``(L, B)``.
    """
    from tli.metrics import alignment_summary, pair_cosine, similarity
    from tli.stats import discordant_counts, mcnemar_exact, summarize_change

    summary = {
        name: alignment_summary(
            s, t, gold, n_boot=cfg.n_boot, seed=cfg.seed, csls_k=cfg.csls_k, level=cfg.level
        )
        for name, (s, t) in (("pre", pre), ("post", post))
    }
    pre_cos = pair_cosine(*pre).numpy()  # (L, B)
    post_cos = pair_cosine(*post).numpy()  # (L, B)
    n_layers = pre_cos.shape[0]
    changes = [
        summarize_change(pre_cos[i], post_cos[i], n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
        for i in range(n_layers)
    ]
    boot = paired_margin_bootstrap(
        similarity(*pre), similarity(*post), gold, n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level
    )
    hits_pre, hits_post = (top1_hits(s, t, gold, cfg.csls_k) for s, t in (pre, post))
    tests: dict[str, dict[str, list]] = {}
    for kind in RETRIEVALS:
        lost, gained, p = [], [], []
        for i in range(n_layers):
            b, c = discordant_counts(hits_pre[kind][i].numpy(), hits_post[kind][i].numpy())
            lost.append(b)
            gained.append(c)
            p.append(mcnemar_exact(b, c))
        tests[kind] = {"lost": lost, "gained": gained, "p": p}
    figures: dict[str, Any] = {
        "n": int(pre_cos.shape[1]),
        "pre": summary["pre"],
        "post": summary["post"],
        "change": {key: [c[key] for c in changes] for key in changes[0]},
        "bootstrap": {key: value.tolist() for key, value in boot.items()},
        "p_at_1_tests": tests,
    }
    figures["verdicts"] = [
        dataclasses.asdict(
            decide(
                verdict_figures(figures, i, cfg),
                alpha=cfg.alpha,
                collapse_ratio=cfg.collapse_ratio,
                min_effect=cfg.min_effect,
            )
        )
        for i in range(n_layers)
    ]
    return figures, pre_cos, post_cos


def verdict_figures(figures: Mapping[str, Any], i: int, cfg: EvalConfig) -> VerdictFigures:
    """The :class:`tli.verdict.VerdictFigures` of one set (from :func:`compare`) at index i."""
    pre, post, change = figures["pre"], figures["post"], figures["change"]
    boot, kind = figures["bootstrap"], cfg.verdict_retrieval
    test = figures["p_at_1_tests"][kind]
    direction, method = kind.split("_")
    return VerdictFigures(
        pair_pre=pre["pair_mean"][i],
        pair_post=post["pair_mean"][i],
        pair_p=change["p"][i],
        pair_log10_p=change["log10_p"][i],
        baseline_pre=pre["baseline"][i],
        baseline_post=post["baseline"][i],
        margin_pre=pre["margin"][i],
        margin_post=post["margin"][i],
        margin_change_lo=boot["margin_change_lo"][i],
        margin_change_hi=boot["margin_change_hi"][i],
        p1_pre=pre[f"p_at_1_{kind}"][i],
        p1_post=post[f"p_at_1_{kind}"][i],
        p1_lost=int(test["lost"][i]),
        p1_gained=int(test["gained"][i]),
        p1_p=test["p"][i],
        n=int(figures["n"]),
        level=cfg.level,
        p1_name=f"P@1 ({direction}, {method})",
    )


def examples(pre: np.ndarray, post: np.ndarray, n: int, seed: int = 0) -> dict[str, list[int]]:
    """Table 2's rows: indices of the largest gains, the largest losses and a random sample.

    Args:
        pre: Per-pair cosines before, ``(B,)``.
        post: Per-pair cosines after, ``(B,)``.
        n: Rows per kind (fewer when B is smaller).
        seed: Seed of the random sample (``numpy.random.default_rng``).

    Returns:
        ``{"gains": [...], "losses": [...], "random": [...]}``: gains by decreasing change,
        losses by increasing change (the smallest changes, which may be positive when few
        pairs lost), the sample in pair order. Ties keep pair order.
    """
    change = np.asarray(post, dtype=np.float64) - np.asarray(pre, dtype=np.float64)
    k = min(n, change.size)
    order = np.argsort(-change, kind="stable")
    sample = np.random.default_rng(seed).choice(change.size, size=k, replace=False)
    return {
        "gains": order[:k].tolist(),
        "losses": np.argsort(change, kind="stable")[:k].tolist(),
        "random": sorted(int(i) for i in sample),
    }


# --- the adapter ------------------------------------------------------------------------------


# --- the result -------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Everything an evaluation found, and how to write it and read it back.

    Attributes:
        config: The evaluation's settings.
        model: Facts about the base model (name, path, model_type, num_layers, hidden_size).
        adapter: What :meth:`AdapterInfo.summary` records.
        num_layers: N; layer indices run 0..N and N ("final") is the headline layer.
        layers: The evaluated layers (0..N).
        target_layer: The layer the adapter was trained at, when it says so.
        sets: Set name -> the figures of :func:`compare` (one value per layer).
        pairs: Set name -> its ``(source, target)`` pairs, in order.
        cosines: Set name -> ``{"pre", "post"}`` per-pair cosines, float64 ``(L, B)``.
        examples: Set name -> Table 2's indices (:func:`examples`) at the final layer.
        mismatched: Set name -> per-pair final-layer cosine change of mismatched pairs
            (:func:`tli.metrics.mismatched_change`), for the change histogram.
        warnings: Doubts about the evaluation (also logged).
        timings: Seconds per step, and ``total_s``.
        vectors: Tensors for ``vectors.safetensors`` (not read back by :meth:`load`).
        yardsticks: The frozen yardsticks of the base model per set and layer
            (:func:`tli.yardsticks.frozen_yardsticks`); empty in evaluations of older tli.
        perplexity: The do-no-harm check: ``enabled``, ``reason`` (why it is off) and ``sets``
            (key -> :func:`tli.perplexity.perplexity_change` plus ``name`` and ``source``).
        languages: The source and target language names, for labels.
    """

    config: EvalConfig
    model: dict[str, Any]
    adapter: dict[str, Any]
    num_layers: int
    layers: list[int]
    target_layer: int | None
    sets: dict[str, dict[str, Any]]
    pairs: dict[str, list[tuple[str, str]]]
    cosines: dict[str, dict[str, np.ndarray]]
    examples: dict[str, dict[str, list[int]]]
    mismatched: dict[str, list[float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    yardsticks: dict[str, Any] = field(default_factory=dict)
    perplexity: dict[str, Any] = field(default_factory=dict)
    languages: tuple[str, str] = ("source", "target")

    @property
    def headline_layer(self) -> int:
        """The final layer N, the one the paper evaluates."""
        return self.num_layers

    def index(self, layer: int | None = None) -> int:
        """Position of ``layer`` (default: the headline layer) in :attr:`layers`."""
        layer = self.headline_layer if layer is None else layer
        if layer not in self.layers:
            raise TLIError(
                f"layer {layer} was not evaluated (layers {self.layers[0]}..{self.layers[-1]})"
            )
        return self.layers.index(layer)

    def verdict(self, set_name: str, layer: int | None = None) -> Verdict:
        """The verdict of one set at ``layer`` (default: the final layer)."""
        return Verdict(**self.sets[set_name]["verdicts"][self.index(layer)])

    @property
    def verdicts(self) -> dict[str, Verdict]:
        """Set name -> its verdict at the final layer."""
        return {name: self.verdict(name) for name in self.sets}

    def verdict_lines(self, layer: int | None = None) -> list[str]:
        """One ``set (layer L): label: figures`` line per set."""
        layer = self.headline_layer if layer is None else layer
        return [self.verdict(name, layer).line(name, layer) for name in self.sets]

    def harm_line(self) -> str:
        """The do-no-harm line: each text set's perplexity change, or why it was not measured."""
        from tli.perplexity import summary_line

        return summary_line(self.perplexity)

    def summary_lines(self) -> list[str]:
        """The verdict lines at the final layer, then the do-no-harm line."""
        return [*self.verdict_lines(), self.harm_line()]


    # --- tables ---------------------------------------------------------------------------

    def table1(self, layer: int | None = None) -> str:
        """Table 1 in the paper's columns, plus baseline, margin and P@1 (Markdown)."""
        from tli.tables import table1

        return table1(self, layer)

    def findings_table(self, layer: int | None = None) -> str:
        """The verdict's findings and collapse flag per set (Markdown)."""
        from tli.tables import findings_table

        return findings_table(self, layer)

    def retrieval_table(self, layer: int | None = None) -> str:
        """P@1 with Wilson intervals and MRR of every retrieval variant per set (Markdown)."""
        from tli.tables import retrieval_table

        return retrieval_table(self, layer)

    def layer_table(self, set_name: str) -> str:
        """One set at every layer (Markdown); the training and final layers are marked."""
        from tli.tables import layer_table

        return layer_table(self, set_name)

    def table2(self, set_name: str) -> str:
        """Table 2: per-pair examples of one set at the final layer (Markdown)."""
        from tli.tables import table2

        return table2(self, set_name)

    def markdown(self) -> str:
        """``evaluation.md``: verdicts, Table 1 (final and every layer), Table 2."""
        from tli.tables import eval_markdown

        return eval_markdown(self)

    # --- files ----------------------------------------------------------------------------

    def to_csv(self) -> str:
        """``pairs.csv``: source, target, set, layer, pre, post, change (full precision)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(("source", "target", "set", "layer", "pre", "post", "change"))
        for name, pairs in self.pairs.items():
            pre, post = self.cosines[name]["pre"], self.cosines[name]["post"]
            for i, layer in enumerate(self.layers):
                for j, (src, tgt) in enumerate(pairs):
                    a, b = float(pre[i, j]), float(post[i, j])
                    writer.writerow((src, tgt, name, layer, repr(a), repr(b), repr(b - a)))
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        """``evaluation.json``: everything needed to understand, redraw and repeat it."""
        from tli import __version__

        return {
            "stage": "evaluate",
            "tli_version": __version__,
            "config": dataclasses.asdict(self.config),
            "model": dict(self.model),
            "adapter": dict(self.adapter),
            "languages": list(self.languages),
            "num_layers": self.num_layers,
            "layers": list(self.layers),
            "headline_layer": self.headline_layer,
            "target_layer": self.target_layer,
            "n_pairs": {name: len(p) for name, p in self.pairs.items()},
            "verdicts": {
                name: dataclasses.asdict(v) | {"layer": self.headline_layer}
                for name, v in self.verdicts.items()
            },
            "target_layer_verdicts": {
                name: dataclasses.asdict(self.verdict(name, self.target_layer))
                | {"layer": self.target_layer}
                for name in self.sets
            }
            if self.target_layer is not None
            else {},
            "examples": {
                name: {
                    kind: [
                        {
                            "index": j,
                            "source": self.pairs[name][j][0],
                            "target": self.pairs[name][j][1],
                            "pre": float(self.cosines[name]["pre"][self.index(), j]),
                            "post": float(self.cosines[name]["post"][self.index(), j]),
                        }
                        for j in rows
                    ]
                    for kind, rows in ex.items()
                }
                for name, ex in self.examples.items()
            },
            "mismatched_change": {name: list(v) for name, v in self.mismatched.items()},
            "warnings": list(self.warnings),
            "timings": dict(self.timings),
            "perplexity": self.perplexity,
            "yardsticks": self.yardsticks,
            "sets": self.sets,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the files atomically; ``evaluation.json`` last, so its presence means complete."""
        from tli.io import (
            atomic_write_json,
            atomic_write_safetensors,
            atomic_write_text,
            ensure_dir,
        )

        directory = ensure_dir(directory)
        atomic_write_text(directory / CSV_NAME, self.to_csv())
        if self.vectors:
            meta = {
                "model": self.model["name"],
                "adapter": str(self.adapter["dir"]),
                "final_layer": str(self.num_layers),
                "target_layer": "" if self.target_layer is None else str(self.target_layer),
                "pairs": json.dumps(self.pairs, ensure_ascii=False),
                "languages": json.dumps(list(self.languages), ensure_ascii=False),
            }
            tensors = {k: v.contiguous() for k, v in self.vectors.items()}
            atomic_write_safetensors(directory / VECTORS_NAME, tensors, metadata=meta)
        atomic_write_text(directory / MD_NAME, self.markdown())
        atomic_write_json(directory / JSON_NAME, self.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> EvalResult:
        """Read an evaluation back from its directory (``evaluation.json`` and ``pairs.csv``)."""
        path = Path(directory)
        reading = path / JSON_NAME
        from tli.io import read_text

        try:
            if not reading.exists():
                raise FileNotFoundError
            data = json.loads(read_text(reading))  # regular files only: a FIFO would block
            reading = path / CSV_NAME
            if not reading.exists():
                raise FileNotFoundError
            rows = list(csv.DictReader(io.StringIO(read_text(reading))))
        except FileNotFoundError:
            raise TLIError(f"{path}: {reading.name} is missing (not an evaluation?)") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, csv.Error) as err:
            raise TLIError(f"{reading}: cannot read: {first_line(err)}") from None
        columns = {"source", "target", "set", "layer", "pre", "post", "change"}
        if not rows or not columns <= set(rows[0]):
            raise TLIError(
                f"{reading}: not a tli evaluation table (no rows, or not the columns "
                f"{', '.join(sorted(columns))})"
            )
        try:
            if data.get("stage") != "evaluate":
                raise KeyError("stage")
            names = {f.name for f in dataclasses.fields(EvalConfig)}
            config = EvalConfig(**{k: v for k, v in data["config"].items() if k in names})
            layers = [int(x) for x in data["layers"]]
            pairs: dict[str, list[tuple[str, str]]] = {}
            values: dict[str, dict[str, list[float]]] = {}
            first = layers[0]
            for row in rows:
                name = row["set"]
                if int(row["layer"]) == first:
                    pairs.setdefault(name, []).append((row["source"], row["target"]))
                v = values.setdefault(name, {"pre": [], "post": []})
                v["pre"].append(float(row["pre"]))
                v["post"].append(float(row["post"]))
            cosines = {
                name: {k: np.asarray(v[k]).reshape(len(layers), -1) for k in ("pre", "post")}
                for name, v in values.items()
            }
            examples = {
                name: {kind: [int(r["index"]) for r in rs] for kind, rs in ex.items()}
                for name, ex in data["examples"].items()
            }
            return cls(
                config=config,
                model=dict(data["model"]),
                adapter=dict(data["adapter"]),
                num_layers=int(data["num_layers"]),
                layers=layers,
                target_layer=None
                if data.get("target_layer") is None
                else int(data["target_layer"]),
                sets=nan_from_null(data["sets"]),
                pairs=pairs,
                cosines=cosines,
                examples=examples,
                mismatched={
                    name: [float(x) for x in v]
                    for name, v in (data.get("mismatched_change") or {}).items()
                },
                warnings=list(data.get("warnings", [])),
                timings={k: float(v) for k, v in data.get("timings", {}).items()},
                yardsticks=yardsticks_from_json(data.get("yardsticks")),
                perplexity=dict(data.get("perplexity") or {}),
                languages=tuple(data.get("languages", ("source", "target"))),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise TLIError(f"{path}: not a tli evaluation ({type(err).__name__}: {err})") from None


def load_vectors(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The saved vectors of an evaluation and their metadata.

    Keys are ``<set>.<pre|post>.<source|target>.layer<L>`` (``(B, D)`` float32, L the final
    and the training layer); the metadata holds ``model``, ``adapter``, ``final_layer``,
    ``target_layer`` and ``pairs`` (set -> list of [source, target]), the latter decoded.
    """
    from safetensors import safe_open

    path = Path(directory) / VECTORS_NAME
    if not path.is_file():
        raise TLIError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
        meta["pairs"] = json.loads(meta.get("pairs", "{}"))
        meta["languages"] = json.loads(meta.get("languages", '["source", "target"]'))
    except Exception as err:  # safetensors raises its own error types for every corruption
        raise TLIError(
            f"{path}: corrupted or unreadable ({type(err).__name__}: {first_line(err)})"
        ) from None
    return tensors, meta


# --- the stage --------------------------------------------------------------------------------


def _training_pair_warnings(info: AdapterInfo, sets: Mapping[str, Sequence[Any]]) -> list[str]:
    """Doubts about the sets, from the training directory's ``pairs.tsv`` when there is one."""
    path = info.dir.parent / "pairs.tsv"
    if not path.is_file():
        return []
    from tli.pairs import read_pairs

    try:
        seen = {p.source for p in read_pairs(path)}
    except TLIError:
        return []
    out = []
    leaked = [p.source for p in sets.get("control", ()) if p.source in seen]
    if leaked:
        out.append(
            f"{len(leaked)} control pair(s) (e.g. {leaked[0]!r}) were in the adapter's training "
            f"pairs ({path}): the control set is not unseen"
        )
    unseen = [p.source for p in sets.get("trained", ()) if p.source not in seen]
    if unseen:
        out.append(
            f"{len(unseen)} 'trained' pair(s) (e.g. {unseen[0]!r}) are not among the adapter's "
            f"training pairs ({path})"
        )
    return out


def _harm_texts(
    cfg: EvalConfig, languages: Sequence[str], notes: list[str]
) -> dict[str, dict[str, Any]]:
    """The texts of the do-no-harm check (:func:`tli.perplexity.text_sets`); none when it is off.

    A run's language without bundled sentences or a ``--texts`` file of its name is a note.
    """
    from tli.perplexity import UNNAMED, bundled_codes, text_sets

    if not cfg.perplexity:
        return {}
    texts = text_sets(cfg.texts, languages=languages)
    names = {key.casefold() for key in texts} | {v["name"].casefold() for v in texts.values()}
    if tuple(languages) != UNNAMED:
        for language in languages:
            if language.casefold() not in names and not bundled_codes([language]):
                notes.append(
                    f"do no harm: tli bundles no sentences in {language}; pass "
                    f"--texts {language}=PATH to measure its perplexity"
                )
    return texts


def _harm(
    texts: Mapping[str, Mapping[str, Any]],
    base: Mapping[str, tuple[np.ndarray, np.ndarray]],
    tuned: Mapping[str, tuple[np.ndarray, np.ndarray]],
    cfg: EvalConfig,
) -> dict[str, Any]:
    """What ``evaluation.json`` records of the do-no-harm check."""
    from tli.perplexity import perplexity_change

    if not cfg.perplexity:
        return {"enabled": False, "reason": "turned off (--no-perplexity / perplexity = false)"}
    sets = {}
    for key, item in texts.items():
        change = perplexity_change(
            base[key], tuned[key], n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level
        )
        sets[key] = {"name": item["name"], "source": item["source"], **change}
    return {"enabled": True, "sets": sets}


def _yardsticks(
    vectors: torch.Tensor,
    sets: Mapping[str, Sequence[Any]],
    where: Mapping[str, int],
    cfg: EvalConfig,
) -> dict[str, Any]:
    """The frozen yardsticks of the base model's vectors ``(L, S, D)`` (:mod:`tli.yardsticks`)."""
    from tli.yardsticks import frozen_yardsticks

    src = {name: vectors[:, [where[p.source] for p in pairs]] for name, pairs in sets.items()}
    tgt = {name: vectors[:, [where[p.target] for p in pairs]] for name, pairs in sets.items()}
    golds = {name: gold_mask(pairs) for name, pairs in sets.items()}
    return frozen_yardsticks(
        src, tgt, golds, csls_k=cfg.csls_k, level=cfg.level, fit=cfg.procrustes
    )


def evaluate(
    base: Any,
    adapter_dir: str | os.PathLike[str],
    sets: Mapping[str, Sequence[Any]],
    cfg: EvalConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    languages: tuple[str, str] = ("source", "target"),
    base_vectors: Embedding | None = None,
) -> EvalResult:
    """Evaluate an adapter: base vs. base + merged adapter, every set, every layer.

    The adapter is checked first (:func:`read_adapter`, :func:`check_adapter`); nothing is
    embedded before it passes. The base model embeds every string at every layer, then the
    adapter is merged into it (``merge_and_unload``) and the merged model embeds them again.
    Afterwards the base weights are restored exactly, so ``base`` can be used again (except for
    adapters with ``modules_to_save``, where a warning says it holds the merged model). On a
    quantized base the adapter is never merged (that would re-quantize the weights): it is
    attached unmerged (:func:`tli.adapters.attached`) and removed after. ``evaluation.json``
    records which (``adapter.applied``).

    Args:
        base: A full-depth :class:`tli.models.LoadedModel` (not built with ``max_layer``).
        adapter_dir: A peft adapter directory (or a training directory with ``final/``).
        sets: Set name (``trained``, ``control``) -> its :class:`tli.pairs.Pair` list. Empty
            sets are skipped; a set needs at least 2 pairs.
        cfg: Settings (defaults: :class:`EvalConfig`).
        out_dir: If given, the result is saved there (:meth:`EvalResult.save`).
        languages: The source and target language names, for labels.
        base_vectors: Vectors the base model already gave (e.g. the layer scan's, in
            ``tli run``); used instead of embedding again when they are of the same model
            object, strings, layers, pooling and batch size (:meth:`Embedding.matches`), so
            the figures are the same either way.

    Returns:
        The :class:`EvalResult`.

    Raises:
        TLIError: A missing, corrupted or mismatched adapter; a truncated model; a set with
            fewer than 2 pairs.
    """
    from tli.embed import embed_strings

    cfg = cfg or EvalConfig()
    start = time.perf_counter()
    sets = check_sets(sets, "the evaluation")
    info = read_adapter(adapter_dir)
    check_base(base, "the evaluation")
    check_adapter(info, base)
    notes = _training_pair_warnings(info, sets)
    mismatch = quantization_note(info, base)
    if mismatch:
        notes.append(mismatch)
    if info.meta.get("pooling") and info.meta["pooling"] != cfg.pooling:
        notes.append(
            f"the adapter was trained with pooling {info.meta['pooling']!r} but is evaluated with "
            f"{cfg.pooling!r}"
        )
    if not info.meta:
        notes.append(f"adapter {info.dir} has no {ADAPTER_META}: its training layer is unknown")
    harm_texts = _harm_texts(cfg, languages, notes)
    if out_dir is not None:
        from tli.io import ensure_dir

        ensure_dir(out_dir)
    checked = time.perf_counter()

    n = base.num_layers
    layers = list(range(n + 1))
    texts = list(
        dict.fromkeys(s for pairs in sets.values() for p in pairs for s in (p.source, p.target))
    )
    where = {text: i for i, text in enumerate(texts)}

    def run(model: torch.nn.Module) -> torch.Tensor:
        return embed_strings(
            model,
            base.tokenizer,
            texts,
            layers,
            num_layers=n,
            pooling=cfg.pooling,
            batch_size=cfg.batch_size,
        )  # (L, S, D)

    def nll(model: torch.nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from tli.perplexity import sentence_nll

        return {
            key: sentence_nll(
                model, base.tokenizer, item["texts"], batch_size=cfg.perplexity_batch_size
            )
            for key, item in harm_texts.items()
        }

    reused = base_vectors is not None and base_vectors.matches(
        base.model, texts, layers, cfg.pooling, cfg.batch_size
    )
    pre_vectors = base_vectors.vectors if reused else run(base.model)
    embedded_pre = time.perf_counter()
    base_nll = nll(base.model)
    scored_pre = time.perf_counter()
    if is_quantized(base.model):
        # Merging into 4-bit weights re-quantizes them, so every post figure would carry
        # rounding error unrelated to training (docs/evaluation.md): run the adapter unmerged.
        applied = "unmerged (peft forward; the base is quantized)"
        with attached(base, info, "evaluated") as tuned:
            merged_at = time.perf_counter()
            post_vectors = run(tuned)
            embedded_post = time.perf_counter()
            tuned_nll = nll(tuned)
        restored = True
    else:
        applied = "merged (merge_and_unload)"
        merged = Merged(base, info)
        merged_at = time.perf_counter()
        try:
            post_vectors = run(merged.model)
            embedded_post = time.perf_counter()
            tuned_nll = nll(merged.model)
        finally:
            restored = merged.restore()
    scored_post = time.perf_counter()
    if not restored:
        notes.append(
            f"the base model {base.name!r} now holds the merged weights (4-bit weights or "
            "modules_to_save cannot be restored exactly)"
        )
    if torch.equal(pre_vectors[-1], post_vectors[-1]):
        notes.append(
            "the adapter leaves every final-layer vector unchanged (are its LoRA B weights zero?)"
        )

    figures: dict[str, dict[str, Any]] = {}
    cosines: dict[str, dict[str, np.ndarray]] = {}
    chosen: dict[str, dict[str, list[int]]] = {}
    mismatched: dict[str, list[float]] = {}
    vectors: dict[str, torch.Tensor] = {}
    saved_layers = sorted({n} | ({info.layer} if info.layer in layers else set()))
    for name, pairs in sets.items():
        src_idx = [where[p.source] for p in pairs]
        tgt_idx = [where[p.target] for p in pairs]
        pre = (pre_vectors[:, src_idx], pre_vectors[:, tgt_idx])  # (L, B, D) each
        post = (post_vectors[:, src_idx], post_vectors[:, tgt_idx])
        figures[name], pre_cos, post_cos = compare(pre, post, gold_mask(pairs), cfg)
        cosines[name] = {"pre": pre_cos, "post": post_cos}
        chosen[name] = examples(pre_cos[-1], post_cos[-1], cfg.n_examples, cfg.seed)
        mismatched[name] = mismatched_change(
            (pre[0][-1], pre[1][-1]), (post[0][-1], post[1][-1]), cfg.seed
        ).tolist()
        for state, (s, t) in (("pre", pre), ("post", post)):
            for layer in saved_layers:
                vectors[f"{name}.{state}.source.layer{layer}"] = s[layer].clone()
                vectors[f"{name}.{state}.target.layer{layer}"] = t[layer].clone()
    yardsticks = _yardsticks(pre_vectors, sets, where, cfg)
    perplexity = _harm(harm_texts, base_nll, tuned_nll, cfg)
    computed = time.perf_counter()
    for note in notes:
        log.warning("%s", note)
    result = EvalResult(
        config=cfg,
        model=model_facts(base),
        adapter={**info.summary(), "applied": applied},
        num_layers=n,
        layers=layers,
        target_layer=info.layer,
        sets=figures,
        pairs={name: [(p.source, p.target) for p in pairs] for name, pairs in sets.items()},
        cosines=cosines,
        examples=chosen,
        mismatched=mismatched,
        warnings=notes,
        timings={
            "check_s": checked - start,
            "embed_pre_s": embedded_pre - checked,
            "perplexity_pre_s": scored_pre - embedded_pre,
            "merge_s": merged_at - scored_pre,
            "embed_post_s": embedded_post - merged_at,
            "perplexity_post_s": scored_post - embedded_post,
            "metrics_s": computed - scored_post,
            "n_strings": float(len(texts)),
            "base_vectors_reused": float(reused),
        },
        vectors=vectors,
        yardsticks=yardsticks,
        perplexity=perplexity,
        languages=(str(languages[0]), str(languages[1])),
    )
    result.timings["total_s"] = computed - start
    if out_dir is not None:
        result.save(out_dir)
        # The JSON is small: write it again so its timings include the writing itself.
        result.timings["write_s"] = time.perf_counter() - computed
        result.timings["total_s"] = time.perf_counter() - start
        from tli.io import atomic_write_json

        atomic_write_json(Path(out_dir) / JSON_NAME, result.to_json())
    return result


# --- command line -----------------------------------------------------------------------------


__all__ = [
    "EvalConfig",
    "EvalResult",
    "compare",
    "evaluate",
    "examples",
    "load_vectors",
    "verdict_figures",
]
