"""What a load will build and the memory its weights need, from the config alone (no weights).

:func:`footprint` builds the model on PyTorch's meta device (shapes, no storage) exactly as
:func:`tli.models.load_model` would build it (depth-truncated, with or without the LM head) and
counts its parameters per part: the embeddings, each block (and the share of it in linear
layers, which 4-bit loads store in NF4), the final norm, the LM head. Bytes per parameter:

* float32 4, bfloat16 and float16 2;
* NF4 (bitsandbytes ``Linear4bit``): 4 bits per weight plus one float32 scale (absmax) per block
  of 64 weights, 0.5 + 4/64 = 0.5625 bytes; with double quantization the scales are stored in
  8 bits with one float32 per 256 of them, 0.5 + 1/64 + 4/(64 * 256) = 0.5159 bytes. Biases of
  quantized layers, norms, embeddings and the LM head stay in the load dtype.

These are the weights alone: the Python runtime (about 0.4 GB with torch and transformers
imported), activations (small for single words) and, during training, LoRA parameters with
their AdamW state (a few MB) come on top. :func:`check_fits` compares the weights with the
memory free on the device and refuses a load that cannot fit, before any weight is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tli import surgery
from tli.errors import TLIError

#: Weights per NF4 block (bitsandbytes' default ``blocksize`` for 4-bit).
NF4_BLOCK = 64
#: Bytes per weight in NF4: 4-bit codes plus one float32 absmax per block.
NF4_BYTES = 0.5 + 4 / NF4_BLOCK
#: Bytes per weight in NF4 with double quantization: 8-bit absmax, one float32 per 256 of them.
NF4_DOUBLE_BYTES = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Part:
    """One part of a model: its parameters, how many of them are stored in NF4, their bytes."""

    name: str  # "embeddings", "block 0", ..., "final norm", "LM head", "other"
    params: int
    linear: int  # weights of linear layers (the ones a 4-bit load stores in NF4)
    quantized: int  # parameters stored in NF4 (0 unless 4-bit)
    bytes: float


@dataclass(frozen=True)
class Footprint:
    """What one load builds and the memory its weights take (see the module docstring)."""

    name: str
    model_type: str
    num_layers: int  # N, blocks of the full model
    width: int  # D, the hidden size
    vocab_size: int  # V
    depth: int  # blocks built
    lm_head: bool
    tied: bool  # the LM head shares the embedding matrix (no memory of its own)
    dtype: str
    load_in_4bit: bool
    double_quant: bool
    parts: tuple[Part, ...]

    @property
    def params(self) -> int:
        """Parameters built."""
        return sum(p.params for p in self.parts)

    @property
    def bytes(self) -> float:
        """Bytes of the weights built."""
        return sum(p.bytes for p in self.parts)

    def part(self, name: str) -> Part | None:
        """The part called ``name``, or None."""
        return next((p for p in self.parts if p.name == name), None)

    @property
    def blocks(self) -> list[Part]:
        """The blocks built, in order."""
        return [p for p in self.parts if p.name.startswith("block ")]

    def builds(self) -> str:
        """What is built, in words: e.g. ``embeddings, blocks 0-1, final norm, no LM head``."""
        blocks = f"blocks 0-{self.depth - 1}" if self.depth > 1 else "block 0"
        head = "no LM head"
        if self.lm_head:
            head = "LM head (tied to the embeddings)" if self.tied else "LM head"
        return f"embeddings, {blocks}, final norm, {head}"

    def weights_in_words(self) -> str:
        """How the weights are stored, in words."""
        if not self.load_in_4bit:
            return f"every weight in {self.dtype}"
        per = NF4_DOUBLE_BYTES if self.double_quant else NF4_BYTES
        dq = ", double quantization" if self.double_quant else ""
        return (
            f"the blocks' linear layers in NF4 ({per:.4f} bytes per weight incl. block "
            f"scales{dq}), everything else in {self.dtype}"
        )


def _meta_model(config: Any, max_layer: int | None, lm_head: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    n = surgery.num_layers(config)
    if max_layer is not None and max_layer < n:
        config = surgery.truncate_config(config, max(max_layer, 1))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not lm_head:
        model.set_output_embeddings(surgery.NoHead())
    return model


def footprint(
    config: Any,
    dtype: str,
    *,
    load_in_4bit: bool = False,
    double_quant: bool = False,
    max_layer: int | None = None,
    lm_head: bool | None = None,
    name: str = "",
) -> Footprint:
    """The parts :func:`tli.models.load_model` builds for ``config`` and their memory.

    Args:
        config: the transformers config (no weights are read).
        dtype: the load dtype (float32, bfloat16 or float16).
        load_in_4bit: the blocks' linear layers in NF4.
        double_quant: NF4 with double quantization.
        max_layer: build blocks ``0..max_layer-1`` only (as ``load_model``).
        lm_head: build the LM head (default: only at full depth).
        name: the model's name, for messages.
    """
    if dtype not in DTYPE_BYTES:
        raise TLIError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    n = surgery.num_layers(config)
    truncated = max_layer is not None and max_layer < n
    head = (not truncated) if lm_head is None else lm_head
    model = _meta_model(config, max_layer, head)
    width = DTYPE_BYTES[dtype]
    nf4 = NF4_DOUBLE_BYTES if double_quant else NF4_BYTES
    seen: set[int] = set()

    def count(name: str, module: torch.nn.Module, quantizable: bool) -> Part:
        params = linear = quantized = 0
        nbytes = 0.0
        for sub in module.modules():
            is_linear = quantizable and surgery.linear_dims(sub) is not None
            for pname, p in sub.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                params += p.numel()
                if is_linear and pname == "weight":
                    linear += p.numel()
                    if load_in_4bit:
                        quantized += p.numel()
                        nbytes += p.numel() * nf4
                        continue
                nbytes += p.numel() * width
        return Part(name, params, linear, quantized, nbytes)

    emb = surgery.input_embeddings(model)
    parts = [count("embeddings", emb, False)]
    stack = surgery.blocks(model)
    parts += [count(f"block {i}", block, True) for i, block in enumerate(stack)]
    parts.append(count("final norm", surgery.final_norm(model), False))
    tied = False
    if head:
        out = surgery.lm_head(model)
        tied = getattr(out, "weight", None) is emb.weight
        parts.append(count("LM head", out, False))
    other = count("other", model, False)  # e.g. GPT-2's position embeddings
    if other.params:
        parts.append(other)
    return Footprint(
        name=name,
        model_type=str(config.model_type),
        num_layers=n,
        width=int(emb.weight.shape[1]),
        vocab_size=int(emb.weight.shape[0]),
        depth=len(stack),
        lm_head=head,
        tied=tied,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
        double_quant=double_quant,
        parts=tuple(parts),
    )


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or None without one."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_bytes(device: str) -> int | None:
    """Memory free for new weights on ``device`` (RAM for cpu), or None when unknown."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return int(free)
    if device != "cpu":
        return None  # "auto": accelerate may place weights on several devices or offload
    free: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        free = None
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = None
    limit = _cgroup_free()
    if limit is not None:
        free = limit if free is None else min(free, limit)
    return free


