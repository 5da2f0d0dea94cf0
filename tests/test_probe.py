import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from tli.cli import main
from tli.errors import TLIError
from tli.generate import generate
from tli.models import ModelConfig, load_model
from tli.pairs import Pair
from tli.probe import (
    PROBE_JSON,
    PROBE_MD,
    SCORES_JSON,
    SCORES_MD,
    ProbeConfig,
    ProbeResult,
    choose_shots,
    chrf,
    compare_hits,
    exact_match,
    extract_answer,
    fewshot_prompt,
    normalize_answer,
    probe,
    probe_summary_line,
    question_and_gold,
    related,
    score_items,
    summarize_scores,
)
from tli.train import TrainConfig, train

from conftest import PROBE_SETS, assert_one_line_error, tiny_model, tiny_tokenizer

SETS = PROBE_SETS
TRAINED, CONTROL = SETS["trained"], SETS["control"]
# Small, fast settings for the tiny model: short templates keep prompts a few dozen bytes.
FAST = dict(max_new_tokens=6, score_max_new_tokens=4, shots=2, batch_size=32, n=2)


# --- answers and scores: hand-worked cases -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("head", "head"),
        ("  Head.  ", "head"),
        ('"Head"', "head"),
        ("«maji»", "maji"),
        ("**Ocean**!", "ocean"),
        ("ice-cream", "ice-cream"),
        ("don't", "don't"),
        ("-zuri", "zuri"),
        ("to  go", "to go"),
        ("CAFE\u0301", "café"),  # NFC: e + combining acute becomes one character
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" head\nSwahili: kichwa", "head"),
        ("\n\n  'Head.'  \nmore", "head"),
        (" sea water", "sea water"),
        ("", ""),
        ("   \n  ", ""),
        (" Mkate\r\nEnglish: bread", "mkate"),
    ],
)
def test_extract_answer_takes_the_first_non_blank_line(generated, expected):
    assert extract_answer(generated) == expected


@pytest.mark.parametrize(
    ("answer", "gold", "hit"),
    [
        ("sea", ["sea", "ocean"], True),
        ("Ocean.", ["sea", "ocean"], True),
        ("oceans", ["sea", "ocean"], False),
        ("sea water", ["sea"], False),
        ("-Zuri", ["-zuri"], True),
        ("", ["child"], False),
        ("...", ["..."], False),  # an empty answer never hits, even against an empty gold
    ],
)
def test_exact_match(answer, gold, hit):
    assert exact_match(answer, gold) is hit


def test_chrf_hand_worked():
    # "cat" vs "car": orders 1-3 have n-grams on both sides. P = R per order: 2/3, 1/2, 0;
    # averaged 7/18; F_beta of equal P and R is that value.
    assert chrf("cat", ["car"]) == pytest.approx(100 * 7 / 18)
    # "cats" vs "cat": P = 3/4, 2/3, 1/2 (order 4 has no reference 4-gram), R = 1 each;
    # avg P = 23/36; F2 = 5 P R / (4 P + R) = 115/128.
    assert chrf("cats", ["cat"]) == pytest.approx(100 * 115 / 128)
    # Normalisation first ("Cats!" == "cats"); several references: the best one counts.
    assert chrf("Cats!", ["cat"]) == pytest.approx(100 * 115 / 128)
    assert chrf("Ocean", ["sea", "ocean"]) == pytest.approx(100.0)
    assert chrf("cats", ["dog", "cat"]) == pytest.approx(100 * 115 / 128)
    assert chrf("", ["cat"]) == 0.0
    assert chrf("xyz", ["cat"]) == 0.0


