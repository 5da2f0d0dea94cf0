"""Evaluation (``tli.evaluate``, ``tli evaluate``): figures, verdicts, files and the command line.

The metric maths are tested in test_metrics.py, the verdict rules in test_verdict.py and the
adapter checks in test_adapters.py.
"""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import stats

from tli.errors import TLIError
from tli.evaluate import (
    EvalConfig,
    EvalResult,
    compare,
    evaluate,
    examples,
    load_vectors,
)
from tli.metrics import RETRIEVALS
from tli.models import ModelConfig, load_model
from tli.pairs import gold_mask, write_pairs
from tli.verdict import VERDICTS

from conftest import (
    EVAL_CONTROL,
    EVAL_TRAINED,
    PNG_MAGIC,
    assert_one_line_error,
    eval_pair_files,
    eval_set_args,
    gold_of,
)

TRAINED, CONTROL = EVAL_TRAINED, EVAL_CONTROL
QUICK = EvalConfig(n_boot=50, n_examples=3)


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


# --- pure functions --------------------------------------------------------------------------


def test_compare_statistics_match_scipy():
    gen = torch.Generator().manual_seed(4)
    src = unit(torch.randn(3, 12, 8, generator=gen))
    tgt = unit(src + torch.randn(3, 12, 8, generator=gen))
    post_tgt = unit(tgt + 0.4 * src + 0.1 * torch.randn(3, 12, 8, generator=gen))
    figures, pre_cos, post_cos = compare((src, tgt), (src, post_tgt), gold_of(12), QUICK)
    assert pre_cos.shape == post_cos.shape == (3, 12)
    for i in range(3):
        ref = stats.ttest_rel(post_cos[i], pre_cos[i])
        assert figures["change"]["t"][i] == pytest.approx(ref.statistic, rel=1e-10)
        assert figures["change"]["p"][i] == pytest.approx(ref.pvalue, rel=1e-8)
        wx = stats.wilcoxon(post_cos[i] - pre_cos[i])
        assert figures["change"]["wilcoxon_p"][i] == pytest.approx(wx.pvalue, rel=1e-8)
        assert figures["pre"]["pair_mean"][i] == pytest.approx(pre_cos[i].mean())
        assert figures["change"]["abs_change"][i] == pytest.approx(
            figures["bootstrap"]["pair_change"][i]
        )
        for kind in RETRIEVALS:
            t = figures["p_at_1_tests"][kind]
            b, c = t["lost"][i], t["gained"][i]
            expected = 1.0 if b + c == 0 else min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5))
            assert t["p"][i] == pytest.approx(expected)
            assert (c - b) / 12 == pytest.approx(
                figures["post"][f"p_at_1_{kind}"][i] - figures["pre"][f"p_at_1_{kind}"][i]
            )
    assert len(figures["verdicts"]) == 3
    assert {v["code"] for v in figures["verdicts"]} <= set(VERDICTS)


