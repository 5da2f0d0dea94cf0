"""TLI training: LoRA (peft) and a contrastive loss on pooled states at one layer (paper, sec. 3.4).

The loss at layer L depends only on blocks 0..L-1 (docs/design.md, fact 4), so by default the
model is built with those blocks only and the adapters sit only there: deeper adapters would get
no gradient and, with LoRA's B initialised to zero, stay the identity. The trained function is the
same as the paper's; the steps are an order of magnitude cheaper.

A training directory holds::

    train_config.json     resolved config (model and training)
    train_log.csv         step, epoch, loss, pos_sim, neg_sim, lr
    train.json            config, trainable parameters, time, steps/s
    epoch-K/              adapter after epoch K (peft format)
    final/                final adapter (peft format) + tli_adapter.json + README.md (card)
    checkpoints/step-S/   adapter + state.pt (optimiser, scheduler, RNG, position)
    checkpoints/latest    name of the newest complete checkpoint
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tli import models, surgery
from tli.adapters import quiet_peft, save_adapter
from tli.config import (
    MAX_BATCH,
    MAX_STEPS,
    check_one_of,
    check_range,
    check_seed,
    to_dict,
)
from tli.embed import POOLINGS, hidden_states, pooled, tokenize
from tli.errors import TLIError, first_line
from tli.io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_dir, read_json
from tli.losses import (
    LOSSES,
    LossOutput,
    contrastive_objective,
    get_loss,
    lexicon_info_nce,
    state_drift,
    update_running_mean,
)
from tli.pairs import Pair, gold_mask

log = logging.getLogger("tli")

LossName = Literal["triplet_hardest", "triplet_semi_hard", "info_nce"]
MixedPrecision = Literal["no", "bf16", "fp16"]
Center = Literal["none", "batch", "running"]
PrefixCacheMode = Literal["auto", "on", "off"]
Negatives = Literal["batch", "lexicon"]
ReportTo = Literal["none", "tensorboard", "mlflow", "wandb"]
LOG_COLUMNS = ("step", "epoch", "loss", "pos_sim", "neg_sim", "lr")
#: Tracker (``report_to``) -> the package accelerate needs for it.
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
#: Where TensorBoard event files go, inside the training directory (``tensorboard --logdir``).
TENSORBOARD_DIR = "tensorboard"
#: The project (TensorBoard run folder, MLflow experiment, W&B project) tli logs to.
TRACKER_PROJECT = "tli"
#: The deepest layer index a config may name; the model's own depth is checked before a run.
MAX_LAYERS = 10_000


@dataclass(frozen=True)
class TrainConfig:
    """TLI training settings; every default is the paper's (sec. 3.4) unless noted."""

    layer: int | None = field(
        default=None,
        metadata={
            "help": "target layer L (0 = embeddings); the loss uses pooled states there. "
            "Paper: 2, chosen by the pilot scan (sec. 3.2)"
        },
    )
    loss: LossName = field(
        default="triplet_hardest",
        metadata={"help": "triplet_hardest (paper, eq. 1), triplet_semi_hard or info_nce"},
    )
    margin: float = field(default=0.4, metadata={"help": "triplet margin on cosine (paper, 3.4)"})
    temperature: float = field(
        default=0.05, metadata={"help": "InfoNCE temperature (tli; used by info_nce only)"}
    )
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate (paper, 3.4)"})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (paper: unstated; torch's default)"}
    )
    epochs: int = field(default=5, metadata={"help": "epochs (paper, 3.4)"})
    batch_size: int = field(
        default=8, metadata={"help": "pairs per batch, >= 2; in-batch negatives (paper, 3.4)"}
    )
    warmup_steps: int = field(
        default=50, metadata={"help": "linear warm-up steps, then linear decay (paper, 3.4)"}
    )
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "clip gradients to this norm (paper: none)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for LoRA init, order and dropout"})
    pooling: str = field(
        default="mean",
        metadata={"help": "mean (non-special tokens), mean_all (paper's masked mean) or last"},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (paper, 3.4)"})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha (paper, 3.4)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (paper, 3.4)"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={"help": "modules that get adapters, comma-separated (paper: q_proj,v_proj)"},
    )
    adapt_all_layers: bool = field(
        default=False,
        metadata={
            "help": "put adapters on every block, as the paper's adapter files do (blocks "
            ">= L get no gradient and stay the identity; loads the full model)"
        },
    )
    save_every: int = field(
        default=50, metadata={"help": "checkpoint every this many steps (0: each epoch only)"}
    )
    mixed_precision: MixedPrecision = field(
        default="no", metadata={"help": "accelerate mixed precision: no, bf16 or fp16"}
    )
    loss_layers: tuple[int | str, ...] | None = field(
        default=None,
        metadata={
            "help": "layers where the loss applies, comma-separated: indices 1..N, 'target' "
            "(= --layer) or 'final' (N); e.g. target,final. Default: the target layer only "
            "(paper, 3.4). tli"
        },
    )
    loss_weights: tuple[float, ...] | None = field(
        default=None,
        metadata={"help": "weight of each loss layer's term (default: equal, summing to 1). tli"},
    )
    center: Center = field(
        default="none",
        metadata={
            "help": "subtract each language's mean before the loss: none (paper), batch (the "
            "batch mean) or running (an exponential moving average). tli"
        },
    )
    center_momentum: float = field(
        default=0.1, metadata={"help": "weight of each new batch in the running mean. tli"}
    )
    uniformity_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the uniformity term (Wang and Isola 2020); 0: off. tli"},
    )
    uniformity_t: float = field(
        default=2.0, metadata={"help": "kernel scale t of the uniformity term. tli"}
    )
    adapt_layers: str | None = field(
        default=None,
        metadata={
            "help": "blocks that get adapters (0-based), e.g. 0-5, 2,4,6-8, last:4 or all "
            "(default: every block below the deepest loss layer). tli"
        },
    )
    negatives: Negatives = field(
        default="batch",
        metadata={
            "help": "batch (the other pairs of the batch, paper) or lexicon: each source word "
            "against the frozen model's vectors of every trained target (tli.losses."
            "lexicon_info_nce; info_nce only, source->target, one process). tli"
        },
    )
    hold_targets: float = field(
        default=0.0,
        metadata={
            "help": "with negatives = lexicon: weight of a term in which each batch's target "
            "words, through the adapted model, must retrieve their own frozen vectors from the "
            "same bank, so the targets stay where the source words are pulled to (costs a pass "
            "over the targets); 0: off. tli"
        },
    )
    preserve_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of a preservation term: the relative squared distance of the "
            "final-layer states of running text from the base model's (tli.losses.state_drift), "
            "against damage to language modelling; 0: off. Loads the full model. tli"
        },
    )
    preserve_texts: str | None = field(
        default=None,
        metadata={
            "help": "text file, one sentence per line, for the preservation term (default: "
            "the bundled tli/data/preserve_sw.txt and preserve_en.txt, which the perplexity "
            "check never measures). tli"
        },
    )
    preserve_batch: int = field(
        default=8, metadata={"help": "sentences per step in the preservation term. tli"}
    )
    report_to: ReportTo = field(
        default="none",
        metadata={
            "help": "send loss, pos/neg similarity and lr per step to a tracker through "
            "accelerate's log_with: none, tensorboard (event files in the training directory's "
            "tensorboard/), mlflow or wandb (configured by their own environment variables). tli"
        },
    )
    prefix_cache: PrefixCacheMode = field(
        default="auto",
        metadata={
            "help": "frozen-prefix activation cache when no adapter sits below block K > 0: "
            "auto (when the architecture allows and everything runs in float32; it is exact "
            "only there), on (required) or off. tli"
        },
    )

    def __post_init__(self) -> None:
        if self.layer is not None:
            check_range("layer", self.layer, 0, MAX_LAYERS)
        if self.loss not in LOSSES:
            get_loss(self.loss)  # raises with the valid names
        check_range("margin", self.margin, 0.0, 2.0)
        check_range("temperature", self.temperature, 0.0, 100.0, lo_open=True)
        check_range("lr", self.lr, 0.0, 1.0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        check_range("epochs", self.epochs, 1, 100_000)
        if self.batch_size < 2:
            raise TLIError(
                f"batch_size must be >= 2 (in-batch negatives need another pair), got "
                f"{self.batch_size}"
            )
        check_range("batch_size", self.batch_size, 2, MAX_BATCH)
        check_range("warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        check_range("max_grad_norm", self.max_grad_norm, 0.0, 1e6, lo_open=True)
        check_seed("seed", self.seed)
        check_one_of("pooling", self.pooling, POOLINGS)
        check_range("lora_r", self.lora_r, 1, MAX_BATCH)
        check_range("lora_alpha", self.lora_alpha, 0.0, 1e6, lo_open=True)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        if not self.target_modules:
            raise TLIError("target_modules is empty")
        for name in self.target_modules:
            if not isinstance(name, str) or not name.strip():
                raise TLIError(f"target_modules holds an empty name: {self.target_modules!r}")
        check_range("save_every", self.save_every, 0, MAX_STEPS)
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise TLIError(
                f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}"
            )
        if self.loss_layers is not None:
            object.__setattr__(self, "loss_layers", _normalise_loss_layers(self.loss_layers))
        n_terms = len(self.loss_layers) if self.loss_layers is not None else 1
        if self.loss_weights is not None:
            weights = tuple(float(w) for w in self.loss_weights)
            object.__setattr__(self, "loss_weights", weights)
            if len(weights) != n_terms:
                raise TLIError(
                    f"loss_weights has {len(weights)} value(s) but loss_layers has {n_terms}"
                )
            if any(not 0 <= w <= 1e6 for w in weights) or sum(weights) <= 0:
                raise TLIError(
                    f"loss_weights must be in 0..1e6 with a positive sum, got {weights}"
                )
        if self.center not in ("none", "batch", "running"):
            raise TLIError(f"center must be none, batch or running, got {self.center!r}")
        check_range("center_momentum", self.center_momentum, 0.0, 1.0, lo_open=True)
        check_range("uniformity_weight", self.uniformity_weight, 0.0, 1e6)
        check_range("uniformity_t", self.uniformity_t, 0.0, 1e6, lo_open=True)
        check_one_of("negatives", self.negatives, ("batch", "lexicon"))
        if self.negatives == "lexicon" and self.loss != "info_nce":
            raise TLIError(f"negatives = lexicon needs loss = info_nce, got {self.loss!r}")
        if self.negatives == "lexicon" and (self.center == "running" or self.uniformity_weight):
            raise TLIError(
                "negatives = lexicon takes center = batch or none and no uniformity term"
            )
        check_range("hold_targets", self.hold_targets, 0.0, 1e6)
        if self.hold_targets and self.negatives != "lexicon":
            raise TLIError("hold_targets needs negatives = lexicon (it reuses its bank)")
        check_range("preserve_weight", self.preserve_weight, 0.0, 1e6)
        check_range("preserve_batch", self.preserve_batch, 1, MAX_BATCH)
        if self.adapt_layers is not None:
            parse_blocks(self.adapt_layers, None)  # syntax now; bounds once N is known
            if self.adapt_all_layers:
                raise TLIError("adapt_layers and adapt_all_layers: set one of them, not both")
        if self.prefix_cache not in ("auto", "on", "off"):
            raise TLIError(f"prefix_cache must be auto, on or off, got {self.prefix_cache!r}")
        if self.prefix_cache == "on" and self.mixed_precision != "no":
            raise TLIError(
                f"prefix_cache = on with mixed_precision = {self.mixed_precision}: the cache is "
                "exact only in float32 (docs/training.md); set prefix_cache = off or auto"
            )
        check_one_of("report_to", self.report_to, ("none", *TRACKERS))


def check_tracker(report_to: str) -> None:
    """Fail unless the package of tracker ``report_to`` is installed ("none" needs nothing).

    Called before any model is loaded, so a missing tracker costs a second, not a load.

    Raises:
        TLIError: naming the tracker and the package to install.
    """
    import importlib.util

    check_one_of("report_to", report_to, ("none", *TRACKERS))
    package = TRACKERS.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise TLIError(
            f"report_to {report_to}: the package {package} is not installed "
            f"(pip install {package})"
        )


def _hparams(train: Mapping[str, Any]) -> dict[str, Any]:
    """A training config as tracker hyper-parameters (str, int, float or bool values only)."""
    out: dict[str, Any] = {}
    for key, value in train.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out[key] = "none" if value is None else value
    return out


def _normalise_loss_layers(items: Sequence[int | str]) -> tuple[int | str, ...]:
    """Loss layers as ints, 'target' and 'final'; a TLIError naming the field otherwise."""
    if isinstance(items, str):
        items = items.split(",")
    elif isinstance(items, int):
        items = [items]
    out: list[int | str] = []
    for item in items:
        text = str(item).strip().lower()
        if text in ("target", "final"):
            out.append(text)
            continue
        try:
            layer = int(text)
        except ValueError:
            raise TLIError(
                f"loss_layers: {item!r} is not a layer index, 'target' or 'final'"
            ) from None
        if layer < 1:
            raise TLIError(f"loss_layers: layer {layer} has no block below it to adapt (use 1..N)")
        out.append(layer)
    if not out:
        raise TLIError("loss_layers is empty")
    if len(set(out)) != len(out):
        raise TLIError(f"loss_layers lists a layer twice: {tuple(out)}")
    return tuple(out)


def parse_blocks(spec: str, num_layers: int | None) -> tuple[int, ...] | None:
    """Block indices (0-based) from ``"0-5"``, ``"2,4,6-8"``, ``"last:4"`` or ``"all"``.

    ``"last:4"`` is the last 4 blocks; ``"all"`` gives None (every block). ``num_layers`` (N)
    bounds them to 0..N-1; None checks the syntax only.
    """
    text = str(spec).strip().lower()
    if text == "all":
        return None
    if text.startswith("last:"):
        try:
            count = int(text[5:])
        except ValueError:
            raise TLIError(f"adapt_layers: {spec!r}: expected last:K, K a block count") from None
        if count < 1 or (num_layers is not None and count > num_layers):
            raise TLIError(f"adapt_layers: {spec!r}: K must be in 1..{num_layers or 'N'}")
        if num_layers is None:
            return tuple(range(count))  # syntax check only
        return tuple(range(num_layers - count, num_layers))
    blocks: list[int] = []
    for item in text.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if sep else [int(item)]
        except ValueError:
            raise TLIError(
                f"adapt_layers: {item!r} is not a block index, a range a-b or 'all'"
            ) from None
        if sep and int(hi) < int(lo):
            raise TLIError(f"adapt_layers: empty range {item!r}")
        for block in span:
            if block < 0 or (num_layers is not None and block >= num_layers):
                bound = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
                raise TLIError(f"adapt_layers: block {block} is outside {bound}")
            blocks.append(block)
    if not blocks:
        raise TLIError("adapt_layers is empty")
    return tuple(sorted(set(blocks)))


@dataclass(frozen=True)
class TrainPlan:
    """Where a config's loss applies and where its adapters go, for a model with N blocks."""

    num_layers: int
    loss_layers: tuple[int, ...]  # resolved layer indices, 1..N
    loss_weights: tuple[float, ...]
    adapt: tuple[int, ...] | None  # blocks with adapters; None: every block
    load_depth: int | None  # max_layer for tli.models.load_model; None: the full model

    @property
    def first_adapted(self) -> int:
        """The lowest adapted block K (0 when every block is adapted)."""
        return self.adapt[0] if self.adapt else 0

    @property
    def deepest(self) -> int:
        """The deepest loss layer."""
        return max(self.loss_layers)


def plan(cfg: TrainConfig, num_layers: int) -> TrainPlan:
    """Resolve ``cfg``'s loss layers and adapted blocks for a model of ``num_layers`` blocks.

    Raises:
        TLIError: naming the field, when a loss layer is outside 1..N, 'target' is used with no
            target layer, an adapted block is outside 0..N-1 or at or above the deepest loss
            layer (it would get no gradient), or a loss layer has no adapted block below it.
    """
    n = num_layers
    raw = cfg.loss_layers if cfg.loss_layers is not None else ("target",)
    layers: list[int] = []
    for item in raw:
        if item == "target":
            if cfg.layer is None:
                raise TLIError("the target layer is not set (--layer)")
            if not 1 <= cfg.layer <= n:
                raise TLIError(
                    f"layer must be in 1..{n} for training (layer 0, the embeddings, has no "
                    f"block below it to adapt), got {cfg.layer}"
                )
            layers.append(cfg.layer)
        elif item == "final":
            layers.append(n)
        else:
            if not 1 <= int(item) <= n:
                raise TLIError(f"loss_layers: layer {item} is outside 1..{n}")
            layers.append(int(item))
    if len(set(layers)) != len(layers):
        raise TLIError(f"loss_layers names one layer twice: {raw} -> {layers}")
    weights = cfg.loss_weights or tuple(1.0 / len(layers) for _ in layers)
    if len(layers) == 1 and cfg.loss_weights is None:
        weights = (1.0,)
    deepest = max(layers)
    if cfg.adapt_all_layers:
        adapt: tuple[int, ...] | None = None
    elif cfg.adapt_layers is not None:
        adapt = parse_blocks(cfg.adapt_layers, n) or tuple(range(n))
        if adapt is not None:
            above = [b for b in adapt if b >= deepest]
            if above:
                raise TLIError(
                    f"adapt_layers: block {above[0]} is at or above the deepest loss layer "
                    f"{deepest}, so it would get no gradient"
                )
            if len(adapt) == n:
                adapt = None
    else:
        adapt = tuple(range(deepest))
    first = adapt[0] if adapt else 0
    for layer in layers:
        if layer <= first:
            raise TLIError(
                f"loss_layers: layer {layer} has no adapted block below it (adapt_layers "
                f"starts at block {first})"
            )
    full = cfg.adapt_all_layers or deepest == n or cfg.preserve_weight > 0
    return TrainPlan(n, tuple(layers), tuple(weights), adapt, None if full else deepest)


@dataclass
class TrainResult:
    """What a finished training run left behind."""

    out_dir: Path
    adapter_dir: Path
    steps: int
    seconds: float
    final_loss: float
    log: list[dict[str, float]]


# --- pieces ---------------------------------------------------------------------------------


def lora_config(cfg: TrainConfig, num_layers: int, model: torch.nn.Module) -> Any:
    """The peft LoraConfig: adapters on the blocks :func:`plan` chooses (default: below L)."""
    from peft import LoraConfig

    modules = list(cfg.target_modules)
    if modules == ["q_proj", "v_proj"]:
        modules = list(surgery.lora_target_modules(model))  # GPT-2 fuses q/k/v into c_attn
    adapt = plan(cfg, num_layers).adapt
    layers = None if adapt is None else list(adapt)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=modules,
        bias="none",
        task_type="CAUSAL_LM",
        layers_to_transform=layers,
    )