def test_compare_hits_mcnemar_hand_worked():
    base = [True, True, False, False, False, True]
    tuned = [True, False, True, True, True, True]
    out = compare_hits(base, tuned)
    # lost 1 (item 2), gained 3 (items 3-5); p = 2 P(X <= 1), X ~ Bin(4, 1/2) = 2 * 5/16.
    assert (out["lost"], out["gained"]) == (1, 3)
    assert out["p"] == pytest.approx(0.625)
    assert (out["n"], out["base"], out["tuned"]) == (6, 3, 5)
    assert out["base_acc"] == pytest.approx(0.5) and out["tuned_acc"] == pytest.approx(5 / 6)
    # 5 gained, none lost: p = 2 * (1/2)^5 = 1/16.
    assert compare_hits([False] * 5, [True] * 5)["p"] == pytest.approx(0.0625)
    # No discordant item: p = 1.
    assert compare_hits([True, False], [True, False])["p"] == 1.0


def test_summarize_scores_per_set_and_direction():
    def item(s, d, bh, th, bc, tc):
        return dict(set=s, direction=d, base_hit=bh, tuned_hit=th, base_chrf=bc, tuned_chrf=tc)

    items = [
        item("trained", "s2t", True, True, 100.0, 100.0),
        item("trained", "s2t", False, True, 20.0, 100.0),
        item("trained", "t2s", False, False, 0.0, 50.0),
        item("control", "s2t", True, False, 100.0, 40.0),
    ]
    rows = {(r["set"], r["direction"]): r for r in summarize_scores(items)}
    assert list(rows) == [("trained", "s2t"), ("trained", "t2s"), ("control", "s2t")]
    r = rows[("trained", "s2t")]
    assert (r["n"], r["base"], r["tuned"], r["lost"], r["gained"]) == (2, 1, 2, 0, 1)
    assert r["p"] == pytest.approx(1.0)  # 2 * P(X <= 0), X ~ Bin(1, 1/2) = 1
    assert r["acc_change"] == pytest.approx(0.5)
    assert (r["base_chrf"], r["tuned_chrf"], r["chrf_change"]) == (60.0, 100.0, 40.0)
    c = rows[("control", "s2t")]
    assert (c["lost"], c["gained"], c["acc_change"]) == (1, 0, -1.0)


# --- prompts and shots ---------------------------------------------------------------------------


def test_fewshot_prompt_text():
    cfg = ProbeConfig()
    shots = [Pair("mbwa", "dog"), Pair("paka", "cat")]
    langs = ("Swahili", "English")
    assert fewshot_prompt("maji", shots, "s2t", cfg, langs) == (
        "Translate each Swahili word into English.\n"
        "Swahili: mbwa\nEnglish: dog\nSwahili: paka\nEnglish: cat\nSwahili: maji\nEnglish:"
    )
    assert fewshot_prompt("water", shots, "t2s", cfg, langs) == (
        "Translate each English word into Swahili.\n"
        "English: dog\nSwahili: mbwa\nEnglish: cat\nSwahili: paka\nEnglish: water\nSwahili:"
    )
    # the languages come from the pair config; none given: neutral names, never Swahili
    assert fewshot_prompt("Wasser", [Pair("Hund", "dog")], "s2t", cfg, ("de", "en")) == (
        "Translate each de word into en.\nde: Hund\nen: dog\nde: Wasser\nen:"
    )
    assert fewshot_prompt("maji", shots, "s2t", cfg).startswith(
        "Translate each source word into target.\nsource: mbwa"
    )


def test_reverse_gold_accepts_every_source_of_a_target():
    pairs = [Pair("bahari", "sea", ("ocean",)), Pair("ziwa", "lake"), Pair("bahari kuu", "Sea")]
    word, gold = question_and_gold(pairs[0], "t2s", pairs)
    assert word == "sea" and set(gold) == {"bahari", "bahari kuu"}
    assert question_and_gold(pairs[0], "s2t", pairs) == ("bahari", ("sea", "ocean"))


