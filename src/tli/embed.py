"""Pooled, L2-normalised vectors for many strings at many layers, in one pass per batch.

The forward pass goes through the decoder only (never the LM head) and stops after the
deepest block that a requested layer needs. Layer indices follow ``output_hidden_states``
(docs/design.md, fact 3): 0 = input embeddings, i = output of block i-1, N = final (after the norm).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tli import surgery
from tli.config import check_one_of
from tli.errors import TLIError

log = logging.getLogger("tli")

Pooling = Literal["mean", "mean_all", "last"]
POOLINGS: tuple[str, ...] = ("mean", "mean_all", "last")


def parse_layers(spec: str | Sequence[int | str], num_layers: int) -> list[int]:
    """Layer indices from ``"0,2,final"``, ``"all"``, ``"3-6"`` or a list; checked against 0..N."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    layers: list[int] = []
    for item in items:
        text = str(item).strip().lower()
        if text == "all":
            layers.extend(range(num_layers + 1))
            continue
        if text == "final":
            layers.append(num_layers)
            continue
        lo, sep, hi = text.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if sep and lo else [int(text)]
        except ValueError:
            raise TLIError(
                f"layer {item!r}: expected an index 0..{num_layers}, a range a-b, 'final' or 'all'"
            ) from None
        if not span:
            raise TLIError(
                f"layer range {item!r} is empty (write it low-high, e.g. 0-{num_layers})"
            )
        for layer in span:
            if not 0 <= layer <= num_layers:
                raise TLIError(
                    f"layer {layer} is outside 0..{num_layers} (0 = embeddings, "
                    f"{num_layers} = final)"
                )
            layers.append(layer)
    if not layers:
        raise TLIError("no layers requested")
    return list(dict.fromkeys(layers))


class _Stop(Exception):
    """Raised by a hook once every requested layer has been captured."""


