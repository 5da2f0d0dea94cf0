import pytest
import torch

from tli.embed import POOLINGS, embed_strings, hidden_states, parse_layers, pool, tokenize
from tli.errors import TLIError
from tli.models import ModelConfig, load_model

from conftest import tiny_model, tiny_tokenizer

WORDS = ["mtoto", "child", "habari za asubuhi", "good morning", "a", "kitabu", "book", "ndiyo"]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_batched_equals_one_at_a_time(model_type, padding_side, pooling):
    model = tiny_model(model_type, layers=3)
    tok = tiny_tokenizer(padding_side)
    layers = [0, 1, 2, 3]
    batched = embed_strings(model, tok, WORDS, layers, num_layers=3, pooling=pooling, batch_size=8)
    assert batched.shape == (4, len(WORDS), 32)
    for i, word in enumerate(WORDS):
        alone = embed_strings(model, tok, [word], layers, num_layers=3, pooling=pooling)
        assert (batched[:, i] - alone[:, 0]).abs().max() <= 1e-5
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(4, len(WORDS)))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_layer_indices_match_output_hidden_states(model_type):
    model = tiny_model(model_type, layers=3)
    batch = tokenize(tiny_tokenizer("right"), WORDS[:3])
    with torch.no_grad():
        ref = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
        got = hidden_states(
            model, batch["input_ids"], batch["attention_mask"], [0, 1, 2, 3], num_layers=3
        )
    assert len(ref) == 4
    for layer in range(4):  # right padding: real tokens sit at positions 0.., as in ref
        mask = batch["attention_mask"].bool()
        torch.testing.assert_close(got[layer][mask], ref[layer][mask])


def test_blocks_above_the_deepest_layer_do_not_run():
    model = tiny_model("llama", layers=4)
    ran = []
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda *_a, i=i: ran.append(i))
    embed_strings(model, tiny_tokenizer(), WORDS, [0, 2], num_layers=4)
    assert set(ran) == {0, 1}
    ran.clear()
    embed_strings(model, tiny_tokenizer(), WORDS, [0], num_layers=4)
    assert ran == []


def test_lm_head_is_never_computed():
    model = tiny_model("llama", layers=2)
    model.lm_head.register_forward_hook(lambda *_: pytest.fail("LM head ran"))
    embed_strings(model, tiny_tokenizer(), WORDS, [0, 2], num_layers=2)


def test_pooling_modes_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # (B, T, D)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])  # left-padded row 0, right-padded row 1
    special = torch.tensor([[1, 1, 0], [1, 0, 1]])  # pad and BOS are special
    torch.testing.assert_close(
        pool(hidden, mask, special, "mean"), torch.tensor([[4.0, 5], [8, 9]])
    )
    torch.testing.assert_close(
        pool(hidden, mask, special, "mean_all"), torch.tensor([[3.0, 4], [7, 8]])
    )
    torch.testing.assert_close(
        pool(hidden, mask, special, "last"), torch.tensor([[4.0, 5], [8, 9]])
    )
    layered = torch.stack([hidden, 2 * hidden])  # (L, B, T, D)
    torch.testing.assert_close(
        pool(layered, mask, special, "last")[1], 2 * torch.tensor([[4.0, 5], [8, 9]])
    )


def test_parse_layers():
    assert parse_layers("0,2,final", 18) == [0, 2, 18]
    assert parse_layers("all", 3) == [0, 1, 2, 3]
    assert parse_layers("1-3", 5) == [1, 2, 3]
    assert parse_layers([2, "final", 2], 4) == [2, 4]
    for bad in ["19", "-1", "x", "", "3-99"]:
        with pytest.raises(TLIError):
            parse_layers(bad, 18)


def test_bad_strings_are_errors():
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    for texts in [[], ["ok", "  "], [""]]:
        with pytest.raises(TLIError):
            embed_strings(model, tok, texts, [0], num_layers=2)


def test_max_layer_model_matches_full_model(tiny_model_dir):
    full = load_model(ModelConfig(name=str(tiny_model_dir)))
    cut = load_model(ModelConfig(name=str(tiny_model_dir)), max_layer=2)
    assert full.depth == 4 and full.num_layers == 4 and not full.truncated
    assert cut.depth == 2 and cut.num_layers == 4 and cut.truncated and cut.max_layer == 2
    layers = [0, 1, 2]
    a = embed_strings(full.model, full.tokenizer, WORDS, layers, num_layers=4)
    b = embed_strings(cut.model, cut.tokenizer, WORDS, layers, num_layers=4)
    assert (a - b).abs().max() <= 1e-5
    # Only the embeddings, two blocks and the (small) norm/head are built.
    names = {n for n, _ in cut.model.named_parameters()}
    assert not any(".layers.2." in n or ".layers.3." in n for n in names)
    with pytest.raises(TLIError, match="holds 2"):
        embed_strings(cut.model, cut.tokenizer, WORDS, [3], num_layers=4)
    with pytest.raises(TLIError, match="max_layer"):
        load_model(ModelConfig(name=str(tiny_model_dir)), max_layer=5)