def test_shots_come_from_the_trained_set_and_never_hold_the_item():
    items = score_items(SETS, ProbeConfig(shots=4))
    assert len(items) == 2 * (len(TRAINED) + len(CONTROL))
    trained = {(p.source, p.target) for p in TRAINED}
    for item in items:
        assert len(item["shots"]) == 4
        for shot in item["shots"]:
            assert tuple(shot) in trained
            assert shot[0] != item["source"] and shot[1] != item["target"]
        # The prompt: header, 4 shots of 2 lines, the question; no shot line holds the word
        # asked or one of its answers.
        lines = item["prompt"].split("\n")
        assert len(lines) == 1 + 2 * 4 + 2 and lines[-2].endswith(f": {item['word']}")
        said = {line.split(": ", 1)[1] for line in lines[1:-2]}
        assert item["word"] not in said and not said & set(item["gold"])


def test_shots_are_deterministic_and_per_item():
    item = TRAINED[0]
    a = choose_shots(item, TRAINED, 3, seed=7, direction="s2t")
    assert a == choose_shots(item, list(reversed(TRAINED)), 3, seed=7, direction="s2t")
    assert a != choose_shots(item, TRAINED, 3, seed=8, direction="s2t")
    assert len(choose_shots(item, TRAINED, 50, seed=0)) == len(TRAINED) - 1


_WORDS = st.sampled_from(["a", "A", "b", "b.", "c", "-c", "d", "e", "f", "g"])
_PAIRS = st.builds(
    lambda s, t, alts: Pair(s, t, tuple(a for a in alts if a != t)),
    _WORDS,
    _WORDS,
    st.lists(_WORDS, max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    pool=st.lists(_PAIRS, max_size=12),
    item=_PAIRS,
    k=st.integers(0, 8),
    seed=st.integers(-(2**40), 2**40),
    direction=st.sampled_from(["s2t", "t2s"]),
)
def test_no_shot_is_ever_the_item_or_related_to_it(pool, item, k, seed, direction):
    pool = [*pool, item]  # the item itself is always in the pool, as trained items are
    shots = choose_shots(item, pool, k, seed, direction)
    item_targets = {normalize_answer(t) for t in item.targets}
    for shot in shots:
        assert shot != item and shot in pool
        assert normalize_answer(shot.source) != normalize_answer(item.source)
        assert not {normalize_answer(t) for t in shot.targets} & item_targets
    assert len(set(shots)) == len(shots)
    eligible = {p for p in pool if not related(p, item)}
    assert len(shots) == min(k, len(eligible))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**9))
def test_no_shot_is_the_item_over_seeds(seed):
    for item in score_items(SETS, ProbeConfig(shots=5, seed=seed)):
        assert [item["source"], item["target"]] not in item["shots"]
        assert all(s[0] != item["source"] and s[1] != item["target"] for s in item["shots"])


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"template_s2t": "{source} means {target}"}, "must not contain {target}"),
        ({"template_t2s": "Translate: {source}"}, "must contain {target}"),
        ({"template_define": "{source} {word}"}, "unknown placeholder {word}"),
        ({"template_code_switch": "{source"}, "bad template"),
        ({"score_shot": "{in_lang}: {word} -> {answer}!"}, "must end with {answer}"),
        ({"score_shot": "{word}"}, "{word} and {answer} once each"),
        ({"score_header": "Translate {word}"}, "unknown placeholder {word}"),
        ({"templates": ("s2t", "poem")}, "templates must be"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"shots": -1}, "shots must be"),
    ],
)
def test_config_rejects_bad_values(values, needle):
    with pytest.raises(TLIError, match=None) as err:
        ProbeConfig(**values)
    assert needle in str(err.value)


def test_scoring_needs_a_trained_set():
    with pytest.raises(TLIError, match="trained set"):
        score_items({"control": CONTROL}, ProbeConfig())


# --- generation and the adapter ------------------------------------------------------------------


