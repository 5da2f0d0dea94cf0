"""Evaluation: the base model vs. the base model with the adapter merged (paper, sec. 3.5 and 4).

Every string of every set is embedded at every layer 0..N (0 = input embeddings, N = final;
DESIGN.md, fact 3), in one decoder pass per batch, first by the base model and then by the same
model with the LoRA adapter merged (``merge_and_unload``). Per set and layer the evaluation
reports the paper's figures (mean (std) of the per-pair cosine pre and post, absolute and %
change, paired t-test) and what is needed to read them: Wilcoxon, a bootstrap CI of the mean
change, Cohen's d_z, the mismatched-pair baseline, the margin (pairs minus baseline) with a
*paired* bootstrap CI of its change, and retrieval P@1/P@5/MRR (nearest neighbour and CSLS, both
directions) with an exact McNemar test of the P@1 change. A verdict per set and layer
(:mod:`tli.verdict`) says whether the adapter aligned translations or only raised raw cosine
(DESIGN.md, fact 2). The headline layer is the final one (the paper's protocol); the adapter's
training layer is marked in every table.

An evaluation directory holds::

    pairs.csv            source, target, set, layer, pre, post, change (every pair, every layer)
    evaluation.json      config, model, adapter, per set and layer every figure, verdicts, timings
    evaluation.md        verdicts, Table 1 (final layer and every layer), Table 2 (examples)
    vectors.safetensors  final- and training-layer vectors pre and post, for figures (t-SNE)

:meth:`EvalResult.load` reads a directory back; :func:`load_vectors` reads the vectors.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tli.config import check_range
from tli.embed import POOLINGS, Pooling
from tli.errors import TLIError
from tli.io import read_json
from tli.pairs import add_pair_arguments, check_sets, gold_mask, read_sets
from tli.verdict import VERDICTS, Verdict, VerdictFigures, decide

log = logging.getLogger("tli")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "tli_adapter.json"  # written by tli.train beside the peft files
#: File names inside an evaluation directory.
CSV_NAME, JSON_NAME, MD_NAME, VECTORS_NAME = (
    "pairs.csv",
    "evaluation.json",
    "evaluation.md",
    "vectors.safetensors",
)
#: The retrieval variants (direction_method) of every P@1 figure and McNemar test.
RETRIEVALS: tuple[str, ...] = ("s2t_nn", "s2t_csls", "t2s_nn", "t2s_csls")
Retrieval = Literal["s2t_nn", "s2t_csls", "t2s_nn", "t2s_csls"]


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate an adapter. The paper's protocol is the default where it says one."""

    pooling: Pooling = field(
        default="mean",
        metadata={
            "help": "mean (the word's own tokens), mean_all (all attention-masked tokens, the "
            "paper's sec. 3.5) or last; use the pooling the adapter was trained with "
            "(DESIGN.md, fact 3: one pooling everywhere)"
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
            "help": "verdict 'collapsed' when the pair cosine rose significantly and the "
            "mismatched baseline rose by at least this share of it (docs/evaluation.md)"
        },
    )
    verdict_retrieval: Retrieval = field(
        default="s2t_nn",
        metadata={
            "help": "the P@1 the verdict tests: s2t_nn (source -> target, nearest "
            "neighbour), s2t_csls, t2s_nn or t2s_csls"
        },
    )
    n_examples: int = field(
        default=5,
        metadata={
            "help": "Table 2 rows per kind (largest gains, largest losses, random sample); "
            "the paper shows 8 hand-picked rows"
        },
    )

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise TLIError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        for name, low in (("batch_size", 1), ("n_boot", 1), ("csls_k", 1), ("n_examples", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TLIError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TLIError(f"seed must be an integer, got {self.seed!r}")
        for name in ("level", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise TLIError(f"{name} must be in (0, 1), got {value!r}")
        check_range("collapse_ratio", self.collapse_ratio, 0.0, lo_open=True)
        if self.verdict_retrieval not in RETRIEVALS:
            raise TLIError(
                f"verdict_retrieval must be one of {', '.join(RETRIEVALS)}, "
                f"got {self.verdict_retrieval!r}"
            )


# --- pure functions ---------------------------------------------------------------------------


def margin_rows(sim: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The margin split into per-query rows, so that a resample of queries is a weighted sum.

    ``margin = mean(pair) - sum(row_sum) / sum(row_count)``: row i holds its translation-pair
    cosine, the sum of its mismatched cosines (every candidate j with ``gold[i, j]`` False) and
    their number (as :func:`tli.metrics.alignment_summary` computes the baseline).

    Args:
        sim: Cosines ``(..., B, B)`` of source i with target j.
        gold: Bool mask ``(B, B)`` of correct candidates (diagonal plus alternatives).

    Returns:
        ``(pair, row_sum, row_count)``, float64 ``(..., B)`` each.
    """
    sim = sim.to(torch.float64)
    off = ~gold.to(sim.device)  # (B, B)
    pair = sim.diagonal(dim1=-2, dim2=-1)  # (..., B)
    row_sum = (sim * off).sum(dim=-1)  # (..., B)
    row_count = off.sum(dim=-1).to(torch.float64).expand_as(row_sum)  # (..., B)
    return pair, row_sum, row_count


def resample_indices(b: int, n_boot: int, seed: int) -> torch.Tensor:
    """The bootstrap's resamples of ``b`` queries: ``(n_boot, b)`` indices, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(b, (n_boot, b), generator=gen)  # (n_boot, B)


def paired_margin_bootstrap(
    pre_sim: torch.Tensor,
    post_sim: torch.Tensor,
    gold: torch.Tensor,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, torch.Tensor]:
    """Paired percentile bootstrap of the change of pair cosine, baseline and margin.

    Each resample draws B queries with replacement (:func:`resample_indices`) and recomputes
    the mean pair cosine, the mismatched baseline (resampled query rows against all candidates,
    as :func:`tli.metrics.margin_ci`) and the margin, *before and after on the same resample*, so
    the interval is that of the paired change, not of two independent margins. The same
    resamples serve every leading index (layer).

    Args:
        pre_sim: Cosines ``(..., B, B)`` before (source i with target j).
        post_sim: Cosines ``(..., B, B)`` after, same pairs.
        gold: Bool mask ``(B, B)`` of correct candidates.
        n_boot: Number of resamples.
        seed: Seed of the resamples.
        level: Coverage of the intervals, in (0, 1).

    Returns:
        Float64 ``(...,)`` tensors: ``pair_change``, ``baseline_change``, ``margin_change``
        (observed, post - pre) and ``<name>_lo`` / ``<name>_hi`` for each.
    """
    if pre_sim.shape != post_sim.shape:
        raise ValueError(f"pre and post differ in shape: {pre_sim.shape} vs {post_sim.shape}")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    b = pre_sim.shape[-1]
    idx = resample_indices(b, n_boot, seed)
    weights = (
        torch.zeros(n_boot, b, dtype=torch.float64)
        .scatter_add_(1, idx, torch.ones(n_boot, b, dtype=torch.float64))
        .T.to(pre_sim.device)
    )  # (B, n_boot): multiplicity of each query in each resample

    def parts(sim: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pair, row_sum, row_count = margin_rows(sim, gold)
        observed = (pair.mean(-1), row_sum.sum(-1) / row_count.sum(-1))  # (...,) each
        boot = (pair @ weights / b, (row_sum @ weights) / (row_count @ weights))  # (..., n_boot)
        return observed, boot

    (pair0, base0), (pair0_b, base0_b) = parts(pre_sim)
    (pair1, base1), (pair1_b, base1_b) = parts(post_sim)
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64, device=pre_sim.device)
    out: dict[str, torch.Tensor] = {}
    for name, observed, boot in (
        ("pair_change", pair1 - pair0, pair1_b - pair0_b),
        ("baseline_change", base1 - base0, base1_b - base0_b),
        (
            "margin_change",
            (pair1 - base1) - (pair0 - base0),
            (pair1_b - base1_b) - (pair0_b - base0_b),
        ),
    ):
        lo, hi = torch.quantile(boot, q, dim=-1)
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = observed, lo, hi
    return out


def top1_hits(src: torch.Tensor, tgt: torch.Tensor, gold: torch.Tensor, csls_k: int) -> dict:
    """Per-query top-1 hits ``(..., B)`` bool for every retrieval in :data:`RETRIEVALS`.

    A hit is rank 1 with ties counted against the query (:func:`tli.metrics.retrieval`), so the
    hits average to the P@1 of :func:`tli.metrics.alignment_summary`.
    """
    from tli.metrics import bli_report

    out = {}
    for direction, (q, c, g) in (("s2t", (src, tgt, gold)), ("t2s", (tgt, src, gold.T))):
        report = bli_report(q, c, g, csls_k=csls_k)
        for method in ("nn", "csls"):
            out[f"{direction}_{method}"] = report[f"rank_{method}"] == 1
    return out


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


@dataclass
class AdapterInfo:
    """A peft LoRA adapter directory, read and checked (see :func:`read_adapter`).

    Attributes:
        dir: The directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        config: The parsed ``adapter_config.json``.
        meta: The parsed ``tli_adapter.json`` ({} for an adapter not trained by tli).
        shapes: Weight name (prefix ``base_model.model.`` removed) -> shape.
    """

    dir: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]

    @property
    def base_model(self) -> str | None:
        """The model the adapter was trained on: tli's record, else peft's."""
        return self.meta.get("model") or self.config.get("base_model_name_or_path") or None

    @property
    def layer(self) -> int | None:
        """The layer the adapter was trained at (tli adapters), else None."""
        layer = self.meta.get("layer")
        return int(layer) if isinstance(layer, int) else None

    @property
    def modules(self) -> list[str]:
        """Names (in the base model) of the modules the weights adapt."""
        names = {name.rsplit(".lora_", 1)[0] for name in self.shapes if ".lora_" in name}
        return sorted(names)

    def summary(self) -> dict[str, Any]:
        """What ``evaluation.json`` records about the adapter."""
        keys = ("base_model_name_or_path", "peft_type", "r", "lora_alpha", "target_modules")
        keys += ("layers_to_transform", "use_dora", "modules_to_save")
        peft = {k: self.config.get(k) for k in keys if k in self.config}
        # peft keeps target_modules as a set and writes it in hash order, which differs from
        # process to process; sorted, the same adapter gives the same evaluation.json.
        if isinstance(peft.get("target_modules"), list):
            peft["target_modules"] = sorted(peft["target_modules"], key=str)
        return {
            "dir": str(self.dir),
            "tli": dict(self.meta),
            "peft": peft,
            "modules": len(self.modules),
        }


_PEFT_PREFIX = "base_model.model."


def read_adapter(path: str | os.PathLike[str]) -> AdapterInfo:
    """Read and check an adapter directory, without a model: files, JSON, weights.

    ``path`` may be the adapter directory itself or a training directory, whose ``final/``
    adapter is then used.

    Raises:
        TLIError: The directory is missing, lacks ``adapter_config.json`` or
            ``adapter_model.safetensors``, either is unreadable or corrupted, the weights
            are empty or hold NaN or infinity.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "no such directory"
        raise TLIError(f"adapter {path}: {what} (a missing adapter is never evaluated as the base)")
    if not (path / ADAPTER_CONFIG).is_file() and (path / "final" / ADAPTER_CONFIG).is_file():
        log.info("adapter %s is a training directory: using its final/ adapter", path)
        path = path / "final"
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise TLIError(
                f"adapter {path}: {name} is missing (not a peft adapter directory; a missing "
                "adapter is never evaluated as the base model)"
            )
    config = read_json(path / ADAPTER_CONFIG)
    meta = read_json(path / ADAPTER_META) if (path / ADAPTER_META).is_file() else {}
    try:
        weights = load_file(path / ADAPTER_WEIGHTS)
    except Exception as err:  # safetensors raises its own error types for every corruption
        raise TLIError(
            f"adapter {path}: {ADAPTER_WEIGHTS} is corrupted or unreadable "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from None
    if not weights:
        raise TLIError(f"adapter {path}: {ADAPTER_WEIGHTS} holds no weights")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TLIError(f"adapter {path}: weight {name} holds NaN or infinity")
    shapes = {name.removeprefix(_PEFT_PREFIX): tuple(t.shape) for name, t in weights.items()}
    return AdapterInfo(path, config, meta, shapes)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _same_model(recorded: str, loaded: Any) -> bool:
    """Whether a recorded model name denotes the loaded model (same name or same directory)."""
    if recorded in (loaded.name, loaded.path):
        return True
    from tli.io import expand_user

    mine = [expand_user(p) for p in (loaded.name, loaded.path)]
    theirs = expand_user(recorded)
    if not theirs.exists():
        return False
    return any(p.exists() and p.resolve() == theirs.resolve() for p in mine)


def _model_facts(loaded: Any) -> dict[str, Any]:
    config = loaded.model.config
    return {
        "name": loaded.name,
        "path": str(loaded.path),
        "model_type": config.model_type,
        "num_layers": loaded.num_layers,
        "hidden_size": getattr(config, "hidden_size", getattr(config, "n_embd", None)),
    }


def _module_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module, or None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nf") and hasattr(module, "weight"):  # transformers' Conv1D (GPT-2)
        return int(module.weight.shape[0]), int(module.nf)
    return None


def check_adapter(info: AdapterInfo, loaded: Any) -> None:
    """Check that an adapter belongs to the loaded model: name, architecture, depth, shapes.

    Raises:
        TLIError: Naming both sides, when the adapter's ``base_model_name_or_path`` or its
            ``tli_adapter.json`` (model, model_type, num_layers, hidden_size) disagree with
            the loaded model, when a weight adapts a module the model lacks, or when a LoRA
            matrix does not fit its module.
    """
    facts = _model_facts(loaded)
    where = f"adapter {info.dir}"
    for source, recorded in (
        ("base_model_name_or_path", info.config.get("base_model_name_or_path")),
        ("tli_adapter.json model", info.meta.get("model")),
    ):
        if recorded and not _same_model(str(recorded), loaded):
            raise TLIError(
                f"{where} was trained on model {recorded!r} ({source}), but the loaded model is "
                f"{loaded.name!r}; pass --model {recorded} or the matching adapter"
            )
    for key in ("model_type", "num_layers", "hidden_size"):
        recorded = info.meta.get(key)
        if recorded is not None and recorded != facts[key]:
            raise TLIError(
                f"{where} was trained on a model with {key} {recorded!r} (tli_adapter.json), but "
                f"the loaded model {loaded.name!r} has {key} {facts[key]!r}"
            )
    model = loaded.model
    for name, shape in info.shapes.items():
        if ".lora_" not in name:
            continue
        module_name, _, kind = name.partition(".lora_")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise TLIError(
                f"{where}: weight {name} adapts module {module_name!r}, which the loaded model "
                f"{loaded.name!r} does not have"
            ) from None
        dims = _module_dims(module)
        if dims is None or len(shape) != 2:
            continue
        fan_in, fan_out = dims
        if kind.startswith("A.") and shape[1] != fan_in:
            raise TLIError(
                f"{where}: {name} has shape {list(shape)}, but {module_name} of the loaded model "
                f"{loaded.name!r} takes {fan_in} inputs"
            )
        if kind.startswith("B.") and shape[0] != fan_out:
            raise TLIError(
                f"{where}: {name} has shape {list(shape)}, but {module_name} of the loaded model "
                f"{loaded.name!r} gives {fan_out} outputs"
            )


class _Merged:
    """The adapter merged into the model in place; :meth:`restore` puts the base weights back."""

    def __init__(self, loaded: Any, info: AdapterInfo) -> None:
        from peft import PeftModel

        model = loaded.model
        self.saved: dict[str, dict[str, torch.Tensor]] | None = {}
        for name in info.modules:
            params = dict(model.get_submodule(name).named_parameters(recurse=False))
            if not all(p.is_floating_point() for p in params.values()):
                self.saved = None  # e.g. 4-bit weights: merging re-quantises, no exact copy
                break
            self.saved[name] = {k: p.detach().clone() for k, p in params.items()}
        if info.config.get("modules_to_save"):
            self.saved = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                peft_model = PeftModel.from_pretrained(model, str(info.dir), is_trainable=False)
            except (RuntimeError, ValueError, KeyError, TypeError, OSError) as err:
                raise TLIError(
                    f"adapter {info.dir}: cannot be loaded onto {loaded.name!r}: {_first_line(err)}"
                ) from None
        for w in caught:
            if "adapter" in str(w.message).lower() or "key" in str(w.message).lower():
                log.warning("peft: %s", _first_line(Exception(str(w.message))))
        injected = {
            name
            for name, module in peft_model.get_base_model().named_modules()
            if "default" in getattr(module, "lora_A", {})
        }
        unused = sorted(set(info.modules) - injected)
        if unused:
            raise TLIError(
                f"adapter {info.dir}: weights for {len(unused)} module(s) (e.g. {unused[0]}) "
                f"are not used by its {ADAPTER_CONFIG}; the adapter would be evaluated only in part"
            )
        self.model = peft_model.merge_and_unload()  # the same object as loaded.model

    def restore(self) -> bool:
        """Put the base weights back (exactly); False when they could not be kept."""
        if self.saved is None:
            return False
        with torch.no_grad():
            for name, params in self.saved.items():
                module = self.model.get_submodule(name)
                for key, value in params.items():
                    getattr(module, key).data.copy_(value)
        return True


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
        warnings: Doubts about the evaluation (also logged).
        timings: Seconds per step, and ``total_s``.
        vectors: Tensors for ``vectors.safetensors`` (not read back by :meth:`load`).
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
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

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

    def _layer_name(self, layer: int) -> str:
        tags = []
        if layer == self.target_layer:
            tags.append("trained")
        if layer == self.num_layers:
            tags.append("final")
        if layer == 0:
            tags.append("embeddings")
        return f"{layer} ({', '.join(tags)})" if tags else str(layer)

    # --- tables ---------------------------------------------------------------------------

    def table1(self, layer: int | None = None) -> str:
        """Table 1 in the paper's columns, plus baseline, margin and P@1 (Markdown)."""
        from tli.stats import format_p

        i = self.index(layer)
        kind = self.config.verdict_retrieval
        pct = int(round(self.config.level * 100))
        head = (
            "| Set | N | Pre mean (std) | Post mean (std) | Abs. change | % change | t | p "
            f"| Baseline pre → post | Margin pre → post | Margin change [{pct}% CI] "
            f"| P@1 {kind} pre → post | McNemar p |"
        )
        lines = [head, "|" + "---|" * 13]
        for name, s in self.sets.items():
            pre, post, ch, bt = s["pre"], s["post"], s["change"], s["bootstrap"]
            test = s["p_at_1_tests"][kind]
            lines.append(
                f"| {name} | {s['n']} | {ch['pre_mean'][i]:.4f} ({ch['pre_std'][i]:.4f}) "
                f"| {ch['post_mean'][i]:.4f} ({ch['post_std'][i]:.4f}) "
                f"| {ch['abs_change'][i]:+.4f} | {_pct(ch['pct_change'][i])} "
                f"| {_num(ch['t'][i], '.2f')} | {format_p(ch['p'][i], ch['log10_p'][i])} "
                f"| {pre['baseline'][i]:.4f} → {post['baseline'][i]:.4f} "
                f"| {pre['margin'][i]:+.4f} → {post['margin'][i]:+.4f} "
                f"| {bt['margin_change'][i]:+.4f} [{bt['margin_change_lo'][i]:+.4f}, "
                f"{bt['margin_change_hi'][i]:+.4f}] "
                f"| {pre[f'p_at_1_{kind}'][i]:.4f} → {post[f'p_at_1_{kind}'][i]:.4f} "
                f"| {format_p(test['p'][i])} |"
            )
        return "\n".join(lines)

    def layer_table(self, set_name: str) -> str:
        """One set at every layer (Markdown); the training and final layers are marked."""
        from tli.stats import format_p

        s = self.sets[set_name]
        pre, post, ch, bt = s["pre"], s["post"], s["change"], s["bootstrap"]
        lines = [
            "| Layer | Pre | Post | Change | t | p | Baseline pre → post | Margin pre → post "
            "| Margin change [CI] | P@1 s2t NN pre → post | P@1 s2t CSLS pre → post | Verdict |",
            "|" + "---|" * 12,
        ]
        for i, layer in enumerate(self.layers):
            lines.append(
                f"| {self._layer_name(layer)} | {pre['pair_mean'][i]:.4f} "
                f"| {post['pair_mean'][i]:.4f} | {ch['abs_change'][i]:+.4f} "
                f"| {_num(ch['t'][i], '.2f')} | {format_p(ch['p'][i], ch['log10_p'][i])} "
                f"| {pre['baseline'][i]:.4f} → {post['baseline'][i]:.4f} "
                f"| {pre['margin'][i]:+.4f} → {post['margin'][i]:+.4f} "
                f"| {bt['margin_change'][i]:+.4f} [{bt['margin_change_lo'][i]:+.4f}, "
                f"{bt['margin_change_hi'][i]:+.4f}] "
                f"| {pre['p_at_1_s2t_nn'][i]:.4f} → {post['p_at_1_s2t_nn'][i]:.4f} "
                f"| {pre['p_at_1_s2t_csls'][i]:.4f} → {post['p_at_1_s2t_csls'][i]:.4f} "
                f"| {s['verdicts'][i]['code']} |"
            )
        return "\n".join(lines)

    def table2(self, set_name: str) -> str:
        """Table 2: per-pair examples of one set at the final layer (Markdown)."""
        i = self.index()
        pre, post = self.cosines[set_name]["pre"][i], self.cosines[set_name]["post"][i]
        pairs = self.pairs[set_name]
        titles = {
            "gains": "Largest gains (largest changes)",
            "losses": "Largest losses (smallest changes)",
            "random": f"Random sample (seed {self.config.seed})",
        }
        out = []
        for kind, title in titles.items():
            rows = self.examples[set_name][kind]
            out += [
                f"**{title}**",
                "",
                "| Source | Target | Pre | Post | Change |",
                "|---|---|---|---|---|",
            ]
            for j in rows:
                out.append(
                    f"| {_md(pairs[j][0])} | {_md(pairs[j][1])} | {pre[j]:.3f} | {post[j]:.3f} "
                    f"| {post[j] - pre[j]:+.3f} |"
                )
            out.append("")
        return "\n".join(out).rstrip()

    def markdown(self) -> str:
        """``evaluation.md``: verdicts, Table 1 (final and every layer), Table 2."""
        cfg, n = self.config, self.num_layers
        kind = cfg.verdict_retrieval
        trained_at = (
            f"trained at layer {self.target_layer}"
            if self.target_layer is not None
            else "training layer unknown (no tli_adapter.json)"
        )
        chance = ", ".join(
            f"{name} {s['pre'][f'chance_p_at_1_{kind[:3]}'][0]:.4f}"
            for name, s in self.sets.items()
        )
        lines = [
            f"# Evaluation: `{self.model['name']}` + adapter `{self.adapter['dir']}`",
            "",
            f"Base model ({self.model['model_type']}, {n} layers; layer 0 = input embeddings, "
            f"{n} = final) vs. the same model with the adapter merged ({trained_at}). "
            f"Pooling {cfg.pooling}; {cfg.n_boot} bootstrap resamples (seed {cfg.seed}), "
            f"{int(round(cfg.level * 100))}% intervals; significance level {cfg.alpha}; "
            f"P@1 chance level: {chance}. How to read this: docs/evaluation.md.",
            "",
            f"## Verdicts at the final layer ({n})",
            "",
            *[f"- {line}" for line in self.verdict_lines()],
        ]
        if self.target_layer is not None and self.target_layer != n:
            lines += [
                "",
                f"At the training layer ({self.target_layer}):",
                "",
                *[f"- {line}" for line in self.verdict_lines(self.target_layer)],
            ]
        if self.warnings:
            lines += ["", "Warnings:", "", *[f"- {w}" for w in self.warnings]]
        lines += [
            "",
            f"## Table 1: translation-pair cosine at the final layer ({n})",
            "",
            self.table1(),
            "",
            "Mean (std) of the per-pair cosine; change = post - pre; t and p: paired t-test "
            "(p in log space when it underflows); baseline: mean cosine of the mismatched "
            "pairs of the same lists; margin: pairs - baseline, with the paired bootstrap CI of "
            f"its change; P@1 {kind}: retrieval, McNemar exact test of the per-query hits.",
        ]
        for name in self.sets:
            lines += ["", f"## Table 1 at every layer: {name}", "", self.layer_table(name)]
        for name in self.sets:
            lines += [
                "",
                f"## Table 2: per-pair examples at the final layer ({n}): {name}",
                "",
                self.table2(name),
            ]
        return "\n".join(lines) + "\n"

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
            "warnings": list(self.warnings),
            "timings": dict(self.timings),
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
        try:
            data = json.loads(reading.read_text(encoding="utf-8"))
            reading = path / CSV_NAME
            rows = list(csv.DictReader(io.StringIO(reading.read_text(encoding="utf-8"))))
        except FileNotFoundError:
            raise TLIError(f"{path}: {reading.name} is missing (not an evaluation?)") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, csv.Error) as err:
            raise TLIError(f"{reading}: cannot read: {_first_line(err)}") from None
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
                sets=_nan_from_null(data["sets"]),
                pairs=pairs,
                cosines=cosines,
                examples=examples,
                warnings=list(data.get("warnings", [])),
                timings={k: float(v) for k, v in data.get("timings", {}).items()},
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
    except Exception as err:  # safetensors raises its own error types for every corruption
        raise TLIError(
            f"{path}: corrupted or unreadable ({type(err).__name__}: {_first_line(err)})"
        ) from None
    return tensors, meta


def _nan_from_null(obj: Any) -> Any:
    """JSON ``null`` (a NaN or infinity when written) back to NaN, recursively."""
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: _nan_from_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_from_null(v) for v in obj]
    return obj


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.2f}%"


