"""Real model geometries without downloads: their configs, and random checkpoints of them.

:data:`CONFIGS` holds the architecture facts of four 7-9 B models that the paper's setting
applies to (hidden size, MLP width, attention and key/value heads, head size, rope base,
vocabulary, depth, tied or untied LM head). :func:`write_checkpoint` writes a random-initialised
checkpoint of one of them as safetensors, shard by shard (one shard per block, one for the
embeddings, ...), so memory stays at about one shard. It holds only what a given load reads:
for a depth-truncated load at layer L, the embeddings, blocks ``0..L-1`` and the final norm.
``config.json`` describes the whole model, so a load with ``max_layer=L`` works and a full load
fails with the missing weights named: the proof that a truncated load reads nothing deeper.

Tests shrink the vocabulary, the depth and the MLP width (:func:`config` keyword arguments) and
keep the shapes that make an architecture what it is (hidden size, heads, GQA, head size);
``benchmarks/scale.py`` uses the real sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tli import surgery
from tli.errors import TLIError

#: Architecture facts, from each model's config.json on the Hugging Face hub:
#: meta-llama/Meta-Llama-3-8B, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B, google/gemma-2-9b.
#: Special-token ids are left out (the tokenizer of :func:`write_checkpoint` sets its own).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_hidden_layers": 32,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    "mistral-7b": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_hidden_layers": 28,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072,
        "use_sliding_window": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    "gemma-2-9b": {
        "model_type": "gemma2",
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "num_hidden_layers": 42,
        "vocab_size": 256000,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 8192,
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    },
}

#: Special tokens of :func:`tokenizer`, in id order.
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def config(
    name: str,
    *,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    intermediate_size: int | None = None,
) -> Any:
    """The transformers config of geometry ``name``, optionally shrunk (depth, vocab, MLP)."""
    from transformers import AutoConfig

    if name not in CONFIGS:
        raise TLIError(f"geometry {name!r} is unknown; known: {', '.join(CONFIGS)}")
    values = dict(CONFIGS[name])
    model_type = values.pop("model_type")
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    if intermediate_size is not None:
        values["intermediate_size"] = intermediate_size
    values.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(model_type, **values)


def tokenizer(pair_merges: bool = True) -> Any:
    """A byte-level BPE tokenizer that adds BOS; with ``pair_merges``, ASCII letter pairs merge.

    With the merges a lowercase word of n letters is about n/2 tokens ("mtoto": 3 + BOS), near
    what a 128k-vocabulary tokenizer gives Swahili words. Ids stay below 1,000, so it fits any
    vocabulary of :data:`CONFIGS` shrunk to 1,024 or more.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    if pair_merges:
        letters = "abcdefghijklmnopqrstuvwxyz"
        for a in letters:
            for b in letters:
                merges.append((a, b))
                vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>",
    )  # fmt: skip
    fast.padding_side = "right"
    return fast


def _parts(model: torch.nn.Module, max_layer: int | None, lm_head: bool) -> list[tuple[str, Any]]:
    """(shard name, module) for each shard: embeddings, kept blocks, final norm, LM head."""
    stack = surgery.blocks(model)
    keep = len(stack) if max_layer is None else max(max_layer, 1)
    parts: list[tuple[str, Any]] = [("embeddings", surgery.input_embeddings(model))]
    parts += [(f"block-{i:03d}", stack[i]) for i in range(keep)]
    parts.append(("final-norm", surgery.final_norm(model)))
    if lm_head:
        parts.append(("lm-head", surgery.lm_head(model)))
    return parts


def write_checkpoint(
    out_dir: str | Path,
    model_config: Any,
    *,
    max_layer: int | None = None,
    lm_head: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """Write a random-initialised checkpoint of ``model_config``, shard by shard; return its dir.

    Each part is initialised by the model class's own ``_init_weights`` (normal with the
    config's ``initializer_range``; norms as the architecture starts them), cast to ``dtype``,
    written to its own ``.safetensors`` shard and freed before the next, so memory stays at
    about one shard (the embeddings, the largest). ``model.safetensors.index.json`` maps every
    weight to its shard, as ``save_pretrained`` does.

    Args:
        out_dir: the directory to write (created).
        model_config: a transformers config, e.g. from :func:`config`; written whole to
            ``config.json``.
        max_layer: write only what a load with ``max_layer=L`` reads: the embeddings, blocks
            ``0..L-1`` and the final norm. None: every block.
        lm_head: write the LM head (default: for a full checkpoint of an untied model). A tied
            model's head is its embedding matrix and is never written twice.
        dtype: the weights' dtype on disk.
        seed: the random seed.
        with_tokenizer: also save :func:`tokenizer` there.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    head = (max_layer is None and not tied) if lm_head is None else (lm_head and not tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    prefixes = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    try:
        for shard, module in _parts(model, max_layer, head):
            module.to_empty(device="cpu")
            with torch.no_grad():
                for sub in module.modules():
                    model._init_weights(sub)
            prefix = prefixes[id(module)]
            tensors = {
                f"{prefix}.{name}": p.detach().to(dtype).contiguous()
                for name, p in module.named_parameters()
            }
            file = f"model-{shard}.safetensors"
            save_file(tensors, str(out / file), metadata={"format": "pt"})
            for key, tensor in tensors.items():
                weight_map[key] = file
                total += tensor.numel() * tensor.element_size()
            del tensors
            module.to("meta")  # frees this shard before the next is made
    finally:
        torch.random.set_rng_state(gen_state)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model_config.save_pretrained(out)
    if with_tokenizer:
        tokenizer().save_pretrained(out)
    return out


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weights in a checkpoint directory (its shards' ``total_size``)."""
    index = json.loads((Path(path) / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])
