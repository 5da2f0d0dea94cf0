import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import stats

from tli import cli
from tli.adapters import read_adapter
from tli.errors import TLIError
from tli.evaluate import (
    EvalConfig,
    EvalResult,
    compare,
    evaluate,
    examples,
    load_vectors,
)
from tli.metrics import (
    RETRIEVALS,
    alignment_summary,
    margin_rows,
    paired_margin_bootstrap,
    resample_indices,
    similarity,
    top1_hits,
)
from tli.models import ModelConfig, load_model
from tli.pairs import Pair, write_pairs
from tli.train import TrainConfig, train
from tli.verdict import VERDICTS, VerdictFigures, decide

from conftest import tiny_model, tiny_tokenizer

WORDS = [
    ("mtoto", "child"),
    ("kitabu", "book"),
    ("maji", "water"),
    ("nyumba", "house"),
    ("mbwa", "dog"),
    ("paka", "cat"),
    ("chakula", "food"),
    ("mkate", "bread"),
]
TRAINED = [Pair(s, t) for s, t in WORDS] + [Pair("bahari", "sea", alternatives=("ocean",))]
CONTROL = [Pair("jua", "sun"), Pair("mwezi", "moon"), Pair("mti", "tree"), Pair("moto", "fire")]
FAST = dict(epochs=1, batch_size=4, warmup_steps=1, lr=5e-3, save_every=0)
QUICK = EvalConfig(n_boot=50, n_examples=3)


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def gold_of(b, alternatives=()):
    gold = torch.eye(b, dtype=torch.bool)
    for i, j in alternatives:
        gold[i, j] = True
    return gold


# --- pure functions --------------------------------------------------------------------------


def test_margin_rows_give_the_summary_baseline_and_margin():
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(3, 6, 5, generator=gen), torch.randn(3, 6, 5, generator=gen)
    gold = gold_of(6, [(0, 3)])
    pair, row_sum, row_count = margin_rows(similarity(src, tgt), gold)
    summary = alignment_summary(src, tgt, gold, n_boot=10)
    baseline = row_sum.sum(-1) / row_count.sum(-1)
    assert torch.allclose(baseline, torch.tensor(summary["baseline"], dtype=torch.float64))
    margin = pair.mean(-1) - baseline
    assert torch.allclose(margin, torch.tensor(summary["margin"], dtype=torch.float64))


def _slow_margin(sim, gold, rows):
    """Margin of one resample of query rows, written out cell by cell."""
    b = sim.shape[0]
    pair = float(np.mean([sim[i, i] for i in rows]))
    mismatched = [sim[i, j] for i in rows for j in range(b) if not gold[i, j]]
    baseline = float(np.mean(mismatched))
    return pair, baseline


def test_paired_margin_bootstrap_matches_a_slow_loop():
    gen = torch.Generator().manual_seed(1)
    L, B, D, n_boot, seed = 2, 7, 4, 40, 3
    src0, tgt0 = torch.randn(L, B, D, generator=gen), torch.randn(L, B, D, generator=gen)
    src1, tgt1 = src0 + 0.5 * torch.randn(L, B, D, generator=gen), tgt0 + 0.3 * src0
    gold = gold_of(B, [(2, 5), (5, 2)])
    pre, post = similarity(src0, tgt0), similarity(src1, tgt1)
    got = paired_margin_bootstrap(pre, post, gold, n_boot=n_boot, seed=seed, level=0.9)
    idx = resample_indices(B, n_boot, seed).numpy()
    g = gold.numpy()
    for layer in range(L):
        s0, s1 = pre[layer].numpy(), post[layer].numpy()
        boots = {"pair_change": [], "baseline_change": [], "margin_change": []}
        for rows in idx:
            p0, b0 = _slow_margin(s0, g, rows)
            p1, b1 = _slow_margin(s1, g, rows)
            boots["pair_change"].append(p1 - p0)
            boots["baseline_change"].append(b1 - b0)
            boots["margin_change"].append((p1 - b1) - (p0 - b0))
        all_rows = np.arange(B)
        p0, b0 = _slow_margin(s0, g, all_rows)
        p1, b1 = _slow_margin(s1, g, all_rows)
        observed = {
            "pair_change": p1 - p0,
            "baseline_change": b1 - b0,
            "margin_change": (p1 - b1) - (p0 - b0),
        }
        for name, values in boots.items():
            lo, hi = np.quantile(values, [0.05, 0.95])
            assert got[f"{name}_lo"][layer].item() == pytest.approx(lo, abs=1e-12)
            assert got[f"{name}_hi"][layer].item() == pytest.approx(hi, abs=1e-12)
            assert got[name][layer].item() == pytest.approx(observed[name], abs=1e-12)


