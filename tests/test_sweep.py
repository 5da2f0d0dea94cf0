import csv
import json

import pytest

from tli.errors import TLIError
from tli.pairs import Pair, write_pairs
from tli.sweep import mean_ci, parse_grid, read_grid, run_sweep
from tli.verdict import VERDICTS

from conftest import ROOT, WORDS


def _grid(tmp_path, model_dir, extra=""):
    pairs = [Pair(s, t, split="trained") for s, t in WORDS[:8]]
    pairs += [Pair(s, t, split="control") for s, t in WORDS[8:]]
    write_pairs(pairs, tmp_path / "pairs.tsv")
    path = tmp_path / "grid.toml"
    path.write_text(
        f"""
[sweep]
model = "{model_dir}"
pairs = "{tmp_path / "pairs.tsv"}"
n_boot = 50
{extra}

[train]
layer = 2
epochs = 1
batch_size = 4
warmup_steps = 1
lr = 5e-3

[objectives.triplet]
loss = "triplet_hardest"

[objectives.nce_centred]
loss = "info_nce"
center = "batch"
uniformity_weight = 0.1

[grid]
objective = ["triplet", "nce_centred"]
loss_layers = ["target", "final"]
seed = [0, 1]
"""
    )
    return path


def test_sweep_writes_outputs_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    grid = read_grid(_grid(tmp_path, tiny_model_dir))
    assert len(grid.cells) == 8
    cell = grid.cells[0]
    assert cell.train.loss == "triplet_hardest" and cell.train.loss_layers == ("target",)
    out = tmp_path / "sweep"
    records = run_sweep(grid, out)
    assert len(records) == 8
    for name in ("sweep.csv", "sweep.md", "heatmap.png", "base.json", "sweep.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 8 and {"objective", "loss_layers", "seed", "post_margin_lo"} <= set(rows[0])
    assert {"geometry", "retrieval", "collapse", "post_p_at_1_s2t_centered"} <= set(rows[0])
    record = json.loads((out / "cells" / cell.name / "cell.json").read_text())
    findings = record["findings"]
    assert findings["geometry"] in ("rose", "fell", "unchanged") and findings["label"]
    assert record["verdict"] in VERDICTS and isinstance(findings["collapse"], bool)
    assert rows[0]["geometry"] == findings["geometry"]
    md = (out / "sweep.md").read_text()
    assert md.count("\n| ") == 1 + 4  # header + one row per objective x loss_layers
    base = json.loads((out / "base.json").read_text())
    assert all(float(r["pre_p_at_1_s2t_nn"]) == base["p_at_1_s2t_nn"] for r in rows)
    # A re-run trains nothing: every cell is done.
    import tli.train

    def boom(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(tli.train, "train", boom)
    stamp = (out / "base.safetensors").stat().st_mtime_ns
    assert len(run_sweep(grid, out)) == 8
    assert (out / "base.safetensors").stat().st_mtime_ns == stamp  # base figures reused
    # Removing one cell's record re-runs that cell only (from its finished training).
    (out / "cells" / cell.name / "cell.json").unlink()
    assert len(run_sweep(grid, out)) == 8
    # A record of an older tli (no findings, no centred P@1) is evaluated again, not retrained.
    path = out / "cells" / grid.cells[1].name / "cell.json"
    old = json.loads(path.read_text())
    findings, centred = old.pop("findings"), old["post"].pop("p_at_1_s2t_centered")
    path.write_text(json.dumps(old))
    assert len(run_sweep(grid, out)) == 8
    again = json.loads(path.read_text())
    assert again["findings"] == findings and again["post"]["p_at_1_s2t_centered"] == centred


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ({"grid": {}}, r"\[grid\] is empty"),
        ({"grid": {"nope": [1]}}, "unknown axis 'nope'"),
        ({"grid": {"objective": ["x"]}}, r"no \[objectives.x\] table"),
        ({"grid": {"seed": [0]}, "train": {"pooling": "mean"}}, "set it once"),
        ({"grid": {"center": ["sideways"]}}, "center must be"),
        ({"grid": {"seed": [0]}, "sweep": {"metric": "x"}}, "metric must be"),
        ({"grid": {"seed": [0]}, "extra": {}}, "unknown table"),
    ],
)
def test_grid_errors_name_the_key(text, needle):
    with pytest.raises(TLIError, match=needle):
        parse_grid(text)


def test_mean_ci():
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)
    mean, lo, hi = mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and lo < 0.2 < hi


