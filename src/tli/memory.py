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
    quantized: int  # parameters in linear layers stored in NF4 (0 unless 4-bit)
    bytes: float


@dataclass(frozen=True)
class Footprint:
    """What one load builds and the memory its weights take (see the module docstring)."""

    name: str
    model_type: str
    num_layers: int  # N, blocks of the full model
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
        params = quantized = 0
        nbytes = 0.0
        for sub in module.modules():
            in_linear = quantizable and load_in_4bit and surgery.linear_dims(sub) is not None
            for pname, p in sub.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                params += p.numel()
                if in_linear and pname == "weight":
                    quantized += p.numel()
                    nbytes += p.numel() * nf4
                else:
                    nbytes += p.numel() * width
        return Part(name, params, quantized, nbytes)

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
    """Bytes in GB (10^9), e.g. ``1.30 GB``."""
    return f"{nbytes / 1e9:.2f} GB"


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
        f"model {fp.name!r}: its weights need {gb(fp.bytes)} ({fp.builds()}; "
        f"{fp.weights_in_words()}) but only {gb(free)} of {where} is free; use load_in_4bit, "
        "a smaller dtype, or a machine with more memory (tli ... --plan shows the estimate)"
    )
