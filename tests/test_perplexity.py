"""tli.perplexity: the bundled everyday texts, per-sentence NLL, perplexity and its change."""

from __future__ import annotations

import math
import re
import unicodedata

import numpy as np
import pytest
import torch

from tli.errors import TLIError
from tli.pairs import load_lexicon
from tli.perplexity import (
    LANGUAGES,
    format_change,
    load_texts,
    perplexity,
    perplexity_change,
    sentence_nll,
)

from conftest import tiny_model, tiny_tokenizer

#: Sentences of different lengths (bytes are tokens of the tiny tokenizer), so batches pad.
TEXTS = [
    "Mama anapika chakula.",
    "Hi.",
    "The bus leaves at nine o'clock.",
    "Watoto wanacheza nje ya nyumba yetu leo.",
    "Ndiyo",
    "Is it raining?",
    "Kuna upepo mkali.",
]


def one_by_one(model, tok, texts):
    pairs = [sentence_nll(model, tok, [t], batch_size=1) for t in texts]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


# --- the bundled texts -------------------------------------------------------------------------


def test_texts_per_language():
    texts = load_texts()
    assert set(texts) == set(LANGUAGES) == {"sw", "en"}
    for code, lines in texts.items():
        assert len(lines) >= 100, code
        assert len(set(lines)) == len(lines), code
        for line in lines:
            assert line and line == line.strip(), (code, line)
            assert unicodedata.normalize("NFC", line) == line, (code, line)
            assert 5 <= len(line.split()) <= 20, (code, line)
            assert line[-1] in ".?!", (code, line)


def test_texts_files_are_pure():
    """No header, no blank line, every line ends in a newline, UTF-8 without BOM, no CR."""
    from importlib import resources

    for code in LANGUAGES:
        data = resources.files("tli").joinpath(f"data/texts_{code}.txt").read_bytes()
        assert not data.startswith(b"\xef\xbb\xbf") and b"\r" not in data, code
        assert data.endswith(b"\n") and not data.endswith(b"\n\n"), code
        assert data.decode("utf-8").splitlines() == load_texts()[code]


def test_texts_are_not_lexicon_words():
    lexicon = load_lexicon()
    words = {w.casefold() for p in lexicon for w in (p.source, *p.targets)}
    for code, lines in load_texts().items():
        for line in lines:
            bare = re.sub(r"[.?!,]+$", "", line).strip().casefold()
            assert bare not in words, (code, line)


def test_languages_differ():
    """The two sets are not one text twice (a mix-up of files would pass the other tests)."""
    texts = load_texts()
    assert not set(texts["sw"]) & set(texts["en"])
    assert sum(" the " in f" {t.lower()} " for t in texts["en"]) > 30
    assert sum(" ya " in f" {t.lower()} " for t in texts["sw"]) > 10


# --- sentence NLL ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_batched_equals_one_at_a_time(side, model_type):
    model = tiny_model(model_type)
    tok = tiny_tokenizer(side)
    nll, counts = sentence_nll(model, tok, TEXTS, batch_size=4)
    ref_nll, ref_counts = one_by_one(model, tok, TEXTS)
    assert nll.dtype == np.float64 and counts.dtype == np.int64
    assert nll.shape == counts.shape == (len(TEXTS),)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)


def test_counts_skip_first_token_and_padding():
    tok = tiny_tokenizer("left")  # adds <bos>: every byte of the text is a target
    _, counts = sentence_nll(tiny_model(), tok, TEXTS, batch_size=3)
    assert counts.tolist() == [len(t.encode()) for t in TEXTS]
    tok = tiny_tokenizer("right", add_bos=False)  # no <bos>: the first byte is only context
    _, counts = sentence_nll(tiny_model(), tok, TEXTS, batch_size=3)
    assert counts.tolist() == [len(t.encode()) - 1 for t in TEXTS]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_matches_models_own_loss(model_type):
    """A slow reference: the model's own ``labels=`` loss (mean over shifted targets)."""
    model, tok = tiny_model(model_type), tiny_tokenizer("left")
    for text in TEXTS[:3]:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        nll, counts = sentence_nll(model, tok, [text])
        assert counts[0] == ids.shape[1] - 1
        assert nll[0] == pytest.approx(loss * (ids.shape[1] - 1), rel=1e-5)