def test_paired_bootstrap_is_seeded_and_paired():
    gen = torch.Generator().manual_seed(2)
    src, tgt = torch.randn(20, 8, generator=gen), torch.randn(20, 8, generator=gen)
    sim, gold = similarity(src, tgt), gold_of(20)
    a = paired_margin_bootstrap(sim, sim + 0.01, gold, n_boot=30, seed=5)
    b = paired_margin_bootstrap(sim, sim + 0.01, gold, n_boot=30, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A shift of every cosine moves pairs and baseline alike: the margin change is exactly 0
    # on every resample (an unpaired bootstrap would give a wide interval around 0).
    assert a["margin_change_lo"].item() == pytest.approx(0.0, abs=1e-12)
    assert a["margin_change_hi"].item() == pytest.approx(0.0, abs=1e-12)
    assert a["pair_change_lo"].item() == pytest.approx(0.01)


def test_top1_hits_average_to_the_summary_p_at_1():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(2, 9, 6, generator=gen)
    tgt = src + 0.8 * torch.randn(2, 9, 6, generator=gen)
    gold = gold_of(9, [(1, 4)])
    hits = top1_hits(src, tgt, gold, csls_k=3)
    summary = alignment_summary(src, tgt, gold, n_boot=5, csls_k=3)
    assert set(hits) == set(RETRIEVALS)
    for kind, h in hits.items():
        assert h.shape == (2, 9) and h.dtype == torch.bool
        assert h.double().mean(-1).tolist() == pytest.approx(summary[f"p_at_1_{kind}"])


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
    assert verdict["label"] == "raw cosine rose but the space collapsed"
    assert figures["change"]["abs_change"][0] > 0.2 and figures["change"]["p"][0] < 1e-10


def test_only_translation_pairs_moving_closer_is_alignment():
    src, tgt, _ = _pairs_with_noise(80, 32, 1.5, seed=6)
    post = (src, unit(tgt + 1.0 * src))  # each target moves towards its own source only
    figures, _, _ = compare((src, tgt), post, gold_of(80), EvalConfig(n_boot=200))
    verdict = figures["verdicts"][0]
    assert verdict["code"] == "improved", verdict["reason"]
    assert verdict["label"] == "alignment improved"
    assert figures["bootstrap"]["margin_change_lo"][0] > 0


def test_unchanged_vectors_are_no_change():
    src, tgt, _ = _pairs_with_noise(30, 16, 1.0, seed=7)
    figures, _, _ = compare((src, tgt), (src.clone(), tgt.clone()), gold_of(30), QUICK)
    assert figures["verdicts"][0]["code"] == "none"
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


# --- the verdict rules -----------------------------------------------------------------------


def figs(**kw):
    base = dict(
        pair_pre=0.377,
        pair_post=0.377,
        pair_p=1.0,
        pair_log10_p=0.0,
        baseline_pre=0.350,
        baseline_post=0.350,
        margin_pre=0.027,
        margin_post=0.027,
        margin_change_lo=-0.01,
        margin_change_hi=0.01,
        p1_pre=0.016,
        p1_post=0.016,
        p1_lost=3,
        p1_gained=3,
        p1_p=1.0,
    )
    base.update(kw)
    base["margin_pre"] = base["pair_pre"] - base["baseline_pre"]
    base["margin_post"] = base["pair_post"] - base["baseline_post"]
    return VerdictFigures(**base)


def test_verdict_on_the_papers_collapse():
    # docs/design.md, fact 2: 0.377 -> 0.554 on pairs, 0.350 -> 0.546 on mismatched pairs.
    fig = figs(
        pair_post=0.554,
        baseline_post=0.546,
        pair_p=0.0,
        pair_log10_p=-412.3,
        margin_change_lo=-0.022,
        margin_change_hi=-0.014,
    )
    v = decide(fig)
    assert v.code == "collapsed" and v.label == VERDICTS["collapsed"]
    assert "p = 5.0e-413" in v.reason and "111% of the pair change" in v.reason
    assert "McNemar p = 1.000" in v.reason


def test_verdict_improved_needs_margin_and_p_at_1():
    up = dict(pair_post=0.45, baseline_post=0.36, pair_p=1e-9, margin_change_lo=0.02)
    assert decide(figs(**up, p1_post=0.1, p1_gained=40, p1_lost=2, p1_p=1e-9)).code == "improved"
    # margin up, P@1 not significantly up
    assert decide(figs(**up, p1_post=0.02, p1_gained=5, p1_lost=2, p1_p=0.45)).code == "none"
    # P@1 up, margin CI includes 0
    no_margin = dict(up, margin_change_lo=-0.001)
    assert decide(figs(**no_margin, p1_gained=40, p1_lost=2, p1_p=1e-9)).code == "none"
    # improved wins over collapsed when both hold
    both = dict(pair_post=0.55, baseline_post=0.50, pair_p=1e-9, margin_change_lo=0.01)
    assert decide(figs(**both, p1_gained=40, p1_lost=2, p1_p=1e-9)).code == "improved"


def test_verdict_collapse_ratio_boundary():
    rise = dict(pair_post=0.477, pair_p=1e-6, margin_change_lo=-0.05, margin_change_hi=0.2)
    assert decide(figs(**rise, baseline_post=0.400)).code == "collapsed"  # share 0.50
    assert decide(figs(**rise, baseline_post=0.399)).code == "none"  # share 0.49
    assert decide(figs(**rise, baseline_post=0.399), collapse_ratio=0.4).code == "collapsed"
    # not significant: never a collapse
    assert decide(figs(**dict(rise, pair_p=0.2), baseline_post=0.45)).code == "none"


def test_verdict_worsened_and_nan():
    down = dict(pair_post=0.30, pair_p=1e-5, margin_change_lo=-0.08, margin_change_hi=-0.02)
    assert decide(figs(**down, p1_gained=1, p1_lost=30, p1_p=1e-7)).code == "worsened"
    assert decide(figs(**down, p1_gained=1, p1_lost=3, p1_p=0.6)).code == "none"
    nan = float("nan")
    assert decide(figs(pair_p=nan, margin_change_lo=nan, margin_change_hi=nan)).code == "none"


# --- end to end on a tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    loaded = load_model(ModelConfig(str(tiny_model_dir)), max_layer=2)
    out = tmp_path_factory.mktemp("train")
    train(loaded, TRAINED, TrainConfig(layer=2, **FAST), out / "run", progress=False)
    return out / "run" / "final"


@pytest.fixture(scope="module")
def gemma_adapter_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gemma")
    tiny_model("gemma3_text", layers=4).save_pretrained(path / "model")
    tiny_tokenizer("left").save_pretrained(path / "model")
    loaded = load_model(ModelConfig(str(path / "model")), max_layer=1)
    train(loaded, TRAINED[:4], TrainConfig(layer=1, **FAST), path / "run", progress=False)
    return path / "run" / "final"


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
        assert s["n"] == n and data["verdicts"][name]["label"] in VERDICTS.values()
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
        "P@1 s2t_nn",
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
    # read back
    loaded = EvalResult.load(out)
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


# --- the command line ------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = cli.main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def pair_files(tmp_path):
    write_pairs(TRAINED, tmp_path / "trained.tsv")
    write_pairs(CONTROL, tmp_path / "control.tsv")
    return tmp_path / "trained.tsv", tmp_path / "control.tsv"


def set_args(tmp_path):
    trained, control = pair_files(tmp_path)
    return ["--pairs", trained, "--control", control]


def test_cli_end_to_end(capsys, adapter_dir, tmp_path):
    trained, control = pair_files(tmp_path)
    out = tmp_path / "eval"
    # --model defaults to the model the adapter records
    code, stdout, err = run_cli(
        capsys, "--adapter", adapter_dir, "--pairs", trained, "--control", control,
        "--out", out, "--n-boot", 50, "--n-examples", 2,
    )  # fmt: skip
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("trained (layer 4): ") and lines[1].startswith("control (layer 4): ")
    assert any(line.startswith("| trained | 9 | ") for line in lines)
    assert "wrote" in lines[-1]
    data = json.loads((out / "evaluation.json").read_text())
    assert data["config"]["n_boot"] == 50 and data["config"]["n_examples"] == 2


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tli: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def _copy(adapter_dir, tmp_path, name="adapter"):
    path = tmp_path / name
    shutil.copytree(adapter_dir, path)
    return path


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_cli_missing_adapter(capsys, tiny_model_dir, tmp_path):
    sets = set_args(tmp_path)
    code, _, err = run_cli(
        capsys, "--model", tiny_model_dir, "--adapter", tmp_path / "nope", *sets,
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert_one_line_error(code, err, "nope", "no such directory")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_cli_adapter_without_its_files(capsys, adapter_dir, tiny_model_dir, tmp_path, missing):
    path = _copy(adapter_dir, tmp_path)
    (path / missing).unlink()
    sets = set_args(tmp_path)
    code, _, err = run_cli(
        capsys, "--model", tiny_model_dir, "--adapter", path, *sets,
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert_one_line_error(code, err, missing, "is missing")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_cli_corrupted_weights(capsys, adapter_dir, tiny_model_dir, tmp_path, damage):
    path = _copy(adapter_dir, tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 9 if damage == "garbage" else data[: len(data) // 2])
    sets = set_args(tmp_path)
    code, _, err = run_cli(
        capsys, "--model", tiny_model_dir, "--adapter", path, *sets,
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert_one_line_error(code, err, "adapter_model.safetensors is corrupted")


def test_cli_adapter_of_another_model(capsys, gemma_adapter_dir, tiny_model_dir, tmp_path):
    sets = set_args(tmp_path)
    code, _, err = run_cli(
        capsys, "--model", tiny_model_dir, "--adapter", gemma_adapter_dir, *sets,
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert_one_line_error(code, err, "was trained on model", str(tiny_model_dir), "tiny-gemma")


def test_cli_adapter_of_another_architecture(capsys, gemma_adapter_dir, tiny_model_dir, tmp_path):
    # Names made to agree: the recorded architecture still tells them apart.
    path = _copy(gemma_adapter_dir, tmp_path)
    _edit_json(path / "adapter_config.json", base_model_name_or_path=str(tiny_model_dir))
    _edit_json(path / "tli_adapter.json", model=str(tiny_model_dir))
    sets = set_args(tmp_path)
    code, _, err = run_cli(capsys, "--adapter", path, *sets, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "model_type 'gemma3_text'", "'llama'")


def test_cli_adapter_of_another_depth(capsys, adapter_dir, tiny_model_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    _edit_json(path / "tli_adapter.json", num_layers=30)
    sets = set_args(tmp_path)
    code, _, err = run_cli(capsys, "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "num_layers 30", "has num_layers 4")


def test_cli_adapter_with_wrong_shapes(capsys, adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    key = next(k for k in weights if "q_proj.lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0], 48)
    save_file(weights, path / "adapter_model.safetensors")
    sets = set_args(tmp_path)
    code, _, err = run_cli(capsys, "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "q_proj.lora_A.weight has shape [16, 48]", "takes 32 inputs")


def test_cli_adapter_with_a_module_the_model_lacks(capsys, adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    weights = {k.replace("layers.1.", "layers.7."): v for k, v in weights.items()}
    save_file(weights, path / "adapter_model.safetensors")
    sets = set_args(tmp_path)
    code, _, err = run_cli(capsys, "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "model.layers.7.self_attn", "does not have")


def test_cli_adapter_weights_its_config_does_not_use(capsys, adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    _edit_json(path / "adapter_config.json", target_modules=["q_proj"])
    sets = set_args(tmp_path)
    code, _, err = run_cli(capsys, "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "v_proj", "evaluated only in part")


def test_cli_nan_weights(capsys, adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    key = next(iter(weights))
    weights[key][0, 0] = math.nan
    save_file(weights, path / "adapter_model.safetensors")
    sets = set_args(tmp_path)
    code, _, err = run_cli(capsys, "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "NaN or infinity")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--n-boot", "0"], ["n_boot must be an integer >= 1"]),
        (["--alpha", "1.5"], ["alpha must be in (0, 1)"]),
        (["--collapse-ratio", "0"], ["collapse_ratio must be > 0"]),
        (["--pooling", "max"], ["pooling"]),
    ],
)
def test_cli_bad_options(capsys, adapter_dir, tmp_path, argv, needles):
    sets = set_args(tmp_path)
    try:
        code = cli.main(["evaluate", "--adapter", str(adapter_dir), *map(str, sets), *argv])
    except SystemExit as exc:  # argparse rejects the value itself
        code = exc.code
    _, err = capsys.readouterr()
    assert code == 2
    assert any(n in err for n in needles), err


def test_a_set_of_one_pair_is_an_error(capsys, adapter_dir, tmp_path):
    trained, _ = pair_files(tmp_path)
    write_pairs(CONTROL[:1], tmp_path / "one.tsv")
    code, _, err = run_cli(
        capsys, "--adapter", adapter_dir, "--pairs", trained, "--control", tmp_path / "one.tsv",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(code, err, "set 'control' has 1 pair")


def test_read_adapter_accepts_only_directories(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TLIError, match="is not a directory"):
        read_adapter(tmp_path / "file")