def _pairs_with_noise(b, d, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    src = unit(torch.randn(1, b, d, generator=gen))
    tgt = unit(src + noise * torch.randn(1, b, d, generator=gen))
    return src, tgt, gen


def test_all_vectors_moving_together_is_a_collapse():
    src, tgt, gen = _pairs_with_noise(80, 32, 1.5, seed=5)
    common = unit(torch.randn(32, generator=gen))
    post = (unit(src + 1.5 * common), unit(tgt + 1.5 * common))
    figures, _, _ = compare((src, tgt), post, gold_of(80), EvalConfig(n_boot=200))
    verdict = figures["verdicts"][0]
    assert verdict["code"] == "collapsed", verdict["reason"]
    assert verdict["label"].startswith("raw cosine rose but the space collapsed; margin fell; ")
    assert verdict["collapse"] and verdict["geometry"] == "fell"
    assert figures["change"]["abs_change"][0] > 0.2 and figures["change"]["p"][0] < 1e-10
    # centring removes the shared direction: centred retrieval is about where it was
    pre, post = figures["pre"]["p_at_1_s2t_centered"][0], figures["post"]["p_at_1_s2t_centered"][0]
    assert abs(post - pre) <= 2 / 80


def test_only_translation_pairs_moving_closer_is_alignment():
    src, tgt, _ = _pairs_with_noise(80, 32, 1.5, seed=6)
    post = (src, unit(tgt + 1.0 * src))  # each target moves towards its own source only
    figures, _, _ = compare((src, tgt), post, gold_of(80), EvalConfig(n_boot=200))
    verdict = figures["verdicts"][0]
    assert verdict["code"] == "improved", verdict["reason"]
    assert verdict["label"] == "alignment improved" and verdict["rank"] == 2
    assert figures["bootstrap"]["margin_change_lo"][0] > 0


def test_unchanged_vectors_are_no_change():
    src, tgt, _ = _pairs_with_noise(30, 16, 1.0, seed=7)
    figures, _, _ = compare((src, tgt), (src.clone(), tgt.clone()), gold_of(30), QUICK)
    assert figures["verdicts"][0]["code"] == "none"
    assert figures["verdicts"][0]["label"].startswith("no detectable change: margin change not")
    assert figures["change"]["p"][0] == 1.0


def test_examples_are_gains_losses_and_a_seeded_sample():
    pre = np.zeros(10)
    post = np.array([0.5, -0.4, 0.1, 0.0, 0.3, -0.2, 0.2, 0.0, -0.1, 0.4])
    ex = examples(pre, post, 3, seed=1)
    assert ex["gains"] == [0, 9, 4]
    assert ex["losses"] == [1, 5, 8]
    assert ex["random"] == sorted(ex["random"]) and len(set(ex["random"])) == 3
    assert ex["random"] == examples(pre, post, 3, seed=1)["random"]
    assert len(examples(pre[:2], post[:2], 5)["gains"]) == 2


# --- end to end on a tiny model --------------------------------------------------------------


@pytest.fixture
def base(tiny_model_dir):
    return load_model(ModelConfig(str(tiny_model_dir)))


def test_end_to_end_writes_every_file(base, adapter_dir, tiny_model_dir, tmp_path):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    out = tmp_path / "eval"
    result = evaluate(base, adapter_dir, {"trained": TRAINED, "control": CONTROL}, QUICK, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "evaluation.json",
        "evaluation.md",
        "pairs.csv",
        "vectors.safetensors",
    ]
    assert result.num_layers == 4 and result.layers == [0, 1, 2, 3, 4]
    assert result.target_layer == 2 and result.headline_layer == 4
    # pairs.csv: every pair at every layer, change = post - pre
    rows = list(csv.DictReader((out / "pairs.csv").open(encoding="utf-8")))
    assert len(rows) == 5 * (len(TRAINED) + len(CONTROL))
    assert list(rows[0]) == ["source", "target", "set", "layer", "pre", "post", "change"]
    for row in rows:
        assert float(row["change"]) == pytest.approx(float(row["post"]) - float(row["pre"]))
    layer0 = [r for r in rows if r["layer"] == "0"]
    assert all(float(r["change"]) == 0.0 for r in layer0)  # LoRA on q/v leaves embeddings
    final = [r for r in rows if r["layer"] == "4"]
    assert any(abs(float(r["change"])) > 1e-5 for r in final)
    # evaluation.json: strict JSON with every figure per layer, and the verdicts
    text = (out / "evaluation.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["stage"] == "evaluate" and data["headline_layer"] == 4
    assert data["target_layer"] == 2 and data["adapter"]["tli"]["layer"] == 2
    assert set(data["verdicts"]) == {"trained", "control"}
    assert set(data["target_layer_verdicts"]) == {"trained", "control"}
    for name, n in (("trained", len(TRAINED)), ("control", len(CONTROL))):
        s = data["sets"][name]
        verdict = data["verdicts"][name]
        assert s["n"] == n and verdict["code"] in VERDICTS and verdict["layer"] == 4
        assert {"geometry", "retrieval", "collapse", "rank", "label", "reason"} <= set(verdict)
        for group in ("pre", "post", "change", "bootstrap"):
            for key, values in s[group].items():
                assert len(values) == 5, (group, key)
        assert s["pre"]["p_at_1_s2t_nn"][4] == result.sets[name]["pre"]["p_at_1_s2t_nn"][4]
        assert set(s["p_at_1_tests"]) == set(RETRIEVALS)
        assert "wilcoxon_p" in s["change"] and "d_z" in s["change"] and "ci_lo" in s["change"]
        assert "margin_lo" in s["pre"] and "p_at_5_t2s_csls" in s["post"]
    assert data["timings"]["total_s"] > 0 and data["timings"]["write_s"] >= 0
    # evaluation.md: verdicts, Table 1 (paper's columns + controls), every layer, Table 2
    md = (out / "evaluation.md").read_text()
    for needle in (
        "## Verdicts at the final layer (4)",
        "| Set | N | Pre mean (std) | Post mean (std) | Abs. change | % change | t | p |",
        "Baseline pre → post",
        "Margin change",
        "P@1 source→target centred NN pre → post [95% Wilson]",  # no languages: neutral names
        "| Set | N | Geometry: margin change [95% CI] | detects |",
        "## Retrieval at the final layer (4)",
        "| control | target→source centred NN |",
        "| trained | source→target centred NN (verdict) |",
        "P@1 source→target NN pre → post [Wilson]",
        "| 2 (trained) |",
        "| 4 (final) |",
        "## Table 2",
        "Largest losses",
        "Random sample (seed 0)",
        "At the training layer (2)",
    ):
        assert needle in md, needle
    # vectors: final and training layer, pre and post, per set and side
    tensors, meta = load_vectors(out)
    assert meta["final_layer"] == "4" and meta["target_layer"] == "2"
    assert meta["pairs"]["control"][0] == ["jua", "sun"]
    for name, n in (("trained", len(TRAINED)), ("control", len(CONTROL))):
        for key in ("pre.source.layer4", "post.target.layer4", "pre.target.layer2"):
            assert tensors[f"{name}.{key}"].shape == (n, 32)
    cos = (tensors["trained.post.source.layer4"] * tensors["trained.post.target.layer4"]).sum(-1)
    assert cos.double().numpy() == pytest.approx(result.cosines["trained"]["post"][4], abs=1e-5)
    # the frozen yardsticks of the base model: the final layer's equal a fit on the saved vectors
    from tli.yardsticks import fit_procrustes, score_set

    yard = data["yardsticks"]
    assert yard["fit_set"] == "trained" and yard["n_fit"] == len(TRAINED)
    assert yard["in_sample"] == ["trained"] and yard["absent"] == {}
    w = fit_procrustes(tensors["trained.pre.source.layer4"], tensors["trained.pre.target.layer4"])
    for name in ("trained", "control"):
        src, tgt = tensors[f"{name}.pre.source.layer4"], tensors[f"{name}.pre.target.layer4"]
        gold = gold_mask(TRAINED if name == "trained" else CONTROL)
        want = score_set(src[None], tgt[None], gold, w[None])
        for key in ("p_at_1_s2t_procrustes_csls", "mrr_t2s_procrustes_nn", "p_at_1_s2t_centered"):
            assert yard["sets"][name][key][4] == pytest.approx(want[key][0]), (name, key)
            assert len(yard["sets"][name][key]) == 5
    assert "## Frozen yardsticks" in md and "| control | s→t | " in md
    # do no harm: the bundled texts' perplexity, base equal to the base model's own
    from tli.perplexity import load_texts, perplexity, sentence_nll

    harm = data["perplexity"]
    assert harm["enabled"] is True and list(harm["sets"]) == ["sw", "en"]
    for code, texts in load_texts().items():
        got = harm["sets"][code]
        assert got["n_sentences"] == len(texts) and got["name"] in ("Swahili", "English")
        assert got["base"] == pytest.approx(
            perplexity(*sentence_nll(base.model, base.tokenizer, texts))
        )
        assert got["lo"] <= got["change"] <= got["hi"]
        assert got["tuned"] == pytest.approx(got["base"] * (1 + got["change"]))
    assert result.summary_lines()[-1].startswith(
        "do no harm (95% paired bootstrap CI): Swahili perplexity "
    )
    assert "## Do no harm: perplexity on everyday texts" in md and "| Swahili | 124 |" in md
    # read back
    loaded = EvalResult.load(out)
    assert loaded.yardsticks == result.yardsticks and loaded.perplexity == result.perplexity
    assert loaded.markdown() == result.markdown()
    assert loaded.to_csv() == result.to_csv()
    assert loaded.verdicts == result.verdicts
    # the base model is left as it was, and can be evaluated again with the same result
    after = base.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = evaluate(base, adapter_dir, {"trained": TRAINED, "control": CONTROL}, QUICK)
    assert again.to_csv() == result.to_csv()
    assert again.sets["trained"]["verdicts"] == result.sets["trained"]["verdicts"]


def test_training_directory_and_leak_warning(base, adapter_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "final")
    write_pairs(TRAINED + CONTROL[:1], run / "pairs.tsv")
    result = evaluate(base, run, {"trained": TRAINED, "control": CONTROL}, QUICK)
    assert result.adapter["dir"] == str(run / "final")
    assert any("control pair(s)" in w and "'jua'" in w for w in result.warnings)


def test_truncated_model_is_refused(tiny_model_dir, adapter_dir):
    cut = load_model(ModelConfig(str(tiny_model_dir)), max_layer=2)
    with pytest.raises(TLIError, match="needs the full model"):
        evaluate(cut, adapter_dir, {"trained": TRAINED}, QUICK)


def test_zero_adapter_warns_that_nothing_changed(base, adapter_dir, tmp_path):
    zero = tmp_path / "zero"
    shutil.copytree(adapter_dir, zero)
    weights = load_file(zero / "adapter_model.safetensors")
    weights = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}
    save_file(weights, zero / "adapter_model.safetensors")
    result = evaluate(base, zero, {"trained": TRAINED}, QUICK)
    assert any("unchanged" in w for w in result.warnings)
    assert result.verdict("trained").code == "none"
    # the same model twice: the perplexity change is exactly zero
    assert "Swahili perplexity +0.0% [+0.0, +0.0]" in result.harm_line()
    assert "English perplexity +0.0% [+0.0, +0.0]" in result.harm_line()
    # no control set: the held-out yardsticks are absent, and the outputs say why
    assert "no control set" in result.yardsticks["absent"]["control"]
    assert "absent (control): no control set" in result.markdown()


# --- the command line ------------------------------------------------------------------------


def test_cli_end_to_end(run_cli, adapter_dir, tmp_path):
    trained, control = eval_pair_files(tmp_path)
    out = tmp_path / "eval"
    # --model defaults to the model the adapter records
    code, stdout, err = run_cli(
        "evaluate", "--adapter", adapter_dir, "--pairs", trained, "--control", control,
        "--out", out, "--n-boot", 50, "--n-examples", 2,
    )  # fmt: skip
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("trained (layer 4): ") and lines[1].startswith("control (layer 4): ")
    assert any(line.startswith("| trained | 9 | ") for line in lines)
    assert "wrote" in lines[-1] and "yardsticks.png" in lines[-1]
    assert lines[2].startswith("do no harm (95% paired bootstrap CI): Swahili perplexity ")
    data = json.loads((out / "evaluation.json").read_text())
    assert data["config"]["n_boot"] == 50 and data["config"]["n_examples"] == 2
    assert (out / "yardsticks.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_perplexity_off_and_user_texts(run_cli, adapter_dir, tmp_path):
    trained, control = eval_pair_files(tmp_path)
    common = ["evaluate", "--adapter", adapter_dir, "--pairs", trained, "--control", control,
              "--n-boot", 20, "--n-examples", 1]  # fmt: skip
    code, stdout, err = run_cli(*common, "--out", tmp_path / "off", "--no-perplexity")
    assert code == 0, err
    assert "do no harm: perplexity not measured (turned off" in stdout
    data = json.loads((tmp_path / "off" / "evaluation.json").read_text())
    assert data["perplexity"] == {"enabled": False, "reason": data["perplexity"]["reason"]}
    assert "Not measured: turned off" in (tmp_path / "off" / "evaluation.md").read_text()
    mine = tmp_path / "kitchen.txt"
    mine.write_text("Maji ni baridi leo.\n\nMtoto anacheza nje.\n", encoding="utf-8")
    code, stdout, err = run_cli(*common, "--out", tmp_path / "on", "--texts", f"Jiko={mine}")
    assert code == 0, err
    harm = json.loads((tmp_path / "on" / "evaluation.json").read_text())["perplexity"]
    assert list(harm["sets"]) == ["sw", "en", "Jiko"]
    assert harm["sets"]["Jiko"]["n_sentences"] == 2 and harm["sets"]["Jiko"]["source"] == str(mine)
    assert "Jiko perplexity " in stdout


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("nope.txt", ["nope.txt", "no such file"]),
        ("empty.txt", ["empty.txt", "no sentence"]),
        ("Swahili=other.txt", ["the name 'Swahili' is taken"]),
    ],
)
def test_cli_bad_text_files_fail_before_the_model_loads(
    run_cli, adapter_dir, tmp_path, spec, needles, monkeypatch
):
    import tli.models

    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "other.txt").write_text("Habari.\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tli.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    code, _, err = run_cli(
        "evaluate", "--adapter", adapter_dir, *eval_set_args(tmp_path), "--texts", spec
    )
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--n-boot", "0"], ["n_boot must be an integer >= 1"]),
        (["--alpha", "1.5"], ["alpha must be in (0, 1)"]),
        (["--collapse-ratio", "0"], ["collapse_ratio must be > 0"]),
        (["--pooling", "max"], ["pooling"]),
    ],
)
def test_cli_bad_options(run_cli, adapter_dir, tmp_path, argv, needles):
    sets = eval_set_args(tmp_path)
    # argparse rejects some values itself: run_cli turns its SystemExit into the code
    code, _, err = run_cli("evaluate", "--adapter", adapter_dir, *sets, *argv)
    assert code == 2
    assert any(n in err for n in needles), err