def _random_adapter(model_dir, out, *, zero_b=False, seed=1):
    loaded = load_model(ModelConfig(str(model_dir)))
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=zero_b
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft 0.21 on transformers 5
        peft_model = get_peft_model(loaded.model, cfg)
    if not zero_b:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def random_adapter(model_dir, tmp_path_factory):
    """A LoRA adapter with random, clearly non-zero B: the tuned model differs from the base."""
    return _random_adapter(model_dir, tmp_path_factory.mktemp("adapter") / "random")


def test_base_outputs_are_the_base_model_and_the_model_is_restored(
    model_dir, random_adapter, tmp_path
):
    cfg = ProbeConfig(score=True, **FAST)
    loaded = load_model(ModelConfig(str(model_dir)))
    result = probe(loaded, random_adapter, SETS, cfg, tmp_path / "p")
    # Base outputs equal those of a model loaded without any adapter.
    fresh = load_model(ModelConfig(str(model_dir)))
    prompts = [r["prompt"] for r in result.rows]
    plain = generate(fresh.model, fresh.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens)
    assert [r["base"] for r in result.rows] == plain
    # The adapter changes something.
    assert any(r["base"] != r["tuned"] for r in result.rows)
    # Afterwards the loaded model is the base model again: no LoRA layer, same outputs.
    assert not hasattr(loaded.model, "peft_config")
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    again = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens)
    assert again == plain
    # The scored items: same prompts for both models, both directions, every set.
    assert {(i["set"], i["direction"]) for i in result.items} == {
        (s, d) for s in ("trained", "control") for d in ("s2t", "t2s")
    }
    for i in result.items:
        assert i["base_hit"] == (i["base_complete"] and exact_match(i["base_answer"], i["gold"]))
        assert i["base_answer"] == extract_answer(i["base_output"])
        assert 0.0 <= i["tuned_chrf"] <= 100.0


def test_probe_scoring_hand_worked(model_dir, random_adapter, monkeypatch):
    """probe() from generated answers to the table, with the answers written by hand."""
    import tli.probe as probe_module

    gold_of = {p.source: p.target for p in TRAINED + CONTROL}
    gold_of |= {p.target: p.source for p in TRAINED + CONTROL}

    def fake_answers(model, tokenizer, prompts, **kwargs):
        tuned = hasattr(model, "get_base_model")
        out = []
        for prompt in prompts:
            word = prompt.split("\n")[-2].split(": ", 1)[1]
            trained = word in {p.source for p in TRAINED} | {p.target for p in TRAINED}
            s2t = prompt.split("\n")[-1].startswith("English")
            if trained and s2t:  # base misses "mtoto" only; tuned gets all (formatted freely)
                right = tuned or word != "mtoto"
                out.append(
                    (f' "{gold_of[word].upper()}".\nSwahili: x' if right else " kid\n", True)
                )
            elif trained:  # t2s: tuned says the gold but its line is cut: a miss
                out.append((f" {gold_of[word]}", False) if tuned else (" sijui\n", True))
            elif s2t:  # control: tuned gets "jua" (sun) only; base gets "mwezi" (moon) only
                right = (word == "jua") if tuned else (word == "mwezi")
                out.append((f" {gold_of[word]}\n" if right else " star\n", True))
            else:
                out.append(("", True))  # nothing at all: a miss, chrF 0
        return out

    monkeypatch.setattr(probe_module, "generate_answers", fake_answers)
    loaded = load_model(ModelConfig(str(model_dir)))
    result = probe(loaded, random_adapter, SETS, ProbeConfig(score=True, **FAST),
                   languages=("Swahili", "English"))  # fmt: skip
    rows = {(r["set"], r["direction"]): r for r in result.scores}
    r = rows[("trained", "s2t")]
    assert (r["n"], r["base"], r["tuned"], r["lost"], r["gained"]) == (10, 9, 10, 0, 1)
    assert r["p"] == pytest.approx(1.0) and r["acc_change"] == pytest.approx(0.1)
    # chrF: 9 exact (100) and "kid" vs "child": orders 1-3 count; P = 2/3, 0, 0 and
    # R = 2/5, 0, 0, so avg P = 2/9, avg R = 2/15, F2 = 5 P R / (4 P + R) = 10/69.
    kid = 100 * 10 / 69
    assert chrf("kid", ["child"]) == pytest.approx(kid)
    assert r["base_chrf"] == pytest.approx((9 * 100 + kid) / 10) and r["tuned_chrf"] == 100.0
    t = rows[("trained", "t2s")]
    assert (t["base"], t["tuned"], t["tuned_cut"], t["base_cut"]) == (0, 0, 10, 0)
    assert t["tuned_chrf"] == 100.0  # the cut line still gets its chrF
    c = rows[("control", "s2t")]
    assert (c["base"], c["tuned"], c["lost"], c["gained"], c["p"]) == (1, 1, 1, 1, 1.0)
    assert rows[("control", "t2s")]["tuned_chrf"] == 0.0
    md = result.scores_markdown()
    assert "| trained | Swahili -> English | 10 | 9/10 (90.0%) | 10/10 (100.0%) | +10.0 pt |" in md
    assert "counts as a miss (0 base, 10 tuned)" in md
    line = result.summary_line()
    assert "trained s2t 90.0% -> 100.0% (+1/-0, McNemar p = 1.000)" in line