def gb(nbytes: float) -> str:
    """Bytes in GB (10^9): ``1.30 GB``, ``0.123 GB`` below 1 GB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e9:.3f} GB"


def check_fits(fp: Footprint, device: str) -> None:
    """Raise a TLIError when the weights of ``fp`` exceed the memory free on ``device``.

    Only the weights are compared (the runtime and activations come on top), so a refused load
    could not have succeeded; an accepted one may still run short.
    """
    free = available_bytes(device)
    if free is None or fp.bytes <= free:
        return
    where = "GPU memory" if device.startswith("cuda") else "RAM"
    raise TLIError(
        f"model {fp.name!r} needs {gb(fp.bytes)} for its weights ({fp.builds()}; "
        f"{fp.weights_in_words()}) but only {gb(free)} of {where} is free; use load_in_4bit, "
        "a smaller dtype, or a machine with more memory (--plan shows the estimate)"
    )


def _count(n: float) -> str:
    """A parameter count in words: 525.3 M, 8.03 B, 4.1 k."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(int(n))


def lora_parameters(
    config: Any, adapt: tuple[int, ...] | None, r: int, modules: tuple[str, ...]
) -> int:
    """LoRA parameters of rank ``r`` on ``modules`` of the blocks ``adapt`` (None: every block)."""
    depth = surgery.num_layers(config) if adapt is None else max(adapt) + 1
    stack = surgery.blocks(_meta_model(config, depth, False))
    total = 0
    for i, block in enumerate(stack):
        if adapt is not None and i not in adapt:
            continue
        for name, module in block.named_modules():
            dims = surgery.linear_dims(module)
            if dims is not None and name.rsplit(".", 1)[-1] in modules:
                total += r * (dims[0] + dims[1])
    return total