def _num(value: float, spec: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return format(value, spec) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _md(text: str) -> str:
    return text.replace("|", "\\|")


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


def evaluate(
    base: Any,
    adapter_dir: str | os.PathLike[str],
    sets: Mapping[str, Sequence[Any]],
    cfg: EvalConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
) -> EvalResult:
    """Evaluate an adapter: base vs. base + merged adapter, every set, every layer.

    The adapter is checked first (:func:`read_adapter`, :func:`check_adapter`); nothing is
    embedded before it passes. The base model embeds every string at every layer, then the
    adapter is merged into it (``merge_and_unload``) and the merged model embeds them again.
    Afterwards the base weights are restored exactly, so ``base`` can be used again (except for
    4-bit weights or adapters with ``modules_to_save``, where a warning says it holds the merged
    model).

    Args:
        base: A full-depth :class:`tli.models.LoadedModel` (not built with ``max_layer``).
        adapter_dir: A peft adapter directory (or a training directory with ``final/``).
        sets: Set name (``trained``, ``control``) -> its :class:`tli.pairs.Pair` list. Empty
            sets are skipped; a set needs at least 2 pairs.
        cfg: Settings (defaults: :class:`EvalConfig`).
        out_dir: If given, the result is saved there (:meth:`EvalResult.save`).

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
    if base.truncated:
        raise TLIError(
            f"the evaluation needs the full model; {base.name!r} was built with "
            f"{base.depth} of {base.num_layers} blocks (max_layer)"
        )
    if hasattr(base.model, "peft_config") or hasattr(base.model, "get_base_model"):
        raise TLIError(f"model {base.name!r} already carries adapters; load a fresh base model")
    check_adapter(info, base)
    notes = _training_pair_warnings(info, sets)
    if info.meta.get("pooling") and info.meta["pooling"] != cfg.pooling:
        notes.append(
            f"the adapter was trained with pooling {info.meta['pooling']!r} but is evaluated with "
            f"{cfg.pooling!r}"
        )
    if not info.meta:
        notes.append(f"adapter {info.dir} has no {ADAPTER_META}: its training layer is unknown")
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

    pre_vectors = run(base.model)
    embedded_pre = time.perf_counter()
    merged = _Merged(base, info)
    merged_at = time.perf_counter()
    try:
        post_vectors = run(merged.model)
    finally:
        restored = merged.restore()
    embedded_post = time.perf_counter()
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
        for state, (s, t) in (("pre", pre), ("post", post)):
            for layer in saved_layers:
                vectors[f"{name}.{state}.source.layer{layer}"] = s[layer].clone()
                vectors[f"{name}.{state}.target.layer{layer}"] = t[layer].clone()
    computed = time.perf_counter()
    for note in notes:
        log.warning("%s", note)
    result = EvalResult(
        config=cfg,
        model=_model_facts(base),
        adapter=info.summary(),
        num_layers=n,
        layers=layers,
        target_layer=info.layer,
        sets=figures,
        pairs={name: [(p.source, p.target) for p in pairs] for name, pairs in sets.items()},
        cosines=cosines,
        examples=chosen,
        warnings=notes,
        timings={
            "check_s": checked - start,
            "embed_pre_s": embedded_pre - checked,
            "merge_s": merged_at - embedded_pre,
            "embed_post_s": embedded_post - merged_at,
            "metrics_s": computed - embedded_post,
            "n_strings": float(len(texts)),
        },
        vectors=vectors,
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tli evaluate``."""
    from tli.config import add_dataclass_arguments

    p = sub.add_parser(
        "evaluate",
        help="base vs. base + adapter: Tables 1 and 2, baseline, margin, retrieval, verdict",
        description="Embed every pair of the trained and control sets at every layer with the "
        "base model and with the adapter merged; report per set and layer the paper's Table 1 "
        "(mean (std), change, paired t-test) with the mismatched-pair baseline, the margin and "
        "retrieval P@1, a verdict per set at the final layer (docs/evaluation.md), and Table 2. "
        "Writes pairs.csv, evaluation.json, evaluation.md and vectors.safetensors to --out.",
    )
    add_adapter_arguments(p)
    add_pair_arguments(p)
    p.add_argument(
        "--out", type=Path, default=Path("eval"), help="output directory (default: eval)"
    )
    add_dataclass_arguments(p, EvalConfig)
    p.set_defaults(func=_run)


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    """``--adapter`` and the base model's options, for commands that load an adapter."""
    from tli.config import add_dataclass_arguments
    from tli.models import ModelConfig

    p.add_argument(
        "--adapter",
        type=Path,
        required=True,
        help="peft adapter directory (e.g. runs/train/final) or a training directory",
    )
    p.add_argument(
        "--model",
        help="base model: embedded name, .gguf, directory or hub id (default: the model the "
        "adapter records)",
    )
    add_dataclass_arguments(p, ModelConfig, skip=("name",))


def adapter_and_model(args: argparse.Namespace) -> tuple[AdapterInfo, Any]:
    """The checked adapter and the base model's config (``--model``, else the adapter's own).

    Reads the adapter before any model is loaded, so a bad ``--adapter`` fails fast.
    """
    from tli.config import build, overrides_from_args
    from tli.models import ModelConfig

    info = read_adapter(args.adapter)
    model_name = args.model or info.base_model
    if not model_name:
        raise TLIError(f"adapter {info.dir} does not record its base model: pass --model")
    return info, build(ModelConfig, {**overrides_from_args(ModelConfig, args), "name": model_name})


def _run(args: argparse.Namespace) -> int:
    from tli.config import build, overrides_from_args
    from tli.io import ensure_writable_dir
    from tli.models import load_model

    cfg = build(EvalConfig, overrides_from_args(EvalConfig, args))
    ensure_writable_dir(args.out)
    info, model_cfg = adapter_and_model(args)
    sets = read_sets(
        args.pairs,
        args.control,
        src_key=args.src_key,
        tgt_key=args.tgt_key,
        stage="the evaluation",
    )
    start = time.perf_counter()
    loaded = load_model(model_cfg)
    load_s = time.perf_counter() - start
    result = evaluate(loaded, info.dir, sets, cfg, args.out)
    print("\n".join(result.verdict_lines()))
    print()
    print(f"Table 1 (final layer, {result.num_layers}):")
    print(result.table1())
    print(
        f"wrote {args.out / CSV_NAME}, {args.out / JSON_NAME}, {args.out / MD_NAME}, "
        f"{args.out / VECTORS_NAME} (evaluation {result.timings['total_s']:.1f} s after a "
        f"{load_s:.1f} s load)"
    )
    sys.stdout.flush()
    return 0


__all__ = [
    "VERDICTS",
    "AdapterInfo",
    "EvalConfig",
    "EvalResult",
    "check_adapter",
    "compare",
    "evaluate",
    "examples",
    "load_vectors",
    "margin_rows",
    "paired_margin_bootstrap",
    "read_adapter",
    "resample_indices",
    "top1_hits",
    "verdict_figures",
]
