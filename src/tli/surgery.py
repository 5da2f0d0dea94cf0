"""The only module that knows where an architecture keeps its parts.

Every other module asks here for the decoder (the transformer without its LM head), its
blocks, the final norm and the LM head, so a new architecture is supported by one entry in
:data:`LAYOUTS` and one tiny-model test (as tuned-lens ``model_surgery.py`` does).

Layer indices follow ``output_hidden_states`` (docs/design.md, fact 3): index 0 is the input of
block 0 (the embeddings, scaled where the architecture scales them), index ``i`` is the output
of block ``i - 1``, and index ``N`` ("final") is the output of the last block after the final norm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tli.errors import TLIError


@dataclass(frozen=True)
class Layout:
    """Attribute paths of one architecture family, relative to the *ForCausalLM model."""

    decoder: str  # the transformer without its LM head
    blocks: str  # relative to the decoder
    final_norm: str  # relative to the decoder
    lm_head: str  # relative to the causal-LM model
    num_layers_key: str = "num_hidden_layers"
    attention_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # Whether the decoder adds nothing between its embeddings and block 0 that depends on
    # position, so block K can be fed cached states (see :func:`start_at_block`).
    prefix_cache: bool = True


_LLAMA_LIKE = Layout(decoder="model", blocks="layers", final_norm="norm", lm_head="lm_head")

#: model_type -> layout. Llama-3, Mistral, Qwen2 and the Gemma family share the Llama layout.
LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": Layout(
        decoder="transformer",
        blocks="h",
        final_norm="ln_f",
        lm_head="lm_head",
        num_layers_key="n_layer",
        attention_modules=("c_attn",),
        prefix_cache=False,  # adds learned position embeddings to the embeddings itself
    ),
}


def _get(obj: object, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def layout(model_or_config: object) -> Layout:
    """The layout of a model (or config), or a TLIError naming the unsupported type."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise TLIError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type]


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal-LM model under a peft wrapper, if any."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (e.g. ``LlamaModel``)."""
    model = _unwrap(model)
    return _get(model, layout(model).decoder)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order."""
    model = _unwrap(model)
    return _get(decoder(model), layout(model).blocks)  # type: ignore[return-value]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block."""
    model = _unwrap(model)
    return _get(decoder(model), layout(model).final_norm)


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection to the vocabulary."""
    model = _unwrap(model)
    return _get(model, layout(model).lm_head)


def num_layers(config: object) -> int:
    """Number of decoder blocks that the config declares."""
    return int(getattr(config, layout(config).num_layers_key))


def hidden_size(model_or_config: object) -> int | None:
    """D, the width of the hidden states (``hidden_size``; GPT-2 calls it ``n_embd``)."""
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, "hidden_size", None)
    if value is None:
        value = getattr(config, "n_embd", None)
    return int(value) if isinstance(value, int) else None


def sliding_window(model_or_config: object) -> int | None:
    """The sliding attention window (Gemma 2/3, Mistral), or None for full attention."""
    config = getattr(model_or_config, "config", model_or_config)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def logit_softcap(model_or_config: object) -> float | None:
    """The final logit soft-capping value (Gemma 2/3: ``tanh(logits / c) * c``), or None."""
    config = getattr(_unwrap(model_or_config), "config", model_or_config)  # type: ignore[arg-type]
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if isinstance(cap, (int, float)) and cap > 0 else None


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module (GPT-2's Conv1D too), or None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nf") and hasattr(module, "weight"):  # transformers' Conv1D (GPT-2)
        return int(module.weight.shape[0]), int(module.nf)
    return None


def truncate_config(config: object, max_layer: int) -> object:
    """A copy of ``config`` with only ``max_layer`` blocks (per-layer lists cut to match)."""
    import copy

    n = num_layers(config)
    if not 1 <= max_layer <= n:
        raise TLIError(f"max_layer must be in 1..{n} for this model, got {max_layer}")
    config = copy.deepcopy(config)
    setattr(config, layout(config).num_layers_key, max_layer)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:max_layer]
    return config


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding (Gemma's scaled one included) of a causal LM, peft-wrapped or not."""
    return _unwrap(model).get_input_embeddings()


def has_lm_head(model: nn.Module) -> bool:
    """Whether the model holds its LM head (False when built by :func:`headless`)."""
    return not isinstance(lm_head(model), NoHead)


class NoHead(nn.Module):
    """Stands in for the LM head of a model built for hidden states only: no weights, no logits."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Raise: there are no logits to compute."""
        raise TLIError(
            "this model was built without its LM head (a depth-truncated load for hidden "
            "states): it gives hidden states, not logits"
        )