@dataclass(frozen=True)
class Stage:
    """One row of a plan: a stage, the load it makes (None: it shares another's), LoRA."""

    label: str
    footprint: Footprint | None
    note: str = ""
    lora_params: int = 0


def render_plan(stages: list[Stage], device: str) -> tuple[str, str | None]:
    """The plan as text, and why it does not fit in the memory free on ``device`` (or None).

    The reason is one line naming the first stage whose weights exceed the free memory. The
    per-part table comes from the largest load; each stage gives what it builds, its
    parameters and the memory of its weights (LoRA with gradients and AdamW state: 16 bytes
    per LoRA parameter).
    """
    loads = [s.footprint for s in stages if s.footprint is not None]
    if not loads:
        raise TLIError("nothing to plan")
    big = max(loads, key=lambda f: f.depth + f.lm_head)
    head = "tied to the embeddings" if big.tied else "untied"
    lines = [
        f"plan for {big.name} ({big.model_type}): {big.num_layers} blocks, hidden size "
        f"{big.width:,}, vocabulary {big.vocab_size:,}, LM head {head}",
        f"weights: {big.weights_in_words()}",
        "",
        f"  {'part':<14}{'parameters':>12}{'memory':>11}",
        f"  {'embeddings':<14}{_count(big.part('embeddings').params):>12}"
        f"{gb(big.part('embeddings').bytes):>11}",
    ]
    blocks = big.blocks
    if blocks:
        one = blocks[0]
        same = all(b.params == one.params for b in blocks)
        label = "each block" if same else "block 0"
        lines.append(
            f"  {label:<14}{_count(one.params):>12}{gb(one.bytes):>11}  "
            f"({_count(one.linear)} in linear layers)"
        )
        if len(blocks) > 1:
            lines.append(
                f"  {f'{len(blocks)} blocks':<14}{_count(sum(b.params for b in blocks)):>12}"
                f"{gb(sum(b.bytes for b in blocks)):>11}  "
                f"({_count(sum(b.linear for b in blocks))} in linear layers)"
            )
    for name in ("final norm", "LM head", "other"):
        part = big.part(name)
        if part is not None:
            shown = "(the embeddings)" if name == "LM head" and big.tied else gb(part.bytes)
            params = "0 own" if name == "LM head" and big.tied else _count(part.params)
            lines.append(f"  {name:<14}{params:>12}{shown:>11}")
    free = available_bytes(device)
    problem: str | None = None
    where = "GPU memory" if device.startswith("cuda") else "RAM"
    rows = []
    for stage in stages:
        if stage.footprint is None:
            rows.append((stage.label, stage.note, "", "", ""))
            continue
        fp = stage.footprint
        total = fp.bytes + 16 * stage.lora_params
        ok = free is None or total <= free
        if not ok and problem is None:
            problem = (
                f"the plan does not fit: {stage.label} needs {gb(total)} for its weights but "
                f"only {gb(free)} of {where} is free; use load_in_4bit, a smaller dtype, or a "
                "machine with more memory"
            )
        builds = fp.builds() + (f"; LoRA {_count(stage.lora_params)}" if stage.lora_params else "")
        note = "; ".join(x for x in ("" if ok else "DOES NOT FIT", stage.note) if x)
        rows.append((stage.label, builds, _count(fp.params), gb(total), note))
    w0 = max(len(r[0]) for r in rows + [("stage",)])
    w1 = max(len(r[1]) for r in rows if r[2]) if any(r[2] for r in rows) else 6
    lines += ["", f"  {'stage':<{w0}}  {'builds':<{w1}}  {'parameters':>10}  {'memory':>9}"]
    for label, builds, params, mem, note in rows:
        if not params:
            lines.append(f"  {label:<{w0}}  {builds}")
            continue
        tail = f"  ({note})" if note else ""
        lines.append(f"  {label:<{w0}}  {builds:<{w1}}  {params:>10}  {mem:>9}{tail}")
    lines.append("")
    if free is None:
        lines.append(f"free {where} on {device!r}: unknown here, not checked")
    else:
        lines.append(f"free {where} on {device!r}: {gb(free)}")
    lines.append(
        "memory = weights (and LoRA with its gradients and AdamW state); the runtime (about "
        "0.4 GB) and activations come on top"
    )
    return "\n".join(lines), problem