def test_deterministic_and_modes_restored():
    model, tok = tiny_model(), tiny_tokenizer("left")
    model.train()  # dropout would be on; sentence_nll switches it off and back
    model.model.layers[0].eval()
    first = sentence_nll(model, tok, TEXTS, batch_size=2)
    again = sentence_nll(model, tok, TEXTS, batch_size=5)
    np.testing.assert_allclose(first[0], again[0], rtol=1e-5)
    np.testing.assert_array_equal(first[0], sentence_nll(model, tok, TEXTS, batch_size=2)[0])
    assert model.training and model.model.training and model.lm_head.training
    assert not model.model.layers[0].training


def test_peft_with_zero_lora_b_gives_base_nll():
    from peft import LoraConfig, get_peft_model

    from tli.adapters import quiet_peft

    tok = tiny_tokenizer("left")
    base = sentence_nll(tiny_model(), tok, TEXTS, batch_size=3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    with quiet_peft():
        wrapped = get_peft_model(tiny_model(), cfg)  # the same seed: the same base weights
    lora_b = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert lora_b and all(bool((p == 0).all()) for p in lora_b)
    tuned = sentence_nll(wrapped, tok, TEXTS, batch_size=3)
    np.testing.assert_array_equal(tuned[0], base[0])
    np.testing.assert_array_equal(tuned[1], base[1])
    with torch.no_grad():  # a nonzero B changes the NLL: the adapter is really in the pass
        for p in lora_b:
            p.fill_(0.05)
    assert not np.allclose(sentence_nll(wrapped, tok, TEXTS, batch_size=3)[0], base[0])
    with wrapped.disable_adapter():  # the base model's score, as docs/perplexity.md says
        np.testing.assert_array_equal(sentence_nll(wrapped, tok, TEXTS, batch_size=3)[0], base[0])


@pytest.mark.parametrize(
    "texts, batch_size, needle",
    [
        ([], 4, "no texts"),
        (["fine.", " "], 4, "text 2 is empty"),
        (["fine."], 0, "batch size"),
    ],
)
def test_bad_input(texts, batch_size, needle):
    with pytest.raises(TLIError, match=needle):
        sentence_nll(tiny_model(), tiny_tokenizer(), texts, batch_size=batch_size)


def test_single_token_text_is_an_error():
    with pytest.raises(TLIError, match="text 1 has 1 token"):
        sentence_nll(tiny_model(), tiny_tokenizer(add_bos=False), ["a"])


# --- perplexity and its change ----------------------------------------------------------------


def test_perplexity_pools_tokens():
    assert perplexity([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(6.0 / 4.0))
    assert perplexity(np.log([5.0]) * 7, [7]) == pytest.approx(5.0)


def random_nll(n=150, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 30, size=n)
    return counts * rng.uniform(2.0, 6.0, size=n), counts


def test_identical_models_change_nothing():
    nll, counts = random_nll()
    result = perplexity_change((nll, counts), (nll.copy(), counts.copy()), n_boot=500, seed=3)
    assert result["change"] == result["lo"] == result["hi"] == 0.0
    assert result["base"] == result["tuned"] == perplexity(nll, counts)
    assert result["n_sentences"] == 150 and result["n_tokens"] == int(counts.sum())
    assert format_change("Swahili", result) == "Swahili perplexity +0.0% [+0.0, +0.0]"


def test_constant_shift_gives_known_ratio():
    nll, counts = random_nll()
    shift = 0.03  # nats per token
    result = perplexity_change((nll, counts), (nll + shift * counts, counts), n_boot=200)
    expected = math.exp(shift) - 1
    for key in ("change", "lo", "hi"):
        assert result[key] == pytest.approx(expected, rel=1e-9)
    assert result["tuned"] / result["base"] == pytest.approx(math.exp(shift), rel=1e-12)
    assert format_change("English", result) == "English perplexity +3.0% [+3.0, +3.0]"


def test_interval_is_paired_seeded_and_covers_change():
    nll, counts = random_nll()
    rng = np.random.default_rng(1)
    tuned = nll + counts * (0.02 + rng.normal(0, 0.05, size=nll.size))
    a = perplexity_change((nll, counts), (tuned, counts), n_boot=400, seed=7, level=0.9)
    b = perplexity_change((nll, counts), (tuned, counts), n_boot=400, seed=7, level=0.9)
    c = perplexity_change((nll, counts), (tuned, counts), n_boot=400, seed=8, level=0.9)
    assert a == b and a != c
    assert a["lo"] < a["change"] < a["hi"] and a["level"] == 0.9
    assert a["change"] == pytest.approx(a["tuned"] / a["base"] - 1, rel=1e-9)
    # Paired: far narrower than the spread of the per-sentence perplexities themselves.
    assert a["hi"] - a["lo"] < 0.05


def test_bootstrap_by_hand():
    """The interval is the percentile interval of changes recomputed on resampled sentences."""
    nll, counts = random_nll(n=40, seed=2)
    tuned = nll * 1.01 + 0.3
    result = perplexity_change((nll, counts), (tuned, counts), n_boot=300, seed=5)
    rng = np.random.default_rng(5)
    changes = []
    for idx in rng.integers(0, 40, size=(300, 40)):
        changes.append(perplexity(tuned[idx], counts[idx]) / perplexity(nll[idx], counts[idx]) - 1)
    lo, hi = np.percentile(changes, [2.5, 97.5])
    assert result["lo"] == pytest.approx(lo, rel=1e-9)
    assert result["hi"] == pytest.approx(hi, rel=1e-9)


def test_format_change_signs_and_rounding():
    line = format_change("Swahili", {"change": 0.031, "lo": 0.0224, "hi": 0.04})
    assert line == "Swahili perplexity +3.1% [+2.2, +4.0]"
    line = format_change("English", {"change": -0.0004, "lo": -0.012, "hi": 0.0049})
    assert line == "English perplexity +0.0% [-1.2, +0.5]"
    line = format_change("English", {"change": 45058.677, "lo": 29738.624, "hi": 70524.442})
    assert line == "English perplexity x4.5e+04 [x3.0e+04, x7.1e+04]"  # a broken model: a ratio
    line = format_change("English", {"change": 8.9, "lo": 7.0, "hi": 12.0})
    assert line == "English perplexity +890.0% [+700.0, +1200.0]"  # below x10 stays in %


@pytest.mark.parametrize(
    "base, tuned, needle",
    [
        (([1.0, 2.0], [1, 2]), ([1.0, 2.0], [1, 3]), "counts differ"),
        (([1.0, 2.0], [1, 2]), ([1.0], [1]), "base has 2 sentence.s. and tuned 1"),
        (([1.0, 2.0], [1, 2]), ([1.0, 2.0], [1]), "tuned: need two"),
        (([1.0, np.nan], [1, 2]), ([1.0, 2.0], [1, 2]), "NaN"),
        (([1.0, 2.0], [0, 2]), ([1.0, 2.0], [0, 2]), "whole numbers >= 1"),
        (([], []), ([], []), "non-empty"),
    ],
)
def test_change_bad_input(base, tuned, needle):
    with pytest.raises(TLIError, match=needle):
        perplexity_change(base, tuned)


def test_change_bad_settings():
    nll, counts = random_nll(n=5)
    with pytest.raises(TLIError, match="n_boot"):
        perplexity_change((nll, counts), (nll, counts), n_boot=0)
    with pytest.raises(TLIError, match="level"):
        perplexity_change((nll, counts), (nll, counts), level=1.0)


def test_the_bundled_texts_follow_the_runs_languages():
    from tli.perplexity import bundled_codes, text_sets

    assert bundled_codes(("Swahili", "English")) == ["sw", "en"]
    assert bundled_codes(("German", "English")) == ["en"]  # no Swahili in a German run
    assert bundled_codes(("de", "fr")) == []
    assert bundled_codes(("source", "target")) == ["sw", "en"]  # unnamed: both
    assert list(text_sets(languages=("German", "en"))) == ["en"]
