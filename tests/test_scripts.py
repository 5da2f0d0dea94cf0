"""scripts/lm_ceiling.py: the cached candidate scoring equals scoring each full sequence."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, tiny_model, tiny_tokenizer

SCRIPT = ROOT / "scripts" / "lm_ceiling.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("lm_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("llama", {}), ("gemma3_text", {"final_logit_softcapping": 3.0})],  # a cap that bites
)
def test_candidate_scores_match_full_sequences(model_type, overrides):
    lm = SimpleNamespace(model=tiny_model(model_type, **overrides), tokenizer=tiny_tokenizer())
    prefix, cands = "sw: jicho\nen:", ["eye", "a hand", "ox"]
    with torch.no_grad():
        got = _load_script().candidate_scores(lm, prefix, cands)
        want = []
        n = len(lm.tokenizer(prefix).input_ids)
        for c in cands:
            ids = lm.tokenizer(prefix + " " + c, return_tensors="pt").input_ids
            logp = lm.model(ids).logits.float().log_softmax(-1)[0, n - 1 : -1]
            want.append(logp.gather(1, ids[0, n:, None]).mean())
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_frontier_averages_each_cell_over_its_seeds(tmp_path):
    import json

    spec = importlib.util.spec_from_file_location("frontier", ROOT / "scripts" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    seeds = [(0.1, 0.5, 0.02, 0.04), (0.3, 0.7, 0.06, 0.0)]
    for seed, (control, trained, sw, en) in enumerate(seeds):
        cell = tmp_path / "cells" / f"objective=a__seed={seed}"
        cell.mkdir(parents=True)
        record = {
            "axes": {"objective": "a", "seed": seed},
            "post": {"p_at_1_s2t_centered": control},
            "trained": {"post": {"p_at_1_s2t_centered": trained}},
            "perplexity": {"sw": {"change": sw}, "en": {"change": en}},
        }
        (cell / "cell.json").write_text(json.dumps(record))
    (point,) = frontier.cell_points(tmp_path)
    assert point["label"] == "objective=a" and point["seeds"] == 2
    assert point["control"] == pytest.approx(0.2) and point["trained"] == pytest.approx(0.6)
    assert point["ppl"] == pytest.approx(0.05)  # the larger language per seed, then the mean
    assert "validation" not in point
    frontier.main([str(tmp_path), "--out", str(tmp_path / "f.png"), "--mark", "objective=a"])
    assert (tmp_path / "f.png").stat().st_size > 0
