"""Frozen-prefix activation cache: the hidden states entering block K, computed once per string.

When the adapters sit only on blocks ``>= K``, blocks ``0..K-1`` never change during training, so
for a fixed word list the states entering block K are fixed too. :class:`PrefixCache` computes
them once (embeddings plus blocks ``< K``, no gradient) and stores, per string, the states of its
real (attention-masked) tokens. A training step then rebuilds the padded batch from the cache and
runs blocks ``>= K`` only (:func:`tli.surgery.start_at_block`); masks and position ids come from
the same tokenisation as an uncached step, so the loss and the adapter are the same (tested to
1e-5). LoRA dropout acts inside the adapted blocks only, which run as before; nothing cached
passes through an adapter.

The cache is exact only in full precision. In bf16 or fp16 (mixed precision, or weights stored
that way) a block's output for a word depends on the shape of the padded batch it was computed
in, at the precision's rounding, and the cache is built in other batches than the training
steps. On the embedded model (``benchmarks/cache_precision.py``, 8 steps, adapters on blocks
14-17) a bf16 cache, built under the same autocast as the steps, gave an adapter 2.2e-5 away
from the uncached one, where float32 agrees to 9e-9. So :func:`inexact_reason` names any
reduced precision, and training then refuses ``prefix_cache = on`` and runs ``auto`` uncached
(docs/training.md).

A cache is reused across runs (a sweep's cells) only under :func:`store_key`, which names
everything its states depend on: the model (name and a fingerprint of the weights blocks
``< K`` and the embedding rows of these words hold), the tokenizer (and the token ids it gives
these words), K and the weights' dtype.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from tli import surgery
from tli.embed import hidden_states, tokenize
from tli.errors import TLIError


class PrefixCache:
    """Per-string hidden states ``(T_i, D)`` entering block ``k`` (layer index ``k``)."""

    def __init__(self, k: int, states: dict[str, torch.Tensor]) -> None:
        self.k = k
        self.states = states

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        k: int,
        *,
        num_layers: int,
        batch_size: int = 64,
    ) -> PrefixCache:
        """Run the embeddings and blocks ``0..k-1`` once over ``texts``; keep the real tokens.

        Args:
            model: the (possibly peft-wrapped) causal LM; blocks ``< k`` must carry no adapter.
            tokenizer: its tokenizer.
            texts: the strings (duplicates are computed once).
            k: the first adapted block, ``1 <= k < depth``.
            num_layers: N of the full model.
            batch_size: strings per pass.
        """
        surgery.check_prefix_cache(model)
        depth = len(surgery.blocks(model))
        if not 1 <= k < depth:
            raise TLIError(f"the prefix cache needs 1 <= K < {depth} (blocks present), got {k}")
        unique = list(dict.fromkeys(texts))
        lengths = [len(ids) for ids in tokenizer(unique)["input_ids"]]
        order = sorted(range(len(unique)), key=lambda i: (lengths[i], i))
        device = next(model.parameters()).device
        states: dict[str, torch.Tensor] = {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), batch_size):
                    chunk = [unique[i] for i in order[start : start + batch_size]]
                    enc = tokenize(tokenizer, chunk, device)
                    mask = enc["attention_mask"].bool()  # (B, T)
                    hidden = hidden_states(
                        model, enc["input_ids"], enc["attention_mask"], [k], num_layers=num_layers
                    )[k]  # (B, T, D)
                    for row, text in enumerate(chunk):
                        states[text] = hidden[row, mask[row]].clone()  # (T_i, D)
        finally:
            model.train(was_training)
        return cls(k, states)

    def batch(self, texts: Sequence[str], enc: dict) -> torch.Tensor:
        """The padded ``(B, T, D)`` states entering block k for a tokenised batch of ``texts``.

        Padded positions hold zeros; attention never reads them and pooling masks them.
        """
        mask = enc["attention_mask"].bool()  # (B, T)
        first = self.states[texts[0]]
        out = torch.zeros(*mask.shape, first.shape[-1], dtype=first.dtype, device=mask.device)
        for row, text in enumerate(texts):
            cached = self.states.get(text)
            if cached is None:
                raise TLIError(f"the prefix cache holds no states for {text!r}")
            if int(mask[row].sum()) != cached.shape[0]:
                raise TLIError(f"the prefix cache of {text!r} does not match its tokenisation")
            out[row, mask[row]] = cached.to(out.device)
        return out

    @property
    def nbytes(self) -> int:
        """Memory held by the cached states."""
        return sum(t.numel() * t.element_size() for t in self.states.values())


#: Floating dtypes in which the cached and the uncached paths agree (to 1e-5 in the adapter).
EXACT_DTYPES = (torch.float32, torch.float64)


def inexact_reason(model: torch.nn.Module, k: int, mixed_precision: str = "no") -> str | None:
    """Why a cache of the states entering block ``k`` would not be exact, or None.

    Reduced precision (mixed precision, or bf16/fp16/quantised weights in the embeddings or
    blocks ``< k``) makes a block's output depend on the padded batch it ran in, and the
    cache is built in other batches than the training steps (see the module docstring).
    """
    if mixed_precision != "no":
        return f"mixed precision {mixed_precision} (the cache is exact only in float32)"
    for name, param in _prefix_tensors(model, k):
        if param.dtype not in EXACT_DTYPES:
            return f"{name} is {str(param.dtype).replace('torch.', '')} (the cache is exact " \
                "only in float32)"
    return None


def _prefix_tensors(model: torch.nn.Module, k: int) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer the states entering block ``k`` are computed from."""
    out = [(f"embeddings.{n}", t) for n, t in model.get_input_embeddings().state_dict().items()]
    for i, block in enumerate(surgery.blocks(model)[:k]):
        out += [(f"block{i}.{n}", t) for n, t in block.state_dict().items()]
    return out