def test_a_set_of_one_pair_is_an_error(run_cli, adapter_dir, tmp_path):
    trained, _ = eval_pair_files(tmp_path)
    write_pairs(CONTROL[:1], tmp_path / "one.tsv")
    code, _, err = run_cli(
        "evaluate", "--adapter", adapter_dir, "--pairs", trained, "--control", tmp_path / "one.tsv",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(code, err, "set 'control' has 1 pair")


def test_evaluate_overwrite_keeps_the_earlier_evaluation_until_the_new_one_is_written(
    run_cli, monkeypatch, adapter, inputs, tmp_path
):
    """`--out` holding an evaluation is refused without --overwrite; with it, the earlier
    evaluation is set aside and comes back if the new one fails (here while writing)."""
    import tli.evaluate

    from conftest import assert_user_error

    out = tmp_path / "eval"
    argv = ["evaluate", "--adapter", adapter, "--pairs", inputs / "split.tsv", "--n-boot", "20",
            "--out", out]  # fmt: skip
    assert run_cli(*argv)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(*argv)
    assert_user_error(code, err, "already holds an evaluation", "--overwrite")
    real_save = tli.evaluate.EvalResult.save

    def full_disk(self, directory):
        (directory / "pairs.csv").write_text("half")
        raise TLIError(f"{directory}/pairs.csv: cannot write: No space left on device")

    monkeypatch.setattr(tli.evaluate.EvalResult, "save", full_disk)
    code, _, err = run_cli(*argv, "--overwrite")
    assert_user_error(code, err, "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(tli.evaluate.EvalResult, "save", real_save)
    code, _, err = run_cli(*argv, "--overwrite", "--seed", "1")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert json.loads((out / "evaluation.json").read_text())["config"]["seed"] == 1