@contextmanager
def _capture(blocks: torch.nn.ModuleList, wanted: set[int], stop_after: int | None):
    """Record the input of block 0 (layer 0) and the outputs of blocks (layer i = block i-1)."""
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def pre_hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured[0] = hidden
        if stop_after == 0:
            raise _Stop

    def make_hook(layer: int):
        def hook(_module, _args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if stop_after == layer:
                raise _Stop

        return hook

    if 0 in wanted:
        handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    for layer in sorted(wanted - {0}):
        handles.append(blocks[layer - 1].register_forward_hook(make_hook(layer)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    *,
    num_layers: int,
) -> dict[int, torch.Tensor]:
    """Hidden states ``(B, T, D)`` at ``layers`` from one decoder pass, without the LM head.

    Blocks above the deepest requested layer do not run, unless ``num_layers`` (N, "final")
    is requested, which needs the whole stack and the final norm. Position ids follow the
    attention mask, so left padding gives the same states as no padding.

    Args:
        model: a causal LM (possibly peft-wrapped, possibly depth-truncated).
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)``, 1 for real tokens.
        layers: indices in 0..N.
        num_layers: N, the depth of the full model (a truncated model holds fewer blocks).
    """
    blocks = surgery.blocks(model)
    depth = len(blocks)
    wanted = set(layers)
    want_final = num_layers in wanted and depth == num_layers
    deepest = max(wanted - {num_layers} if want_final else wanted, default=0)
    if deepest > depth:
        raise TLIError(
            f"layer {deepest} needs {deepest} blocks but the model holds {depth} (max_layer)"
        )
    # The final layer is the decoder's own normed output; everything else comes from hooks.
    hooked = wanted - {num_layers} if want_final else wanted
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    decoder = surgery.decoder(model)
    with _capture(blocks, hooked, None if want_final else deepest) as captured:
        try:
            out = decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
            if want_final:
                captured[num_layers] = out.last_hidden_state
        except _Stop:
            pass
    return {layer: captured[layer] for layer in layers}


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, special_mask: torch.Tensor, pooling: str
) -> torch.Tensor:
    """Pool ``(..., B, T, D)`` states into ``(..., B, D)`` (not normalised).

    ``mean``: over attention-masked non-special tokens; ``mean_all``: over all attention-masked
    tokens (the paper's pilot); ``last``: the last attention-masked token. Masks are ``(B, T)``;
    pooling never depends on the padding side.
    """
    check_one_of("pooling", pooling, POOLINGS)
    real = attention_mask.bool()
    if pooling == "last":
        positions = torch.arange(real.shape[-1], device=real.device)
        last = torch.where(real, positions, -1).argmax(-1)  # (B,)
        index = last[:, None, None].expand(-1, 1, hidden.shape[-1])
        index = index.expand(*hidden.shape[:-3], -1, 1, -1) if hidden.dim() > 3 else index
        return hidden.gather(-2, index).squeeze(-2)
    keep = real & ~special_mask.bool() if pooling == "mean" else real  # (B, T)
    counts = keep.sum(-1, keepdim=True)  # (B, 1)
    if bool((counts == 0).any()):
        keep = torch.where(counts == 0, real, keep)  # only special tokens: fall back to all
        counts = keep.sum(-1, keepdim=True)
    # masked_fill, not multiply: padded positions may hold NaN under some attention kernels.
    summed = hidden.float().masked_fill(~keep[..., None], 0.0).sum(-2)
    return summed / counts.float()


def tokenize(tokenizer: Any, texts: Sequence[str], device: torch.device | str = "cpu") -> dict:
    """Tokenise words alone (special tokens added as the model expects), padded, with masks."""
    enc = tokenizer(
        list(texts),
        padding=True,
        return_tensors="pt",
        return_special_tokens_mask=True,
        return_attention_mask=True,
    )
    return {
        k: v.to(device)
        for k, v in enc.items()
        if k in ("input_ids", "attention_mask", "special_tokens_mask")
    }


def pooled(
    model: torch.nn.Module,
    batch: dict,
    layers: Sequence[int],
    *,
    num_layers: int,
    pooling: str = "mean",
) -> torch.Tensor:
    """L2-normalised pooled vectors ``(L, B, D)`` for one tokenised batch (keeps the graph)."""
    states = hidden_states(
        model, batch["input_ids"], batch["attention_mask"], layers, num_layers=num_layers
    )
    stacked = torch.stack([states[layer] for layer in layers])  # (L, B, T, D)
    vectors = pool(stacked, batch["attention_mask"], batch["special_tokens_mask"], pooling)
    return torch.nn.functional.normalize(vectors, dim=-1)  # (L, B, D)


def pooled_via_full_forward(
    model: torch.nn.Module,
    batch: dict,
    layers: Sequence[int],
    *,
    pooling: str = "mean",
) -> torch.Tensor:
    """The paper's way: the whole model, LM head included, with ``output_hidden_states``.

    Gives the same vectors as :func:`pooled` (whose pass stops at the deepest layer it needs and
    skips the LM head); kept as the reference for tests and benchmarks.
    """
    position_ids = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    stacked = torch.stack([out.hidden_states[layer] for layer in layers])  # (L, B, T, D)
    vectors = pool(stacked, batch["attention_mask"], batch["special_tokens_mask"], pooling)
    return torch.nn.functional.normalize(vectors, dim=-1)  # (L, B, D)


def check_texts(texts: Sequence[str]) -> None:
    """Raise TLIError when there is no string, or one is empty or whitespace-only."""
    if not texts:
        raise TLIError("no strings to embed")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise TLIError(f"string {i + 1} is empty or whitespace-only")


def embed_strings(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    num_layers: int,
    pooling: str = "mean",
    batch_size: int = 64,
    progress: bool | None = None,
) -> torch.Tensor:
    """L2-normalised pooled vectors ``(L, B, D)`` (float32, CPU) for many strings.

    Strings are sorted by token count into batches to limit padding; the result is in input
    order. One forward pass per batch yields every requested layer.
    """
    check_texts(texts)
    if batch_size < 1:
        raise TLIError(f"batch size must be >= 1, got {batch_size}")
    check_one_of("pooling", pooling, POOLINGS)
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    out: torch.Tensor | None = None
    starts = range(0, len(order), batch_size)
    show = progress if progress is not None else len(order) > 8 * batch_size
    with torch.inference_mode():
        for start in tqdm(
            starts, desc="embedding", unit="batch", disable=None if show else True, leave=False
        ):
            idx = order[start : start + batch_size]
            batch = tokenize(tokenizer, [texts[i] for i in idx], device)
            vectors = pooled(model, batch, layers, num_layers=num_layers, pooling=pooling)
            if out is None:
                out = torch.empty(len(layers), len(texts), vectors.shape[-1])
            out[:, idx] = vectors.float().cpu()
    assert out is not None
    return out


@dataclass(frozen=True)
class Embedding:
    """Pooled vectors of strings at layers, with what made them: enough to reuse them safely.

    A stage that needs the same strings embedded by the same model object, at the same layers,
    with the same pooling and batch size (so the same padding), gets bit-identical vectors from
    :func:`embed_strings`; :meth:`matches` says when it can take these instead.

    Attributes:
        model: The module that embedded them (compared by identity).
        texts: The strings, in the order of the vectors' second axis.
        layers: The layer of each row of the first axis.
        pooling: The pooling.
        batch_size: Strings per forward pass.
        vectors: ``(L, S, D)`` float32 on the CPU.
    """

    model: Any = field(repr=False)
    texts: tuple[str, ...]
    layers: tuple[int, ...]
    pooling: str
    batch_size: int
    vectors: torch.Tensor = field(repr=False)

    def matches(
        self,
        model: Any,
        texts: Sequence[str],
        layers: Sequence[int],
        pooling: str,
        batch_size: int,
    ) -> bool:
        """Whether :func:`embed_strings` with these arguments would give :attr:`vectors`."""
        return (
            self.model is model
            and self.texts == tuple(texts)
            and self.layers == tuple(layers)
            and self.pooling == pooling
            and self.batch_size == batch_size
        )


def embed(
    loaded: Any, texts: Sequence[str], layers: Sequence[int] | str, **kwargs: Any
) -> torch.Tensor:
    """:func:`embed_strings` for a :class:`tli.models.LoadedModel`; layers may be a spec."""
    if isinstance(layers, str):
        layers = parse_layers(layers, loaded.num_layers)
    return embed_strings(
        loaded.model, loaded.tokenizer, texts, layers, num_layers=loaded.num_layers, **kwargs
    )


# --- command line -------------------------------------------------------------------------