def _bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, bf16 included)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def store_key(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], k: int, *, name: str
) -> tuple[str, ...]:
    """The key under which a cache may be shared between runs: everything its states depend on.

    - the model: ``name`` and a BLAKE2b fingerprint of the model config (cut to k blocks), of
      every parameter and buffer of blocks ``0..k-1``, and of the embedding rows of the words'
      tokens (plus the embedding module's other tensors, e.g. Gemma's scale): the weights the
      cached states read. Two models with other weights under one name get different keys;
    - the tokenizer: its class, ``name_or_path`` and a hash of the token ids it gives ``texts``;
    - ``k``, the first adapted block: blocks at or above it never feed the cache, so runs that
      adapt blocks 14-17 and 14-15 share one cache;
    - the words themselves (sorted, without duplicates) and the weights' dtype.

    Args:
        model: The (possibly peft-wrapped) model the cache is built from.
        tokenizer: Its tokenizer.
        texts: The strings to cache.
        k: The first adapted block.
        name: The model's name as given (``LoadedModel.name``).

    Returns:
        A tuple of strings.
    """
    unique = sorted(set(texts))
    ids = tokenizer(unique)["input_ids"]
    tok_hash = hashlib.blake2b(repr(ids).encode("utf-8"), digest_size=16).hexdigest()
    weights = hashlib.blake2b(digest_size=16)
    # The config, cut to the k blocks that feed the cache: the same prefix loaded to another
    # depth (another cell's loss layer) gets the same key.
    config = surgery.truncate_config(model.config, k)
    weights.update(config.to_json_string().encode("utf-8"))
    rows = sorted({i for seq in ids for i in seq})
    for tensor_name, tensor in _prefix_tensors(model, k):
        if tensor_name == "embeddings.weight":
            tensor = tensor[rows]  # only the rows these words read
        weights.update(f"{tensor_name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        weights.update(_bytes(tensor))
    words = hashlib.blake2b("\n".join(unique).encode("utf-8"), digest_size=16).hexdigest()
    dtype = str(next(model.parameters()).dtype)
    tokenizer_id = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}"
    return (name, weights.hexdigest(), tokenizer_id, tok_hash, f"k={k}", words, dtype)