def test_zero_adapter_is_reported(model_dir, tmp_path):
    adapter = _random_adapter(model_dir, tmp_path / "zero", zero_b=True)
    loaded = load_model(ModelConfig(str(model_dir)))
    result = probe(loaded, adapter, SETS, ProbeConfig(**FAST))
    assert all(r["base"] == r["tuned"] for r in result.rows)
    assert any("LoRA B matrix is zero" in w for w in result.warnings)


# --- end to end through the command line ---------------------------------------------------------


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    lines = ["swahili\tenglish\talternatives\tsplit"]
    lines += [f"{p.source}\t{p.target}\t{';'.join(p.alternatives)}\ttrained" for p in TRAINED]
    lines += [f"{p.source}\t{p.target}\t\tcontrol" for p in CONTROL]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_adapter(model_dir, tmp_path_factory):
    """A real tli adapter (tli_adapter.json and all), trained for one epoch in about a second."""
    out = tmp_path_factory.mktemp("train") / "run"
    shallow = load_model(ModelConfig(str(model_dir)), max_layer=2)
    cfg = TrainConfig(layer=2, epochs=1, batch_size=4, save_every=0, lr=5e-3, warmup_steps=1)
    train(shallow, TRAINED, cfg, out, progress=False)
    return out / "final"


def _fast_args():
    return [
        "--n",
        "2",
        "--max-new-tokens",
        "6",
        "--score-max-new-tokens",
        "4",
        "--shots",
        "2",
        "--batch-size",
        "32",
    ]


def test_cli_end_to_end_writes_every_file(capsys, model_dir, trained_adapter, pair_file, tmp_path):
    out = tmp_path / "probe"
    argv = ["probe", "--model", str(model_dir), "--adapter", str(trained_adapter)]
    argv += ["--pairs", str(pair_file), "--out", str(out), "--score", "--seed", "3", *_fast_args()]
    code = main(argv)
    stdout, _ = capsys.readouterr()
    assert code == 0
    for name in (PROBE_JSON, PROBE_MD, SCORES_JSON, SCORES_MD):
        assert (out / name).is_file(), name
    data = json.loads((out / PROBE_JSON).read_text())
    assert data["n_prompts"] == 2 * 2 * 4 == len(data["rows"])  # 2 pairs x 2 sets x 4 templates
    assert {r["template"] for r in data["rows"]} == {"s2t", "t2s", "code_switch", "define"}
    assert data["config"]["seed"] == 3 and data["adapter"]["tli"]["layer"] == 2
    scores = json.loads((out / SCORES_JSON).read_text())
    assert len(scores["scores"]) == 4
    assert len(scores["items"]) == 2 * (len(TRAINED) + len(CONTROL))
    md = (out / PROBE_MD).read_text()
    assert "| set | template | prompt | base output | tuned output |" in md
    assert "McNemar p" in (out / SCORES_MD).read_text()
    # The directory reads back to the same result.
    loaded = ProbeResult.load(out)
    assert loaded.rows == data["rows"] and loaded.items == scores["items"]
    assert loaded.config.seed == 3 and loaded.scores[0].keys() == scores["scores"][0].keys()
    assert loaded.scores_markdown() == (out / SCORES_MD).read_text()
    line = probe_summary_line(out)
    assert line.startswith("Word translation (2-shot") and "control" in line and "\n" not in line
    assert "wrote" in stdout and "McNemar" in stdout


