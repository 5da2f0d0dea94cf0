"""The frozen-prefix activation cache (tli.cache) and the block runner it uses (tli.surgery)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tli import surgery
from tli.cache import PrefixCache, inexact_reason, store_key
from tli.embed import hidden_states, tokenize
from tli.errors import TLIError
from tli.models import LoadedModel
from tli.pairs import Pair
from tli.train import TrainConfig, train

from conftest import assert_one_line_error, tiny_model, tiny_tokenizer

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


def _train(tmp_path, name, model_type, *, seed=1, store=None, **kwargs):
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
    model = tiny_model(model_type, 4, seed=seed)
    loaded = LoadedModel(model, tiny_tokenizer("left"), "tiny", "tiny", num_layers=4)
    train(loaded, PAIRS, cfg, tmp_path / name, progress=False, prefix_cache_store=store)
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


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_cached_preservation_gives_the_same_adapter(tmp_path, model_type):
    """The preservation term's pass over running text starts at block K too: the same adapter
    as the uncached run, and blocks 0..K-1 run only while the frozen states are prepared."""
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\nwe walk to the market\nmtoto anacheza nje\n")
    # No LoRA dropout: with it the masks are the same but Adam turns float rounding in a
    # gradient element near zero into a step of up to lr (measured 2.5e-3 on one of 512).
    kw = dict(
        loss="info_nce", preserve_weight=5.0, preserve_texts=str(texts), preserve_batch=2,
        lora_dropout=0.0,
    )  # fmt: skip
    calls = []
    hook = torch.nn.Module.register_forward_hook  # count block-0 passes of the cached run
    model = tiny_model(model_type, 4, seed=1)
    handle = hook(surgery.blocks(model)[0], lambda *a: calls.append(1))
    cfg = TrainConfig(
        loss_layers=("final",), adapt_layers="2-3", epochs=2, batch_size=4, warmup_steps=2,
        lr=5e-3, save_every=0, prefix_cache="on", **kw,
    )  # fmt: skip
    loaded = LoadedModel(model, tiny_tokenizer("left"), "tiny", "tiny", num_layers=4)
    train(loaded, PAIRS, cfg, tmp_path / "cached", progress=False)
    handle.remove()
    cached = load_file(tmp_path / "cached" / "final" / "adapter_model.safetensors")
    plain = _train(tmp_path, "plain", model_type, prefix_cache="off", **kw)
    assert cached.keys() == plain.keys() and cached
    for key in cached:
        assert (cached[key] - plain[key]).abs().max() <= 1e-5, key
    # block 0 ran for the prefix cache (one pass over the words) and the frozen text states
    # (two batches of sentences), never in the 4 training steps
    assert 1 <= len(calls) <= 3, len(calls)


def test_cache_on_needs_a_frozen_prefix(tmp_path):
    cfg = TrainConfig(loss_layers=("final",), prefix_cache="on", epochs=1, save_every=0)
    loaded = LoadedModel(tiny_model("llama", 4), tiny_tokenizer(), "tiny", "tiny", num_layers=4)
    with pytest.raises(TLIError, match="prefix_cache = on needs"):
        train(loaded, PAIRS, cfg, tmp_path / "run", progress=False)


# --- precision: the cache is exact only in float32 ---------------------------------------------


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one mixed-precision setting per process: start and end without one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_cache_on_refuses_mixed_precision_in_one_line(run_cli, tmp_path):
    with pytest.raises(TLIError, match="exact only in float32") as err:
        TrainConfig(prefix_cache="on", mixed_precision="bf16")
    assert "\n" not in str(err.value)
    code, _, stderr = run_cli(
        "train", "--model", "nothing-loaded", "--layer", "2", "--prefix-cache", "on",
        "--mixed-precision", "fp16", "--out", tmp_path / "t",
    )  # fmt: skip
    assert_one_line_error(code, stderr, "prefix_cache = on with mixed_precision = fp16")
    assert not (tmp_path / "t").exists()


def test_cache_on_refuses_bf16_weights(tmp_path):
    cfg = TrainConfig(loss_layers=("final",), adapt_layers="2-3", prefix_cache="on", epochs=1)
    model = tiny_model("llama", 4).to(torch.bfloat16)
    assert inexact_reason(model, 2) == (
        "embeddings.weight is bfloat16 (the cache is exact only in float32)"
    )
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny", "tiny", num_layers=4)
    with pytest.raises(TLIError, match="prefix_cache = on: embeddings.weight is bfloat16"):
        train(loaded, PAIRS, cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_auto_trains_uncached_under_bf16_mixed_precision(tmp_path, fresh_accelerate):
    """Under bf16 the cache would not be exact, so ``auto`` trains without it: the adapter is
    bit for bit the one of ``prefix_cache = off``, and train.json says why the cache was off."""
    auto = _train(tmp_path, "auto", "llama", prefix_cache="auto", mixed_precision="bf16")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    off = _train(tmp_path, "off", "llama", prefix_cache="off", mixed_precision="bf16")
    assert auto.keys() == off.keys() and all(torch.equal(auto[k], off[k]) for k in auto)
    info = json.loads((tmp_path / "auto" / "train.json").read_text())
    assert info["prefix_cache"] == {
        "off": "mixed precision bf16 (the cache is exact only in float32)"
    }


# --- the store key: what a shared cache depends on ---------------------------------------------


def test_a_second_model_in_the_same_store_gets_its_own_cache(tmp_path):
    store = {}
    first = _train(tmp_path, "a", "llama", seed=1, store=store, prefix_cache="on")
    other = _train(tmp_path, "b", "llama", seed=2, store=store, prefix_cache="on")
    assert len(store) == 2  # same name "tiny", other weights: another key, another cache
    plain = _train(tmp_path, "b-plain", "llama", seed=2, prefix_cache="off")
    assert all((other[k] - plain[k]).abs().max() <= 1e-5 for k in other)
    assert any((other[k] - first[k]).abs().max() > 1e-3 for k in other)
    again = _train(tmp_path, "a-again", "llama", seed=1, store=store, prefix_cache="on")
    assert len(store) == 2  # the first model again: its cache is reused
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_store_key_reads_the_weights_below_k_only():
    tok = tiny_tokenizer()
    model = tiny_model("llama", 4, seed=3)
    key = store_key(model, tok, WORDS, 2, name="tiny")
    assert key == store_key(model, tok, list(reversed(WORDS)) + WORDS, 2, name="tiny")
    # the same prefix loaded to another depth (another loss layer) shares the key
    shallow = tiny_model("llama", 3, seed=4)
    shallow.load_state_dict(model.state_dict(), strict=False)
    assert store_key(shallow, tok, WORDS, 2, name="tiny") == key
    with torch.no_grad():
        surgery.blocks(model)[2].mlp.down_proj.weight.add_(1.0)  # at or above K: not read
        assert store_key(model, tok, WORDS, 2, name="tiny") == key
        surgery.blocks(model)[1].mlp.down_proj.weight.mul_(1.001)  # below K: read
        changed = store_key(model, tok, WORDS, 2, name="tiny")
        assert changed != key
        ids = {i for seq in tok(WORDS)["input_ids"] for i in seq}
        unused = next(i for i in range(len(tok)) if i not in ids)
        model.get_input_embeddings().weight[unused] += 1.0  # an embedding row no word reads
        assert store_key(model, tok, WORDS, 2, name="tiny") == changed
        model.get_input_embeddings().weight[min(ids)] += 1.0
        assert store_key(model, tok, WORDS, 2, name="tiny") != changed
    # the tokenizer, K, the words and the name are part of it too
    assert store_key(model, tiny_tokenizer(add_bos=False), WORDS, 2, name="tiny")[3] != key[3]
    assert store_key(model, tok, WORDS, 1, name="tiny")[4] == "k=1"
    assert store_key(model, tok, WORDS[:-1], 2, name="tiny")[5] != key[5]
    assert store_key(model, tok, WORDS, 2, name="other")[0] == "other"