def batches_for_epoch(n_pairs: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Seeded batches of pair indices for one epoch; a trailing batch of one joins the previous.

    The order depends only on (seed, epoch), so a resumed run sees the same batches.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_pairs, generator=gen).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n_pairs, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2].extend(batches.pop())
    return batches


def batch_gold(pairs: Sequence[Pair], index: Sequence[int]) -> torch.Tensor:
    """(B, B) mask: True where pair j's target is a listed translation of pair i's source."""
    return gold_mask([pairs[i] for i in index])


def _gather_with_grad(x: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """All processes' rows (rank order); this process's rows keep their graph."""
    if accelerator.num_processes == 1:
        return x
    everything = accelerator.gather(x.detach().contiguous())  # (P * b, D)
    b, r = x.shape[0], accelerator.process_index
    return torch.cat([everything[: r * b], x, everything[(r + 1) * b :]])


def _loss_kwargs(cfg: TrainConfig) -> dict[str, float]:
    return {"temperature": cfg.temperature} if cfg.loss == "info_nce" else {"margin": cfg.margin}


def objective(
    cfg: TrainConfig,
    anchors: Sequence[torch.Tensor],
    positives: Sequence[torch.Tensor],
    gold: torch.Tensor,
    weights: Sequence[float],
    running: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> LossOutput:
    """The training objective over every loss layer: a weighted sum of per-layer terms.

    Args:
        cfg: the loss, its hyper-parameters, centring and uniformity settings.
        anchors: one (B, D) tensor of source-word vectors per loss layer.
        positives: one (B, D) tensor of target-word vectors per loss layer.
        gold: (B, B) bool mask of correct candidates.
        weights: one weight per loss layer.
        running: per loss layer, the (source, target) running means so far (None before the
            first batch), updated in place with this batch when ``cfg.center`` is "running".

    Returns:
        LossOutput: the weighted loss; ``pos_sim`` and ``neg_sim`` weighted the same way.
    """
    outs: list[LossOutput] = []
    for i, (anchor, positive) in enumerate(zip(anchors, positives, strict=True)):
        center: Any = cfg.center
        if cfg.center == "running":
            assert running is not None
            old = running[i]
            means = (
                update_running_mean(old[0] if old else None, anchor, cfg.center_momentum),
                update_running_mean(old[1] if old else None, positive, cfg.center_momentum),
            )
            running[i] = means
            center = means
        outs.append(
            contrastive_objective(
                anchor,
                positive,
                gold,
                loss=cfg.loss,
                center=center,
                uniformity_weight=cfg.uniformity_weight,
                uniformity_t=cfg.uniformity_t,
                **_loss_kwargs(cfg),
            )
        )
    if len(outs) == 1 and weights[0] == 1.0:
        return outs[0]
    return LossOutput(
        sum(w * o.loss for w, o in zip(weights, outs, strict=True)),
        sum(w * o.pos_sim for w, o in zip(weights, outs, strict=True)) / sum(weights),
        sum(w * o.neg_sim for w, o in zip(weights, outs, strict=True)) / sum(weights),
    )


def _adapter_meta(loaded: Any, cfg: TrainConfig, card: Mapping[str, Any]) -> dict[str, Any]:
    """``tli_adapter.json``: the model, the plan, and what the model card shows (:mod:`tli.card`).

    ``card`` holds ``languages``, ``data`` (the pair files, their SHA-256 and the set sizes) and
    ``command`` (what repeats the run), as the caller knows them; each may be missing.
    """
    from tli import __version__

    config = loaded.model.config
    p = plan(cfg, loaded.num_layers)
    return {
        "tli_version": __version__,
        "model": loaded.name,
        "base_model": models.model_origin(loaded.name, loaded.path),
        "languages": list(card.get("languages") or ("source", "target")),
        "data": dict(card.get("data") or {}),
        "command": card.get("command"),
        "train": to_dict(cfg),
        "model_type": config.model_type,
        "num_layers": loaded.num_layers,
        "hidden_size": surgery.hidden_size(config),
        # the deepest loss layer: the layer an evaluation marks as the training layer
        "layer": p.deepest,
        "target_layer": cfg.layer,
        "loss_layers": list(p.loss_layers),
        "loss": cfg.loss,
        "center": cfg.center,
        "uniformity_weight": cfg.uniformity_weight,
        "preserve_weight": cfg.preserve_weight,
        "negatives": cfg.negatives,
        "hold_targets": cfg.hold_targets,
        "pooling": cfg.pooling,
        "adapt_all_layers": cfg.adapt_all_layers,
        "adapt_layers": None if p.adapt is None else list(p.adapt),
        # the base's 4-bit settings (None: unquantized), so an evaluation can say when it
        # applies the adapter to a base quantized differently
        "quantization": getattr(loaded, "quantization", None),
    }


def _at(meta: dict[str, Any], state: _State, epoch: int) -> dict[str, Any]:
    """``meta`` with where training stood when an adapter was saved (for its model card)."""
    loss = state.rows[-1]["loss"] if state.rows else None
    return {**meta, "epoch": epoch, "step": state.step, "loss": loss}


def _log_csv(rows: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint of a training directory that holds its files, or None.

    ``checkpoints/latest`` names it; when that name is missing or damaged, the newest
    ``step-S`` folder with a ``state.pt`` is used (:func:`checkpoint_candidates`).
    """
    found = checkpoint_candidates(out_dir)
    return found[0] if found else None


def checkpoint_candidates(out_dir: Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one ``latest`` names, then newest first.

    Only folders holding ``state.pt`` and the adapter's weights count; whether they load is
    checked when they are restored (:meth:`_Checkpoints.restore_newest`).
    """
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    steps = []
    for path in folder.glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if suffix.isdigit() and (path / "state.pt").is_file():
            steps.append((int(suffix), path))
    ordered = [p for _, p in sorted(steps, reverse=True)]
    pointer = folder / "latest"
    try:
        named = folder / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        named = None
    if named in ordered:
        ordered.remove(named)
        ordered.insert(0, named)
    return ordered


def _load_problem(err: BaseException) -> str:
    """A short reason why a checkpoint file did not load."""
    if type(err).__name__ == "UnpicklingError":  # weights_only refused what it found
        return "it holds objects other than tensors and plain values; refused without running them"
    text = first_line(err)
    if len(text) > 100 and ". " in text:
        text = text[: text.index(". ") + 1]
    return f"{type(err).__name__}: {text}"


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key old -> new, ...`` for the keys whose values differ."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def check_out_dir(out_dir: Path | str, *, resume: bool) -> None:
    """Refuse a training directory that cannot take this training, before anything is loaded.

    A new training refuses a directory that already holds one (an adapter or a checkpoint:
    use ``--resume``) or other files; a directory holding only the config of a training that
    never reached its first checkpoint may start again. A resume needs a training directory.
    """
    from tli.lock import has_content

    out_dir = Path(out_dir)
    if resume:
        if not (out_dir / "train_config.json").is_file():
            raise TLIError(f"{out_dir}: not a training directory (no train_config.json)")
        return
    if not has_content(out_dir):
        return
    started = {"train_config.json", "pairs.tsv", "train_log.csv", "checkpoints"}
    names = {c.name for c in out_dir.iterdir()} - {"run.lock"}
    progress = checkpoint_candidates(out_dir) or (out_dir / "final").exists()
    if progress:
        raise TLIError(f"{out_dir}: already holds a training run (use --resume, or a new --out)")
    if not names <= started:
        raise TLIError(
            f"{out_dir}: exists, is not empty and is not a training directory; choose a new --out"
        )


# --- the loop -------------------------------------------------------------------------------


def _with_depth(loaded: Any, the_plan: TrainPlan, model_config: dict[str, Any] | None) -> Any:
    """``loaded``, or the same model loaded with the depth the plan needs.

    A caller that loaded by the old rule (``max_layer`` = the target layer) for a loss deeper
    than the target layer gets the depth reloaded from the recorded model settings; without
    them, a model too shallow for the plan is an error.
    """
    needed = the_plan.load_depth or loaded.num_layers
    if loaded.depth < needed and model_config is not None:
        from tli.config import build as build_config

        log.info(
            "loading %s with %s blocks for loss layers %s",
            loaded.name,
            the_plan.load_depth or "all",
            list(the_plan.loss_layers),
        )
        loaded = models.load_model(
            build_config(models.ModelConfig, model_config),
            max_layer=the_plan.load_depth,
            tokenizer=loaded.tokenizer,
            lm_head=False,  # training never uses it
        )
    if loaded.depth < needed:
        what = "the final layer" if needed == loaded.num_layers else f"layer {needed}"
        raise TLIError(
            f"the model holds {loaded.depth} blocks; {what} needs {needed} (load it with "
            f"max_layer={the_plan.load_depth})"
        )
    return loaded


def prepare_for_kbit_training(model: torch.nn.Module) -> None:
    """Prepare a 4-bit model for QLoRA training, as peft's ``prepare_model_for_kbit_training``.

    The same steps as peft's function without gradient checkpointing (tli never turns it on):
    every base parameter is frozen and every bf16/fp16 parameter that is not 4-bit is cast to
    float32, so norms and the residual stream run in float32. One difference: the embedding
    table and the LM head keep their dtype; the embedding's rows are cast to float32 as they are
    looked up (:func:`tli.surgery.float32_embedding_rows`), which gives exactly the rows of a
    float32 table, and tli's training never calls the LM head. For Llama-3-8B that keeps
    1.05 GB (embeddings) and, at full depth, another 1.05 GB (LM head) out of memory.
    tests/test_quantized.py checks that hidden states and LoRA gradients equal peft's, bit for
    bit.
    """
    tables = {id(surgery.input_embeddings(model).weight)}
    out = model.get_output_embeddings()
    if isinstance(getattr(out, "weight", None), torch.Tensor):
        tables.add(id(out.weight))
    for param in model.parameters():
        param.requires_grad_(False)
        if id(param) in tables or param.__class__.__name__ == "Params4bit":
            continue
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
    surgery.float32_embedding_rows(model)


def cpu_lacks_bf16() -> bool:
    """Whether this is an x86 CPU without AVX-512 BF16 or AMX (Linux; False when unknown)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return bool(flags) and not any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def half_precision_matmuls(model: torch.nn.Module) -> bool:
    """Whether the blocks' matmuls run in bf16/fp16 (4-bit: the compute dtype; else the weights)."""
    half = (torch.bfloat16, torch.float16)
    stack = surgery.blocks(model)
    for module in stack.modules():
        compute = getattr(module, "compute_dtype", None)  # bitsandbytes Linear4bit
        if isinstance(compute, torch.dtype):
            return compute in half
    return any(p.dtype in half for p in stack.parameters())


def _with_adapters(loaded: Any, cfg: TrainConfig) -> Any:
    """The model with fresh LoRA adapters (peft), prepared for k-bit training when 4-bit."""
    from peft import get_peft_model

    model = loaded.model
    if getattr(model, "is_loaded_in_4bit", False):
        prepare_for_kbit_training(model)
    with quiet_peft():
        try:
            model = get_peft_model(model, lora_config(cfg, loaded.num_layers, model))
        except ValueError as err:  # e.g. peft's NoMatchingPeftModuleError
            raise TLIError(
                f"target_modules {', '.join(cfg.target_modules)}: cannot add adapters: "
                f"{first_line(err)}"
            ) from None
    model.peft_config["default"].base_model_name_or_path = loaded.name
    return model


@dataclass
class _State:
    """Where a training run stands: what a checkpoint saves and a resume restores."""

    step: int = 0
    rows: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0
    running: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)


#: What a checkpoint's ``state.pt`` holds (:meth:`_Checkpoints.save`).
_STATE_KEYS = frozenset({"step", "optimizer", "scheduler", "torch_rng", "log", "elapsed"})


class _Checkpoints:
    """``checkpoints/step-S/``: the adapter, optimiser, scheduler, RNG and position of a step."""

    def __init__(self, out_dir: Path, model: Any, optimizer: Any, scheduler: Any, meta: dict,
                 accelerator: Any) -> None:  # fmt: skip
        self.out_dir, self.model, self.meta = out_dir, model, meta
        self.optimizer, self.scheduler, self.accelerator = optimizer, scheduler, accelerator

    def restore_newest(self, candidates: Sequence[Path], state: _State) -> Path:
        """Restore the first checkpoint of ``candidates`` that loads; warn about the others.

        Returns:
            The checkpoint restored.

        Raises:
            TLIError: No candidate loads; names the first one's damaged file.
        """
        problems = []
        for ckpt in candidates:
            try:
                self.restore(ckpt, state)
            except TLIError as err:
                problems.append(str(err))
                continue
            for problem in problems:
                log.warning("%s; resuming from %s instead", problem, ckpt.name)
            return ckpt
        raise TLIError(problems[0] + ("" if len(problems) == 1 else
                       f" (and {len(problems) - 1} older checkpoint(s) are damaged too)"))

    def restore(self, ckpt: Path, state: _State) -> None:
        """Load checkpoint ``ckpt`` into the model, optimiser, scheduler, RNG and ``state``.

        ``state.pt`` is read with ``weights_only=True``, so a file holding anything but
        tensors and plain values (a malicious file, say) is refused, never run.

        Raises:
            TLIError: A file of the checkpoint is missing, damaged or not a tli checkpoint.
        """
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        from tli.adapters import ADAPTER_WEIGHTS, missing_or_misshapen

        path = ckpt / "state.pt"
        try:
            saved = torch.load(path, weights_only=True)
            if not isinstance(saved, dict) or not _STATE_KEYS <= saved.keys():
                raise ValueError("not a tli checkpoint (keys missing)")
            path = ckpt / ADAPTER_WEIGHTS
            weights = load_file(path)
        except Exception as err:  # torch and safetensors raise many types for a damaged file
            raise TLIError(f"{path}: damaged checkpoint ({_load_problem(err)})") from None
        problem = missing_or_misshapen(get_peft_model_state_dict(self.model), weights)
        if problem:
            raise TLIError(f"{path}: damaged checkpoint ({problem})")
        set_peft_model_state_dict(self.model, weights)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["torch_rng"])
            self._position(saved, state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
            raise TLIError(
                f"{ckpt / 'state.pt'}: damaged checkpoint ({type(err).__name__}: "
                f"{first_line(err)})"
            ) from None

    @staticmethod
    def _position(saved: dict, state: _State) -> None:
        """Where the checkpoint stood: step, log rows, time, running means."""
        state.step, state.rows = int(saved["step"]), list(saved["log"])
        state.elapsed = float(saved["elapsed"])
        for i, means in enumerate(saved.get("running_means") or []):
            state.running[i] = tuple(means) if means is not None else None  # type: ignore[assignment]

    def save(self, name: str, state: _State, elapsed: float) -> Path:
        """Write checkpoint ``name`` (main process), point ``latest`` at it, drop older ones."""
        path = self.out_dir / "checkpoints" / name
        if self.accelerator.is_main_process:
            save_adapter(self.model, path, self.meta)
            saved = {
                "step": state.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "log": state.rows,
                "elapsed": elapsed,
                "running_means": [list(m) if m is not None else None for m in state.running],
            }
            buf = io.BytesIO()
            torch.save(saved, buf)
            atomic_write_bytes(path / "state.pt", buf.getvalue())
            pointer = self.out_dir / "checkpoints" / "latest"
            previous = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
            atomic_write_text(pointer, name + "\n")
            atomic_write_text(self.out_dir / "train_log.csv", _log_csv(state.rows))
            # The previous checkpoint stays too: a resume falls back to it when this one is
            # damaged (restore_newest).
            for old in (self.out_dir / "checkpoints").glob("step-*"):
                if old.name not in (name, previous):
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path


def _local_rows(index: list[int], accelerator: Any) -> list[int]:
    """This process's share of a global batch (all of it in a single process)."""
    world = accelerator.num_processes
    if world == 1:
        return index
    per = len(index) // world
    r = accelerator.process_index
    return index[:per * world][r * per : (r + 1) * per]  # fmt: skip


def train(
    loaded: Any,
    pairs: Sequence[Pair],
    cfg: TrainConfig,
    out_dir: Path | str,
    *,
    resume: bool = False,
    model_config: dict[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    prefix_cache_store: dict | None = None,
    card: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train LoRA adapters on ``pairs`` with ``cfg``; write everything under ``out_dir``.

    Args:
        loaded: a :class:`tli.models.LoadedModel`, built with
            ``max_layer=plan(cfg, N).load_depth`` (:func:`load_depth`).
        pairs: the training pairs (source, target, alternatives).
        cfg: training settings (``cfg.layer`` required when a loss layer is the target).
        out_dir: the training directory.
        resume: continue from the newest checkpoint in ``out_dir``.
        model_config: the model settings to record beside ``cfg`` (for re-runs).
        on_step: called with the global step after each optimiser step (tests use it to
            simulate an interruption).
        progress: show a progress bar.
        prefix_cache_store: a dict shared by several runs (e.g. the cells of a sweep): a
            frozen-prefix cache is built once per :func:`tli.cache.store_key` (model and
            weights, tokenizer, K, words) and reused by every run with the same key.
        card: what the adapters' model cards say beyond the training itself: ``languages``
            (source, target), ``data`` (:meth:`tli.pairs.PairSets.summary`) and ``command``
            (what repeats the run). Recorded in ``train_config.json``; a resume reuses it.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    the_plan = _checked_plan(cfg, loaded)
    check_tracker(cfg.report_to)
    loaded = _with_depth(loaded, the_plan, model_config)
    check_pairs(pairs)
    out_dir = ensure_dir(out_dir)
    tracking = cfg.report_to != "none"
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        log_with=cfg.report_to if tracking else None,
        project_dir=str(out_dir / TENSORBOARD_DIR) if tracking else None,
    )
    main = accelerator.is_main_process
    world = accelerator.num_processes
    if accelerator.device.type == "cpu" and half_precision_matmuls(loaded.model):
        if cpu_lacks_bf16():
            log.warning(
                "training runs its matmuls in bfloat16/float16 on a CPU without AVX-512 BF16 or "
                "AMX, where torch's backward matmuls in 16 bits are about 50x slower than in "
                "float32 (docs/benchmarks.md); on this CPU use compute_dtype float32 (4-bit) "
                "or dtype float32"
            )

    config_record = {"model": model_config or {"name": loaded.name}, "train": to_dict(cfg)}
    candidates: list[Path] = []
    if resume:
        candidates = checkpoint_candidates(out_dir)
        if not candidates:
            raise TLIError(f"{out_dir}: no checkpoint to resume from (no checkpoints/step-*/)")
        pointer = out_dir / "checkpoints" / "latest"
        named = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
        if named != candidates[0].name:
            log.warning("%s names %r, which is missing or incomplete; the newest checkpoint is "
                        "%s", pointer, named, candidates[0].name)  # fmt: skip
        saved = read_json(out_dir / "train_config.json")
        now = json.loads(json.dumps(config_record["train"]))
        old = saved.get("train") if isinstance(saved.get("train"), dict) else {}

        def trained(values: Any) -> Any:  # the tracker does not change what is trained
            return {k: v for k, v in values.items() if k != "report_to"}

        if not old or trained(old) != trained(now):
            raise TLIError(
                f"{out_dir}: the training config differs from the one being resumed: "
                f"{_changed(trained(old), trained(now))}"
            )
        if card is None and isinstance(saved.get("card"), dict):
            card = saved["card"]
        config_record["card"] = dict(card or {})  # train.json records what a fresh run does
    else:
        if checkpoint_candidates(out_dir) or (out_dir / "final").exists():
            raise TLIError(
                f"{out_dir}: already holds a training run (use --resume, or a new --out)"
            )
        if main:
            from tli.pairs import write_pairs

            config_record["card"] = dict(card or {})
            atomic_write_json(out_dir / "train_config.json", config_record)
            # source/target columns: the run's languages may be any pair (read_pairs takes them)
            write_pairs(pairs, out_dir / "pairs.tsv", src_key="source", tgt_key="target")
    meta = _adapter_meta(loaded, cfg, card or {})
    if (out_dir / "pairs.tsv").is_file():
        from tli.pairs import file_sha256

        meta["training_pairs"] = {
            "n": len(pairs),
            "sha256": file_sha256(out_dir / "pairs.tsv"),
        }

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = _with_adapters(loaded, cfg)
    model.to(accelerator.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Re-seed after the adapters exist, so dropout masks do not depend on how many adapters
    # were initialised (--adapt-all-layers trains the same function as the default).
    torch.manual_seed(cfg.seed + 1)
    n_trainable = sum(p.numel() for p in trainable)

    tok = loaded.tokenizer
    cache_start = time.perf_counter()
    with accelerator.autocast():  # the context of the training steps (a no-op in float32)
        cache, cache_off = _prefix_cache(
            model, tok, pairs, cfg, the_plan, loaded, prefix_cache_store
        )
    cache_seconds = time.perf_counter() - cache_start
    preserve = _preserve_batches(
        model, tok, cfg, loaded.num_layers, accelerator, cache.k if cache is not None else 0
    )
    bank = _target_bank(model, tok, pairs, cfg, the_plan, loaded.num_layers, world)
    steps_per_epoch = len(batches_for_epoch(len(pairs), cfg.batch_size * world, cfg.seed, 0))
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    checkpoints = _Checkpoints(out_dir, model, optimizer, scheduler, meta, accelerator)
    state = _State(running=[None] * len(the_plan.loss_layers))
    ckpt = None
    if candidates:
        ckpt = checkpoints.restore_newest(candidates, state)
        log.info("resuming %s from step %d of %d", out_dir, state.step, total_steps)

    if tracking:
        accelerator.init_trackers(TRACKER_PROJECT, config=_hparams(config_record["train"]))
    start = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="training",
        unit="step",
        disable=None if (progress and main) else True,
        leave=False,
    )
    last_good = ckpt
    for epoch in range(state.step // steps_per_epoch, cfg.epochs):
        batches = batches_for_epoch(len(pairs), cfg.batch_size * world, cfg.seed, epoch)
        for k in range(state.step - epoch * steps_per_epoch, steps_per_epoch):
            index = batches[k]
            local = _local_rows(index, accelerator)
            if world > 1:
                index = index[: (len(index) // world) * world]
            texts = [pairs[i].source for i in local]
            if bank is None or cfg.hold_targets:
                texts += [pairs[i].target for i in local]
            enc = tokenize(tok, texts, accelerator.device)
            with accelerator.autocast(), _from_cache(model, cache, texts, enc):
                vec = pooled(
                    model,
                    enc,
                    the_plan.loss_layers,
                    num_layers=loaded.num_layers,
                    pooling=cfg.pooling,
                )  # (L, 2b, D)
            b = len(local)
            if bank is not None:
                out = _bank_objective(cfg, vec[:, :b], bank, index, the_plan.loss_weights)
                if cfg.hold_targets:
                    held = _bank_objective(cfg, vec[:, b:], bank, index, the_plan.loss_weights)
                    out = out._replace(loss=out.loss + cfg.hold_targets * held.loss)
            else:
                anchors = [_gather_with_grad(v[:b].float(), accelerator) for v in vec]  # (B, D)
                positives = [_gather_with_grad(v[b:].float(), accelerator) for v in vec]
                gold = batch_gold(pairs, index).to(anchors[0].device)  # (B, B)
                out = objective(
                    cfg, anchors, positives, gold, the_plan.loss_weights, state.running
                )
            if preserve:
                enc_text, reference, entering = preserve[state.step % len(preserve)]
                from_k = (
                    surgery.start_at_block(model, cache.k, entering)
                    if entering is not None
                    else nullcontext()
                )
                with accelerator.autocast(), from_k:
                    states = hidden_states(
                        model,
                        enc_text["input_ids"],
                        enc_text["attention_mask"],
                        [loaded.num_layers],
                        num_layers=loaded.num_layers,
                    )[loaded.num_layers]  # (b, T, D)
                drift = state_drift(states.float(), reference, enc_text["attention_mask"])
                # every process adds the same term; the summed gradients count it once
                out = out._replace(loss=out.loss + cfg.preserve_weight * drift / world)
            if not torch.isfinite(out.loss):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint"
                raise TLIError(
                    f"loss is {out.loss.item()} at step {state.step + 1} (epoch {epoch + 1}); "
                    f"training stopped, {where}"
                )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if world > 1:  # every process holds d(global loss)/d(its own rows): sum them
                for p in trainable:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="sum")
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            state.step += 1
            row = {
                "step": state.step,
                "epoch": epoch + 1,
                "loss": round(out.loss.item(), 6),
                "pos_sim": round(out.pos_sim.item(), 6),
                "neg_sim": round(out.neg_sim.item(), 6),
                "lr": lr,
            }
            state.rows.append(row)
            if tracking:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
            bar.update(1)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}",
                pos=f"{row['pos_sim']:.3f}",
                neg=f"{row['neg_sim']:.3f}",
                lr=f"{lr:.2e}",
            )
            elapsed = state.elapsed + time.perf_counter() - start
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                last_good = checkpoints.save(f"step-{state.step}", state, elapsed)
            if on_step is not None:
                on_step(state.step)
        elapsed = state.elapsed + time.perf_counter() - start
        if main:  # before the checkpoint, so a resume from it never lacks this epoch's adapter
            save_adapter(model, out_dir / f"epoch-{epoch + 1}", _at(meta, state, epoch + 1))
        last_good = checkpoints.save(f"step-{state.step}", state, elapsed)
    bar.close()
    if tracking:
        accelerator.end_training()
    seconds = state.elapsed + time.perf_counter() - start
    final = out_dir / "final"
    rows = state.rows
    if main:
        save_adapter(model, final, _at(meta, state, cfg.epochs))
        atomic_write_text(out_dir / "train_log.csv", _log_csv(rows))
        atomic_write_json(
            out_dir / "train.json",
            {
                "config": config_record,
                "pairs": len(pairs),
                "trainable_parameters": n_trainable,
                "steps": state.step,
                "steps_per_epoch": steps_per_epoch,
                "processes": world,
                "seconds": round(seconds, 3),
                "steps_per_second": round(state.step / seconds, 3) if seconds > 0 else None,
                # building the frozen-prefix cache (before the steps; not in "seconds")
                "prefix_cache": ({"off": cache_off} if cache_off else None)
                if cache is None
                else {
                    "first_block": cache.k,
                    "strings": len(cache.states),
                    "seconds": round(cache_seconds, 3),
                },
                "final_loss": rows[-1]["loss"] if rows else None,
                "adapter": "final",
            },
        )
    accelerator.wait_for_everyone()
    return TrainResult(
        out_dir, final, state.step, seconds, rows[-1]["loss"] if rows else math.nan, rows
    )


def preserve_texts(path: str | None = None) -> list[str]:
    """The sentences of the preservation term: ``path``, one per line, or the bundled ones.

    The bundled files (``tli/data/preserve_sw.txt``, ``preserve_en.txt``) hold everyday
    sentences written for the project, none of them among the texts the perplexity check
    measures (``tli/data/texts_*.txt``; a test checks this).

    Raises:
        TLIError: the file cannot be read, is not UTF-8, has a blank line or no line.
    """
    from tli.perplexity import read_sentences

    if path is None:
        from importlib import resources

        files = [(f"tli/data/preserve_{c}.txt", resources.files("tli") / f"data/preserve_{c}.txt")
                 for c in ("sw", "en")]  # fmt: skip
    else:
        files = [(str(path), Path(path))]
    texts: list[str] = []
    for name, file in files:
        lines = read_sentences(file, f"preserve_texts {name}")
        if not lines:
            raise TLIError(f"preserve_texts {name}: no sentence")
        texts += lines
    return texts


def _target_bank(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[Pair],
    cfg: TrainConfig,
    the_plan: TrainPlan,
    n: int,
    world: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For ``negatives = lexicon``: the frozen model's target vectors and the gold mask.

    Returns ``(bank, gold)``: (L, P, D) pooled vectors of every pair's target at each loss layer,
    computed once with the adapters disabled, and the (P, P) gold mask of the pairs; None for
    ``negatives = batch``.
    """
    if cfg.negatives != "lexicon":
        return None
    if world > 1:
        raise TLIError("negatives = lexicon runs in one process")
    from tli.embed import embed_strings

    device = next(model.parameters()).device
    with model.disable_adapter():
        bank = embed_strings(
            model,
            tok,
            [p.target for p in pairs],
            list(the_plan.loss_layers),
            num_layers=n,
            pooling=cfg.pooling,
            progress=False,
        )  # (L, P, D)
    return bank.to(device), gold_mask(list(pairs)).to(device)


def _bank_objective(
    cfg: TrainConfig,
    vec: torch.Tensor,
    bank: tuple[torch.Tensor, torch.Tensor],
    index: Sequence[int],
    weights: Sequence[float],
) -> LossOutput:
    """The weighted :func:`tli.losses.lexicon_info_nce` over the loss layers of one batch."""
    vectors, gold = bank
    rows = torch.as_tensor(list(index), device=gold.device)
    outs = [
        lexicon_info_nce(
            vec[i].float(),
            vectors[i],
            rows,
            gold[rows],
            temperature=cfg.temperature,
            center=cfg.center == "batch",
        )
        for i in range(vec.shape[0])
    ]
    total = sum(weights)
    return LossOutput(
        sum(w * o.loss for w, o in zip(weights, outs, strict=True)),
        sum(w * o.pos_sim for w, o in zip(weights, outs, strict=True)) / total,
        sum(w * o.neg_sim for w, o in zip(weights, outs, strict=True)) / total,
    )


def _preserve_batches(
    model: torch.nn.Module, tok: Any, cfg: TrainConfig, n: int, accelerator: Any, k: int = 0
) -> list[tuple[dict, torch.Tensor, torch.Tensor | None]]:
    """Tokenised sentence batches, the frozen model's final-layer states and its block-k input.

    The sentences are shuffled once (seeded by ``cfg.seed``) into batches of
    ``cfg.preserve_batch``; step s uses batch ``s mod count``, so a resumed run sees the same
    ones. The reference states come from the model with its adapters disabled (the base model),
    computed once before the first step. With ``k`` >= 1 (a frozen-prefix cache: blocks below k
    carry no adapter) the states entering block k are kept too, and every step's pass over the
    sentences starts there, as the word pairs' passes do: the same states, without running
    blocks 0..k-1 again. Empty when ``cfg.preserve_weight`` is 0.
    """
    if cfg.preserve_weight <= 0:
        return []
    texts = preserve_texts(cfg.preserve_texts)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(texts), generator=gen).tolist()
    out = []
    with torch.no_grad(), model.disable_adapter(), accelerator.autocast():
        for start in range(0, len(order), cfg.preserve_batch):
            batch = [texts[i] for i in order[start : start + cfg.preserve_batch]]
            enc = tokenize(tok, batch, accelerator.device)
            states = hidden_states(
                model, enc["input_ids"], enc["attention_mask"], [k, n] if k else [n], num_layers=n
            )  # layer -> (b, T, D)
            out.append((enc, states[n].float(), states[k] if k else None))
    return out


def _prefix_cache(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[Pair],
    cfg: TrainConfig,
    the_plan: TrainPlan,
    loaded: Any,
    store: dict | None = None,
) -> tuple[Any, str | None]:
    """The frozen-prefix cache for this run (see :mod:`tli.cache`), or None and why not.

    ``auto`` leaves the cache off, with a log line and a note in ``train.json``, where it
    would not be exact (reduced precision); ``on`` was refused for that before training.
    A cache in ``store`` is reused only under the same :func:`tli.cache.store_key`.
    """
    k = the_plan.first_adapted
    if cfg.prefix_cache == "off":
        return None, None
    supported = surgery.layout(model).prefix_cache
    if k < 1 or not supported:
        return None, None
    from tli.cache import PrefixCache, inexact_reason, store_key

    why = inexact_reason(model, k, cfg.mixed_precision)
    if why is not None:
        log.info("prefix cache off: %s", why)
        return None, why
    start = time.perf_counter()
    texts = [s for p in pairs for s in (p.source, p.target)]
    key = store_key(model, tok, texts, k, name=loaded.name) if store is not None else None
    if store is not None and key in store:
        return store[key], None
    cache = PrefixCache.build(model, tok, texts, k, num_layers=loaded.num_layers)
    if store is not None:
        store[key] = cache
    log.info(
        "prefix cache: states entering block %d for %d strings (%.1f MB) in %.1f s",
        k,
        len(cache.states),
        cache.nbytes / 1e6,
        time.perf_counter() - start,
    )
    return cache, None


@contextmanager
def _from_cache(model: torch.nn.Module, cache: Any, texts: Sequence[str], enc: dict):
    """Run the pass from the cached states entering block K (no-op without a cache)."""
    if cache is None:
        yield
        return
    with surgery.start_at_block(model, cache.k, cache.batch(texts, enc)):
        yield


def _checked_plan(cfg: TrainConfig, loaded: Any) -> TrainPlan:
    """:func:`plan`, and the prefix cache's needs when ``prefix_cache = on``."""
    the_plan = plan(cfg, loaded.num_layers)
    if cfg.prefix_cache == "on":
        surgery.check_prefix_cache(loaded.model)
        if the_plan.first_adapted < 1:
            raise TLIError(
                "prefix_cache = on needs adapters only on blocks >= K > 0 (set adapt_layers); "
                "block 0 is adapted"
            )
        from tli.cache import inexact_reason

        why = inexact_reason(loaded.model, the_plan.first_adapted, cfg.mixed_precision)
        if why is not None:
            raise TLIError(f"prefix_cache = on: {why}; set prefix_cache = off or auto")
    return the_plan


def check_pairs(pairs: Sequence[Pair], where: str | None = None) -> None:
    """Refuse training pairs that give no negatives: fewer than 2, or every target shared.

    In-batch negatives are the other pairs' targets, minus any listed translation of the
    anchor (:func:`batch_gold`); when every pair's target is a translation of every source,
    no batch has a negative and the loss is undefined.

    Args:
        pairs: The training pairs.
        where: The file(s) they came from, for the message.
    """
    prefix = f"{where}: " if where else ""
    if len(pairs) < 2:
        raise TLIError(f"{prefix}training needs at least 2 pairs, got {len(pairs)}")
    if bool(gold_mask(list(pairs)).all()):
        raise TLIError(
            f"{prefix}every pair's target is a listed translation of every source, so training "
            "has no negatives (the other pairs' targets); give pairs with different targets"
        )


def check_trainable(cfg: TrainConfig, model: Any, pairs: Sequence[Pair] | None = None,
                    where: str | None = None) -> TrainPlan:  # fmt: skip
    """Everything :func:`train` would refuse, checked before any weight is loaded.

    Args:
        cfg: The training settings.
        model: The model's structure: a :class:`tli.models.LoadedModel` from
            :func:`tli.models.meta_model` (no weights), built with ``load_depth``.
        pairs: The training pairs, if known (:func:`check_pairs`).
        where: The file(s) the pairs came from, for messages.

    Returns:
        The :class:`TrainPlan`.

    Raises:
        TLIError: A loss layer or adapted block the model does not have, target modules it
            lacks, prefix-cache settings it cannot meet, or pairs without negatives.
    """
    from peft import get_peft_model

    the_plan = _checked_plan(cfg, model)
    if pairs is not None:
        check_pairs(pairs, where)
    with quiet_peft():
        try:
            get_peft_model(model.model, lora_config(cfg, model.num_layers, model.model))
        except ValueError as err:  # e.g. peft's NoMatchingPeftModuleError
            raise TLIError(
                f"target_modules {', '.join(cfg.target_modules)}: cannot add adapters: "
                f"{first_line(err)}"
            ) from None
    return the_plan


def load_depth(cfg: TrainConfig, num_layers: int) -> int | None:
    """The ``max_layer`` to load the model with for ``cfg`` (None: the full model)."""
    return plan(cfg, num_layers).load_depth