@pytest.mark.slow
def test_parallel_sweep_matches_sequential(tiny_model_dir, tmp_path):
    grid = read_grid(_grid(tmp_path, tiny_model_dir))
    grid.cells[:] = grid.cells[:2]
    one = run_sweep(grid, tmp_path / "one")
    two = run_sweep(grid, tmp_path / "two", jobs=2)
    for a, b in zip(one, two, strict=True):
        assert a["post"]["margin"] == pytest.approx(b["post"]["margin"], abs=1e-5)


EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("sweep-*.toml")), ids=lambda p: p.name)
def test_shipped_grids_parse_and_name_their_command(path):
    grid = read_grid(path)
    assert grid.cells and grid.sweep.model == "gemma-3-270m"
    assert path.read_text().startswith(f"# tli sweep --grid examples/{path.name} --out runs/")


def test_seed_grids_reuse_the_cells_they_extend():
    # a follow-up grid that adds seeds to an earlier round's cell must resolve that cell to the
    # same config, or the sweep would train it again instead of reusing it
    pairs = [
        ("sweep-capacity.toml", "sweep-capacity-seeds.toml"),
        ("sweep-all-blocks.toml", "sweep-aligned-seeds.toml"),
    ]
    for first, seeds in pairs:
        earlier = {c.name: c.train for c in read_grid(EXAMPLES / first).cells}
        shared = [c for c in read_grid(EXAMPLES / seeds).cells if c.name in earlier]
        assert shared, (first, seeds)
        assert all(earlier[c.name] == c.train for c in shared)


def test_validation_split_trains_on_the_rest_and_ranks_on_it(tiny_model_dir, tmp_path):
    from tli.pairs import read_pairs

    path = _grid(tmp_path, tiny_model_dir, "validation = 0.3\nperplexity = true")
    text = path.read_text().replace("seed = [0, 1]", "seed = [0]")
    text = text.replace('loss_layers = ["target", "final"]', 'loss_layers = ["final"]')
    path.write_text(text)
    grid = read_grid(path)
    out = tmp_path / "sweep"
    records = run_sweep(grid, out)
    held = [p for p in read_pairs(out / "validation.tsv") if p.split == "control"]
    kept = [p for p in read_pairs(out / "validation.tsv") if p.split == "trained"]
    assert len(held) == 2 and len(kept) == 6
    held_words = {p.source for p in held}
    for r in records:
        cell_dir = out / "cells" / r["name"] / "train"
        trained_on = {p.source for p in read_pairs(cell_dir / "pairs.tsv")}
        assert trained_on == {p.source for p in kept} and not trained_on & held_words
        assert r["split"] == {
            "validation": 0.3, "validation_seed": 0,
            "trained_pairs": 6, "control_pairs": 4, "validation_pairs": 2,
        }  # fmt: skip
        for name in ("validation", "trained"):
            assert 0 <= r[name]["post"]["p_at_1_s2t_centered"] <= 1
        hits = r["hits_s2t_centered"]
        assert len(hits) == 4 and sum(hits) / 4 == r["post"]["p_at_1_s2t_centered"]
        assert set(r["perplexity"]) == {"sw", "en"}
        change = r["perplexity"]["sw"]
        assert change["lo"] <= change["change"] <= change["hi"] and change["change"] != 0
    base = json.loads((out / "base.json").read_text())
    assert base["validation"] == 2 and set(base["sets"]) == {"trained", "validation", "perplexity"}
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["ranked_by"] == "validation_p_at_1_s2t_nn"
    keys = [(r["validation_p_at_1_s2t_nn"][0], r["margin"][0]) for r in summary["ranked"]]
    assert keys == sorted(keys, reverse=True)
    md = (out / "sweep.md").read_text()
    assert "on the validation split" in md and "| val P@1 centred | trained P@1 centred |" in md
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    wanted = {"validation_p_at_1_s2t_centered", "trained_p_at_1_s2t_centered", "ppl_sw_change"}
    assert wanted <= set(rows[0])
    # Another validation share changes the trained pairs: every cell trains again.
    grid2 = read_grid(path)
    grid2 = type(grid2)(
        sweep=type(grid2.sweep)(**{**grid2.sweep.__dict__, "validation": 0.5}),
        cells=grid2.cells,
        axes=grid2.axes,
    )
    again = run_sweep(grid2, out)
    assert all(r["split"]["validation"] == 0.5 for r in again)
    assert json.loads((out / "base.json").read_text())["validation"] > 2  # recomputed
    for r in again:
        trained_on = read_pairs(out / "cells" / r["name"] / "train" / "pairs.tsv")
        assert len(trained_on) == r["split"]["trained_pairs"] < 6


def test_validation_share_is_checked():
    with pytest.raises(TLIError, match=r"validation must be in \[0, 1\)"):
        parse_grid({"grid": {"seed": [0]}, "sweep": {"validation": 1.5}})
