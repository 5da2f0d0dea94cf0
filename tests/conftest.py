"""Tiny random models and tokenizers built in memory: no network, no GPU."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

#: Swahili-English pairs for tiny training runs (tests of train and sweep).
WORDS = [
    ("mtoto", "child"),
    ("kitabu", "book"),
    ("maji", "water"),
    ("nyumba", "house"),
    ("mbwa", "dog"),
    ("paka", "cat"),
    ("chakula", "food"),
    ("mti", "tree"),
    ("jua", "sun"),
    ("mwezi", "moon"),
    ("bahari", "sea"),
    ("mkate", "bread"),
]

#: model_type -> config kwargs for a tiny random model of that architecture.
TINY = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": None},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16},
    "gpt2": {},
}


def tiny_tokenizer(padding_side: str = "left", add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (any text encodes) with pad/bos/eos and optional BOS."""
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_map):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    fast.padding_side = padding_side
    return fast


def tiny_config(model_type: str = "llama", layers: int = 4, **overrides):
    kwargs = dict(TINY[model_type])
    if model_type == "gpt2":
        kwargs.update(n_embd=32, n_layer=layers, n_head=4, n_positions=64, vocab_size=300)
    else:
        kwargs.update(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", layers: int = 4, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers, **overrides))
    return model.eval()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's cache, except the embedded-model tests (own fixture)."""
    monkeypatch.setenv("TLI_CACHE", str(tmp_path_factory.getbasetemp() / "tli-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=4).save_pretrained(path)
    tiny_tokenizer("left").save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _reset_tli_logger():
    """cli.main() points the tli logger at the stderr of its time; undo that after each test."""
    import logging

    yield
    logger = logging.getLogger("tli")
    logger.handlers.clear()
    logger.propagate = True
