"""Generation (``tli.generate``): left padding, batching, the shared-prefix cache."""

import pytest

from tli.generate import generate
from tli.models import ModelConfig, load_model
from tli.probe import ProbeConfig, extract_answer, score_items

from conftest import PROBE_SETS, tiny_model, tiny_tokenizer

SETS = PROBE_SETS


def test_generate_pads_left_and_batches_like_single_prompts(model_dir):
    loaded = load_model(ModelConfig(str(model_dir)))
    tok = loaded.tokenizer
    tok.padding_side = "right"  # generate must pad left whatever the tokenizer says
    prompts = ["Swahili: mtoto\nEnglish:", "a", "Swahili: chakula cha jioni\nEnglish:", "mti"]
    batched = generate(loaded.model, tok, prompts, max_new_tokens=5, batch_size=4)
    single = [generate(loaded.model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"
    # Stopping at the first line changes no answer.
    short = generate(loaded.model, tok, prompts, max_new_tokens=5, first_line=True)
    assert [extract_answer(s) for s in short] == [extract_answer(b) for b in batched]


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {}),
        ("gemma3_text", {}),  # window 16 < prompt: batches of one length, no padding
        ("gemma3_text", {"sliding_window": 512}),  # padding between prefix and rest
    ],
)
def test_shared_prefix_cache_gives_the_plain_outputs(model_type, overrides):
    model = tiny_model(model_type, layers=2, max_position_embeddings=512, **overrides)
    tok = tiny_tokenizer("left")
    items = score_items(SETS, ProbeConfig(shots=3))
    prompts = [i["prompt"] for i in items]
    chars = [i["prefix_chars"] for i in items]
    # Per direction: the first 3 pairs of the order, or (for each of those 3) a variant.
    assert len({p[:k] for p, k in zip(prompts, chars, strict=True)}) <= 2 * (1 + 3)
    plain = generate(model, tok, prompts, max_new_tokens=4, batch_size=8)
    cached = generate(model, tok, prompts, max_new_tokens=4, batch_size=8, prefix_chars=chars)
    assert cached == plain