def test_summary_line_without_scores_and_without_results(model_dir, random_adapter, tmp_path):
    loaded = load_model(ModelConfig(str(model_dir)))
    probe(loaded, random_adapter, SETS, ProbeConfig(**FAST), tmp_path / "p")
    assert not (tmp_path / "p" / SCORES_JSON).exists()
    line = probe_summary_line(tmp_path / "p")
    assert line.startswith("Probe: the tuned output differs") and "of 16 prompts" in line
    with pytest.raises(TLIError, match="has the probe run"):
        probe_summary_line(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / PROBE_JSON).write_text("[]")
    with pytest.raises(TLIError, match="not a tli probe result"):
        probe_summary_line(tmp_path / "bad")


def _other_model_adapter(tmp_path):
    path = tmp_path / "other-llama"
    tiny_model("llama", layers=4, hidden_size=48, max_position_embeddings=512).save_pretrained(path)
    tiny_tokenizer("left").save_pretrained(path)
    return _random_adapter(path, tmp_path / "other-adapter")


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "nan", "other_model"])
def test_bad_adapter_is_one_line_exit_2(
    capsys, model_dir, random_adapter, pair_file, tmp_path, kind
):
    import shutil

    adapter = tmp_path / "adapter"
    if kind == "missing":
        needle = "no such directory"
    elif kind == "empty":
        adapter.mkdir()
        needle = "adapter_config.json is missing"
    elif kind in ("corrupt", "nan"):
        shutil.copytree(random_adapter, adapter)
        weights = adapter / "adapter_model.safetensors"
        if kind == "corrupt":
            weights.write_bytes(weights.read_bytes()[:100])
            needle = "corrupted"
        else:
            from safetensors.torch import load_file, save_file

            tensors = load_file(weights)
            next(iter(tensors.values()))[0, 0] = math.nan
            save_file(tensors, weights)
            needle = "NaN or infinity"
    else:
        adapter = _other_model_adapter(tmp_path)
        needle = "was trained on model"
    out = tmp_path / "out"
    argv = ["probe", "--model", str(model_dir), "--adapter", str(adapter)]
    code = main([*argv, "--pairs", str(pair_file), "--out", str(out), "--score", *_fast_args()])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, needle)
    assert not (out / PROBE_JSON).exists()


def test_bad_option_is_one_line_exit_2(capsys, random_adapter):
    code = main(["probe", "--adapter", str(random_adapter), "--template-s2t", "{source}={target}"])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "must not contain {target}")


def test_cli_templates_take_backslash_n_as_a_line_break(
    capsys, model_dir, random_adapter, pair_file, tmp_path
):
    out = tmp_path / "probe"
    argv = ["probe", "--model", str(model_dir), "--adapter", str(random_adapter)]
    argv += ["--pairs", str(pair_file), "--out", str(out), "--templates", "s2t"]
    argv += ["--template-s2t", r"Neno: {source}\nMaana:", *_fast_args()]
    assert main(argv) == 0
    capsys.readouterr()
    rows = json.loads((out / PROBE_JSON).read_text())["rows"]
    assert len(rows) == 4 and {r["template"] for r in rows} == {"s2t"}
    assert rows[0]["prompt"] == f"Neno: {rows[0]['source']}\nMaana:"
    assert not (out / SCORES_JSON).exists()


