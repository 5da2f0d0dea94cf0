"""The frozen-prefix activation cache (tli.cache) and the block runner it uses (tli.surgery)."""

import pytest
import torch
from safetensors.torch import load_file

from tli import surgery
from tli.cache import PrefixCache
from tli.embed import hidden_states, tokenize
from tli.errors import TLIError
from tli.models import LoadedModel
from tli.pairs import Pair
from tli.train import TrainConfig, train

from conftest import tiny_model, tiny_tokenizer

WORDS = ["mtoto", "child", "kitabu", "book", "maji", "water", "nyumba ndogo", "small house"]
PAIRS = [Pair(s, t) for s, t in zip(WORDS[::2], WORDS[1::2], strict=True)] + [
    Pair("mbwa", "dog"),
    Pair("paka", "cat"),
    Pair("bahari", "sea", alternatives=("ocean",)),
    Pair("mkate", "bread"),
]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2", "mistral"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_start_at_block_gives_the_full_pass(model_type, padding_side):
    # gemma3_text with sliding_window 16 > T here; a window of 3 exercises the sliding mask.
    extra = {"sliding_window": 3} if model_type == "gemma3_text" else {}
    model = tiny_model(model_type, layers=4, **extra)
    tok = tiny_tokenizer(padding_side)
    enc = tokenize(tok, WORDS)
    with torch.no_grad():
        full = hidden_states(
            model, enc["input_ids"], enc["attention_mask"], [2, 3, 4], num_layers=4
        )
        cache = PrefixCache.build(model, tok, WORDS, 2, num_layers=4)
        with surgery.start_at_block(model, 2, cache.batch(WORDS, enc)):
            resumed = hidden_states(
                model, enc["input_ids"], enc["attention_mask"], [3, 4], num_layers=4
            )
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(cache.batch(WORDS, enc)[mask], full[2][mask])
    for layer in (3, 4):
        torch.testing.assert_close(resumed[layer][mask], full[layer][mask], atol=1e-5, rtol=1e-5)
    # The blocks are back in place afterwards.
    assert not any(isinstance(b, surgery._Skip) for b in surgery.blocks(model))


def test_gpt2_is_declared_unsupported():
    model = tiny_model("gpt2", layers=3)
    with pytest.raises(TLIError, match="does not support 'gpt2'"):
        PrefixCache.build(model, tiny_tokenizer(), WORDS, 1, num_layers=3)
    with pytest.raises(TLIError, match="prefix_cache = off"):
        with surgery.start_at_block(model, 1, torch.zeros(1, 2, 32)):
            pass


def _train(tmp_path, name, model_type, **kwargs):
    cfg = TrainConfig(
        loss_layers=("final",),
        adapt_layers="2-3",
        epochs=2,
        batch_size=4,
        warmup_steps=2,
        lr=5e-3,
        save_every=0,
        **kwargs,
    )
    model = tiny_model(model_type, 4, seed=1)
    loaded = LoadedModel(model, tiny_tokenizer("left"), "tiny", "tiny", num_layers=4)
    train(loaded, PAIRS, cfg, tmp_path / name, progress=False)
    return load_file(tmp_path / name / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_cached_training_gives_the_same_adapter(tmp_path, model_type, dropout):
    """Cached (blocks 2-3 only) vs. uncached (all blocks) training: the same adapter, <= 1e-5.

    With LoRA dropout the masks are drawn in the same order on both paths (only the adapted
    blocks draw any), so the adapters agree too.
    """
    kw = dict(lora_dropout=dropout, loss="info_nce", center="running", uniformity_weight=0.1)
    cached = _train(tmp_path, "cached", model_type, prefix_cache="on", **kw)
    plain = _train(tmp_path, "plain", model_type, prefix_cache="off", **kw)
    assert cached.keys() == plain.keys() and cached
    assert all(".layers.2." in k or ".layers.3." in k for k in cached)
    for key in cached:
        assert (cached[key] - plain[key]).abs().max() <= 1e-5, key
    assert any(w.abs().sum() > 0 for k, w in cached.items() if "lora_B" in k)


def test_cache_on_needs_a_frozen_prefix(tmp_path):
    cfg = TrainConfig(loss_layers=("final",), prefix_cache="on", epochs=1, save_every=0)
    loaded = LoadedModel(tiny_model("llama", 4), tiny_tokenizer(), "tiny", "tiny", num_layers=4)
    with pytest.raises(TLIError, match="prefix_cache = on needs"):
        train(loaded, PAIRS, cfg, tmp_path / "run", progress=False)
