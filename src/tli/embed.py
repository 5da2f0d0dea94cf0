"""Pooled, L2-normalised vectors for many strings at many layers, in one pass per batch.

The forward pass goes through the decoder only (never the LM head) and stops after the
deepest block that a requested layer needs. Layer indices follow ``output_hidden_states``
(DESIGN.md, fact 3): 0 = input embeddings, i = output of block i-1, N = final (after the norm).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from tli import surgery
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
    if pooling not in POOLINGS:
        raise TLIError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
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


def _check_texts(texts: Sequence[str]) -> None:
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
    _check_texts(texts)
    if batch_size < 1:
        raise TLIError(f"batch size must be >= 1, got {batch_size}")
    if pooling not in POOLINGS:
        raise TLIError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tli embed``."""
    p = sub.add_parser(
        "embed",
        help="pooled, normalised vectors of words at chosen layers",
        description="Embed words (one pass per batch, all requested layers at once) and write "
        "them to a safetensors file as a (L, B, D) tensor.",
    )
    p.add_argument("words", nargs="*", metavar="WORD", help="strings to embed")
    p.add_argument("--file", type=Path, help="read strings from this file, one per line")
    p.add_argument("--model", default="gemma-3-270m", help="model name, .gguf, dir or hub id")
    p.add_argument("--layers", default="all", help="e.g. 0,2,final or 0-5 or all (default)")
    p.add_argument("--pooling", default="mean", choices=POOLINGS, help="default: mean")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 4-bit (CUDA, bitsandbytes)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out", type=Path, default=Path("vectors.safetensors"))
    p.set_defaults(func=_run)


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TLIError(f"{path}: no such file") from None
    except OSError as err:
        raise TLIError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise TLIError(f"{path}: cannot read: not UTF-8 (at byte offset {err.start})") from None
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise TLIError(f"{path}: line {i}: empty or whitespace-only string")
    return [line.strip() for line in lines]


def _run(args: argparse.Namespace) -> int:
    from tli.io import atomic_write_safetensors, check_out_file
    from tli.models import ModelConfig, load_model

    texts = list(args.words) + (_read_lines(args.file) if args.file else [])
    _check_texts(texts)
    if args.batch_size < 1:
        raise TLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_out_file(args.out)  # before any model is loaded
    cfg = ModelConfig(
        name=args.model,
        dtype=args.dtype,
        device=args.device,
        load_in_4bit=args.load_in_4bit,
        trust_remote_code=args.trust_remote_code,
    )
    from tli.models import load_config

    _, config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    n = surgery.num_layers(config)
    layers = parse_layers(args.layers, n)
    needs_full = n in layers
    loaded = load_model(cfg, max_layer=None if needs_full else max(layers))
    vectors = embed(loaded, texts, layers, pooling=args.pooling, batch_size=args.batch_size)
    atomic_write_safetensors(
        args.out,
        {"vectors": vectors.contiguous()},
        metadata={
            "model": args.model,
            "layers": ",".join(map(str, layers)),
            "pooling": args.pooling,
            "texts": "\n".join(texts),
        },
    )
    print(
        f"vectors (L={len(layers)}, B={len(texts)}, D={vectors.shape[-1]}) "
        f"at layers {','.join(map(str, layers))} -> {args.out}"
    )
    sys.stdout.flush()
    return 0
