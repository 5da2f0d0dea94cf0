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


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("llama", {}), ("gemma3_text", {"final_logit_softcapping": 3.0})],  # a cap that bites
)
def test_continuation_scores_match_full_sequences(model_type, overrides):
    """The cached, batched scoring (ported from scripts/lm_ceiling.py) equals scoring each whole
    sequence on its own, the LM head's soft-capping included."""
    import torch

    from tli.generate import continuation_scores

    model, tok = tiny_model(model_type, **overrides), tiny_tokenizer()
    prefix, cands = "sw: jicho\nen:", [" eye", " a hand", " ox"]
    with torch.no_grad():
        got = continuation_scores(model, tok, prefix, cands, batch_size=2)  # two batches
        want = []
        n = len(tok(prefix).input_ids)
        for c in cands:
            ids = tok(prefix + c, return_tensors="pt").input_ids
            logp = model(ids).logits.float().log_softmax(-1)[0, n - 1 : -1]
            want.append(logp.gather(1, ids[0, n:, None]).mean())
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no tokens"):
        continuation_scores(model, tok, prefix, [""])