def test_probe_after_evaluate_on_the_same_model(model_dir, random_adapter, tmp_path):
    """`tli run` order: evaluate merges and restores the adapter, then the probe attaches it."""
    from tli.evaluate import EvalConfig, evaluate

    loaded = load_model(ModelConfig(str(model_dir)))
    evaluate(loaded, random_adapter, SETS, EvalConfig(n_boot=10))
    result = probe(loaded, random_adapter, SETS, ProbeConfig(**FAST))
    fresh = load_model(ModelConfig(str(model_dir)))
    prompts = [r["prompt"] for r in result.rows]
    plain = generate(fresh.model, fresh.tokenizer, prompts, max_new_tokens=FAST["max_new_tokens"])
    assert [r["base"] for r in result.rows] == plain


def test_unscored_probe_removes_stale_scores(model_dir, random_adapter, tmp_path):
    loaded = load_model(ModelConfig(str(model_dir)))
    out = tmp_path / "p"
    probe(loaded, random_adapter, SETS, ProbeConfig(score=True, **FAST), out)
    assert (out / SCORES_JSON).is_file()
    probe(loaded, random_adapter, SETS, ProbeConfig(**FAST), out)
    assert not (out / SCORES_JSON).exists() and not (out / SCORES_MD).exists()
    assert probe_summary_line(out).startswith("Probe: ")


# --- the LM-ranking yardstick ----------------------------------------------------------------


def test_lm_rank_scores_every_candidate_of_the_set(model_dir, tmp_path):
    import torch

    from tli.generate import continuation_scores
    from tli.metrics import retrieval
    from tli.pairs import gold_mask
    from tli.probe import RANK_JSON, RANK_MD, lm_rank, load_rank

    loaded = load_model(ModelConfig(str(model_dir)))
    cfg = ProbeConfig(shots=2, rank_sets=("trained", "control"), rank_directions=("s2t", "t2s"))
    out = lm_rank(loaded, SETS, cfg, tmp_path)
    assert {(r["set"], r["direction"]) for r in out["scores"]} == {
        (s, d) for s in ("trained", "control") for d in ("s2t", "t2s")
    }
    for row in out["scores"]:
        pairs = SETS[row["set"]]
        assert row["n"] == row["n_candidates"] == len(pairs)
        items = [
            i for i in out["items"] if (i["set"], i["direction"]) == (row["set"], row["direction"])
        ]
        gold = gold_mask(pairs) if row["direction"] == "s2t" else gold_mask(pairs).T
        cands = [p.target if row["direction"] == "s2t" else p.source for p in pairs]
        raw = []
        for item in items:  # recompute each item's scores by hand: one prompt, every candidate
            word = item["word"]
            assert item["shots"] and word not in {w for s in item["shots"] for w in s}
            assert item["gold"] == gold[item["index"]].nonzero().flatten().tolist()
            raw.append(
                continuation_scores(
                    loaded.model, loaded.tokenizer, item["prompt"], [" " + c for c in cands]
                )
            )
        want = retrieval(torch.stack(raw), gold[[i["index"] for i in items]])
        assert row["p_at_1_raw"] == pytest.approx(float(want["p_at_1"]))
        assert row["mrr_raw"] == pytest.approx(float(want["mrr"]))
        assert [i["rank_raw"] for i in items] == want["rank"].tolist()
        assert row["hits_raw"] == sum(i["rank_raw"] == 1 for i in items)
        assert row["p_at_1_raw_lo"] <= row["p_at_1_raw"] <= row["p_at_1_raw_hi"]
        assert 0 < row["chance"] < 1
    # the shots never hold the item: every prompt asks a word that no shot line holds
    for item in out["items"]:
        shot_lines = item["prompt"].split("\n")[1:-2]  # header, shots | question
        assert not any(line.endswith(f": {item['word']}") for line in shot_lines)
    assert (tmp_path / RANK_MD).read_text().startswith("# LM ranking")
    assert load_rank(tmp_path)["scores"] == json.loads((tmp_path / RANK_JSON).read_text())["scores"]
    assert load_rank(tmp_path / "nothing") is None
    (tmp_path / RANK_JSON).write_text('{"config": {}, "stage": "probe"}')
    with pytest.raises(TLIError, match="not a tli LM ranking"):
        load_rank(tmp_path)


