"""Frozen-prefix activation cache: the hidden states entering block K, computed once per string.

When the adapters sit only on blocks ``>= K``, blocks ``0..K-1`` never change during training, so
for a fixed word list the states entering block K are fixed too. :class:`PrefixCache` computes
them once (embeddings plus blocks ``< K``, no gradient) and stores, per string, the states of its
real (attention-masked) tokens. A training step then rebuilds the padded batch from the cache and
runs blocks ``>= K`` only (:func:`tli.surgery.start_at_block`); masks and position ids come from
the same tokenisation as an uncached step, so the loss and the adapter are the same (tested to
1e-5). LoRA dropout acts inside the adapted blocks only, which run as before; nothing cached
passes through an adapter.
"""

from __future__ import annotations

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