def float32_embedding_rows(model: nn.Module) -> None:
    """Make the token embedding return float32 rows while its table keeps its dtype.

    The rows equal those of a float32 copy of the table (a bf16 or fp16 value is exact in
    float32), including Gemma's scaling by ``embed_scale``, which the float32 table would apply
    in float32. peft's ``prepare_model_for_kbit_training`` gets the same rows by casting the
    whole table to float32 (2.1 GB for Llama-3-8B's 525 M entries, against 1.05 GB in bf16).
    Idempotent.
    """
    emb = input_embeddings(model)
    if getattr(emb, "_tli_float32_rows", False):
        return

    def rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        out = nn.functional.embedding(args[0], module.weight, module.padding_idx).float()
        scale = getattr(module, "embed_scale", None)  # Gemma's sqrt(D), as a buffer
        return out * scale.to(torch.float32) if isinstance(scale, torch.Tensor) else out

    if emb.weight.dtype != torch.float32:
        emb.register_forward_hook(rows)
    emb._tli_float32_rows = True


_HEADLESS: dict[type, type] = {}


def headless(cls: type) -> type:
    """A subclass of the causal-LM class ``cls`` whose instances have no LM head.

    ``from_pretrained`` on it builds the decoder only: the LM head is replaced by
    :class:`NoHead` as the model is built (on the meta device, before any weight is read), so
    an untied checkpoint's ``lm_head.weight`` is never read or allocated, and a tied one is
    not tied (``_tied_weights_keys = None``). Parameter names stay those of ``cls``, so peft
    adapters trained on it load onto the full model (``PeftModel.from_pretrained``).
    """
    if cls not in _HEADLESS:
        path = None
        for family, lay in LAYOUTS.items():
            if getattr(cls, "config_class", None) is not None and (
                getattr(cls.config_class, "model_type", None) == family
            ):
                path = lay.lm_head
        if path is None:
            raise TLIError(f"{cls.__name__}: no known LM head for a headless load")

        def __init__(self: nn.Module, config: object, *args: object, **kwargs: object) -> None:
            cls.__init__(self, config, *args, **kwargs)
            setattr(self, path, NoHead())

        _HEADLESS[cls] = type(
            cls.__name__,
            (cls,),
            {"__init__": __init__, "_tied_weights_keys": None, "__module__": cls.__module__},
        )
    return _HEADLESS[cls]


def lora_target_modules(model_or_config: object) -> tuple[str, ...]:
    """The attention projections the paper adapts (q_proj + v_proj; GPT-2 fuses them in c_attn)."""
    return layout(model_or_config).attention_modules


class _Skip(nn.Module):
    """Stands in for a decoder block whose output is supplied from a cache: returns its input."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


def check_prefix_cache(model_or_config: object) -> None:
    """Raise a TLIError when the architecture cannot resume a pass at a block from a cache."""
    config = getattr(model_or_config, "config", model_or_config)
    if not layout(config).prefix_cache:
        raise TLIError(
            f"the frozen-prefix activation cache does not support {config.model_type!r} (its "
            "decoder adds position embeddings before block 0); set prefix_cache = off"
        )


@contextmanager
def start_at_block(model: nn.Module, k: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the context, a decoder pass starts at block ``k`` from ``hidden`` (B, T, D).

    ``hidden`` is what enters block ``k`` (layer index ``k``: the output of block ``k - 1``),
    e.g. computed once and cached. Blocks ``0..k-1`` are replaced by a pass-through and block
    ``k``'s input is swapped for ``hidden``; the decoder itself still builds the attention masks
    (causal, sliding window) and rotary position embeddings from the ``attention_mask`` and
    ``position_ids`` it is called with, so blocks ``>= k`` see exactly what a full pass gives
    them. The embedding lookup still runs (cheap); nothing below block ``k`` is differentiated.

    Raises:
        TLIError: The architecture is not supported (GPT-2), or ``k`` is out of range.
    """
    check_prefix_cache(model)
    stack = blocks(model)
    if not 0 <= k < len(stack):
        raise TLIError(f"start block must be in 0..{len(stack) - 1}, got {k}")
    saved = [stack[i] for i in range(k)]

    def swap(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = stack[k].register_forward_pre_hook(swap, with_kwargs=True)
    try:
        for i in range(k):
            stack[i] = _Skip()
        yield
    finally:
        for i, block in enumerate(saved):
            stack[i] = block
        handle.remove()