def test_lm_rank_calibration_subtracts_the_content_free_prompt(model_dir, monkeypatch):
    import torch

    import tli.generate
    from tli.probe import CONTENT_FREE, lm_rank

    def fake(model, tokenizer, prompt, continuations, **kwargs):
        if prompt.endswith(f"{CONTENT_FREE}\nEnglish:"):  # the prior: frequent words score high
            return torch.tensor([5.0 if c == " child" else 0.0 for c in continuations])
        # raw: "child" wins everywhere by 1, the gold by 0.5
        asked = prompt.rsplit("Swahili: ", 1)[1].split("\n")[0]
        gold = {p.source: p.target for p in SETS["trained"]}[asked]
        return torch.tensor(
            [1.0 if c == " child" else 0.5 if c == " " + gold else 0.0 for c in continuations]
        )

    monkeypatch.setattr(tli.generate, "continuation_scores", fake)
    loaded = load_model(ModelConfig(str(model_dir)))
    cfg = ProbeConfig(shots=2, rank_sets=("trained",))
    out = lm_rank(loaded, SETS, cfg, languages=("Swahili", "English"))
    (row,) = out["scores"]
    n = len(SETS["trained"])
    assert row["hits_raw"] == 1  # only the item whose gold is "child"
    assert row["hits_calibrated"] == n - 1  # "child" falls to 1 - 5; every other gold wins
    assert row["p_at_1_calibrated"] == pytest.approx((n - 1) / n)


def test_lm_rank_needs_a_ranked_set_and_rejects_bad_settings(model_dir):
    from tli.probe import lm_rank

    loaded = load_model(ModelConfig(str(model_dir)))
    with pytest.raises(TLIError, match="nothing to rank"):
        lm_rank(loaded, {"trained": TRAINED}, ProbeConfig(shots=1))  # no control set
    with pytest.raises(TLIError, match="rank_directions"):
        ProbeConfig(rank_directions=("up",))
    with pytest.raises(TLIError, match="rank_n"):
        ProbeConfig(rank_n=-1)


def test_cli_probe_rank_writes_the_ranking(model_dir, random_adapter, tmp_path, capsys):
    from tli.probe import RANK_JSON, ProbeResult

    out = tmp_path / "p"
    argv = [
        "probe",
        "--adapter",
        str(random_adapter),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--n",
        "1",
        "--shots",
        "1",
        "--max-new-tokens",
        "2",
    ]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(
        "swahili\tenglish\tsplit\n"
        + "".join(f"{p.source}\t{p.target}\ttrained\n" for p in TRAINED)
        + "".join(f"{p.source}\t{p.target}\tcontrol\n" for p in CONTROL),
        encoding="utf-8",
    )
    assert main([*argv, "--pairs", str(pairs), "--rank"]) == 0
    stdout = capsys.readouterr().out
    assert "LM ranking (1-shot, base model): control s2t P@1" in stdout
    assert ProbeResult.load(out).rank["scores"][0]["n"] == len(CONTROL)
    # a probe without --rank replacing this one leaves no stale ranking
    assert main([*argv, "--pairs", str(pairs), "--overwrite"]) == 0
    assert not (out / RANK_JSON).exists() and ProbeResult.load(out).rank == {}
