import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tli.embed import pooled_via_full_forward, tokenize
from tli.errors import TLIError
from tli.losses import triplet_hardest
from tli.models import ModelConfig, load_model
from tli.pairs import Pair
from tli.train import TrainConfig, batch_gold, batches_for_epoch, lora_config, train

from conftest import WORDS, assert_user_error, tiny_model, tiny_tokenizer

PAIRS = [Pair(s, t) for s, t in WORDS[:-2]] + [
    Pair("bahari", "sea", alternatives=("ocean",)),
    Pair("mkate", "bread"),
]
FAST = dict(epochs=2, batch_size=4, warmup_steps=2, lr=5e-3, save_every=0)


def adapter(path):
    return load_file(path / "adapter_model.safetensors")


def assert_same_adapter(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= tol, key


def test_trains_and_writes_peft_adapter(tiny_model_dir, tmp_path):
    loaded = load_model(ModelConfig(str(tiny_model_dir)), max_layer=2)
    cfg = TrainConfig(layer=2, **FAST)
    result = train(loaded, PAIRS, cfg, tmp_path / "run", progress=False)
    out = tmp_path / "run"
    for name in ("train_log.csv", "train.json", "train_config.json", "epoch-1", "epoch-2", "final"):
        assert (out / name).exists(), name
    log_lines = (out / "train_log.csv").read_text().splitlines()
    assert log_lines[0] == "step,epoch,loss,pos_sim,neg_sim,lr"
    assert len(log_lines) == 1 + result.steps == 1 + 2 * 3
    info = json.loads((out / "train.json").read_text())
    assert info["trainable_parameters"] > 0 and info["steps"] == 6
    # Adapters only on blocks below L, and every one of them was trained.
    weights = adapter(out / "final")
    assert weights and all(".layers.0." in k or ".layers.1." in k for k in weights)
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    # The adapter loads with peft onto the full-depth base model and changes layer-2 vectors.
    base = load_model(ModelConfig(str(tiny_model_dir)))
    batch = tokenize(base.tokenizer, ["mtoto", "child"])
    with torch.no_grad():
        before = pooled_via_full_forward(base.model, batch, [2, 4])
        tuned = PeftModel.from_pretrained(base.model, out / "final")
        after = pooled_via_full_forward(tuned, batch, [2, 4])
    assert (before - after).abs().max() > 1e-4


def _reference_training(model, tok, pairs, cfg, steps):
    """The paper's way, written out: full model, output_hidden_states, loss at layer L."""
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, lora_config(cfg, 4, model))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = len(batches_for_epoch(len(pairs), cfg.batch_size, cfg.seed, 0))
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, per_epoch * cfg.epochs)
    done = 0
    for epoch in range(cfg.epochs):
        for index in batches_for_epoch(len(pairs), cfg.batch_size, cfg.seed, epoch):
            if done == steps:
                return model
            texts = [pairs[i].source for i in index] + [pairs[i].target for i in index]
            vec = pooled_via_full_forward(model, tokenize(tok, texts), [cfg.layer])[0]
            b = len(index)
            loss = triplet_hardest(vec[:b], vec[b:], batch_gold(pairs, index), cfg.margin).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
    return model


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_depth_truncated_training_equals_full_model(tmp_path, model_type):
    cfg = TrainConfig(layer=2, **FAST)
    full = _reference_training(
        tiny_model(model_type, 4, seed=1), tiny_tokenizer("right"), PAIRS, cfg, steps=6
    )
    ref = {k: v for k, v in full.state_dict().items() if "lora_" in k}
    cut_model = tiny_model(model_type, 4, seed=1)
    cut_model.model.layers = cut_model.model.layers[:2]
    from tli.models import LoadedModel

    loaded = LoadedModel(
        cut_model, tiny_tokenizer("right"), "tiny", "tiny", num_layers=4, max_layer=2
    )
    train(loaded, PAIRS, cfg, tmp_path / "cut", progress=False)
    got = adapter(tmp_path / "cut" / "final")
    ref = {k.replace(".default", ""): v for k, v in ref.items()}
    assert_same_adapter(got, ref)


def test_adapt_all_layers_gives_the_same_function(tiny_model_dir, tmp_path):
    cfg = TrainConfig(layer=2, **FAST)
    cut = load_model(ModelConfig(str(tiny_model_dir)), max_layer=2)
    train(cut, PAIRS, cfg, tmp_path / "cut", progress=False)
    full = load_model(ModelConfig(str(tiny_model_dir)))
    cfg_all = TrainConfig(layer=2, adapt_all_layers=True, **FAST)
    train(full, PAIRS, cfg_all, tmp_path / "all", progress=False)
    a, b = adapter(tmp_path / "cut" / "final"), adapter(tmp_path / "all" / "final")
    assert any(".layers.3." in k for k in b) and not any(".layers.3." in k for k in a)
    for key in a:  # blocks below L trained identically
        assert (a[key] - b[key]).abs().max() <= 1e-5, key
    for key in b:  # blocks >= L: B stays zero, so the adapter is the identity there
        if key not in a and "lora_B" in key:
            assert b[key].abs().max() == 0


def test_resume_after_interruption_gives_the_same_adapter(tiny_model_dir, tmp_path):
    cfg = TrainConfig(layer=2, epochs=2, batch_size=4, warmup_steps=2, lr=5e-3, save_every=2)
    straight = train(
        load_model(ModelConfig(str(tiny_model_dir)), max_layer=2),
        PAIRS,
        cfg,
        tmp_path / "a",
        progress=False,
    )

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:  # mid-epoch 2; the newest checkpoint is step 4
            raise Killed

    with pytest.raises(Killed):
        train(
            load_model(ModelConfig(str(tiny_model_dir)), max_layer=2),
            PAIRS,
            cfg,
            tmp_path / "b",
            on_step=kill_at_5,
            progress=False,
        )
    assert not (tmp_path / "b" / "final").exists()
    with pytest.raises(TLIError, match="already holds a training run"):
        train(
            load_model(ModelConfig(str(tiny_model_dir)), max_layer=2),
            PAIRS,
            cfg,
            tmp_path / "b",
            progress=False,
        )
    resumed = train(
        load_model(ModelConfig(str(tiny_model_dir)), max_layer=2),
        PAIRS,
        cfg,
        tmp_path / "b",
        resume=True,
        progress=False,
    )
    assert resumed.steps == straight.steps
    assert_same_adapter(adapter(tmp_path / "a" / "final"), adapter(tmp_path / "b" / "final"), 0)
    assert (tmp_path / "a" / "train_log.csv").read_text() == (
        tmp_path / "b" / "train_log.csv"
    ).read_text()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import tli.losses

    real = tli.losses.triplet_hardest
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        return out._replace(loss=out.loss * math.nan) if calls["n"] == 4 else out

    monkeypatch.setitem(tli.losses.LOSSES, "triplet_hardest", flaky)
    cfg = TrainConfig(layer=2, epochs=2, batch_size=4, warmup_steps=2, save_every=2)
    with pytest.raises(TLIError, match="at step 4 .*step-3"):
        train(
            load_model(ModelConfig(str(tiny_model_dir)), max_layer=2),
            PAIRS,
            cfg,
            tmp_path / "run",
            progress=False,
        )
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"batch_size": 1}, "batch_size must be >= 2"),
        ({"lr": 0.0}, "lr must be >"),
        ({"epochs": 0}, "epochs must be >="),
        ({"margin": -1.0}, "margin must be >="),
        ({"loss": "nope"}, "unknown loss"),
        ({"pooling": "max"}, "pooling must be one of"),
        ({"lora_dropout": 1.5}, "lora_dropout must be <="),
        ({"loss_layers": ("top",)}, "loss_layers: 'top' is not"),
        ({"loss_layers": (0,)}, "loss_layers: layer 0 has no block"),
        ({"loss_layers": ("final", "final")}, "loss_layers lists a layer twice"),
        ({"loss_weights": (1.0, 2.0)}, "loss_weights has 2 value"),
        ({"loss_layers": ("target", "final"), "loss_weights": (0.0, 0.0)}, "positive sum"),
        ({"center": "sideways"}, "center must be"),
        ({"uniformity_weight": -1.0}, "uniformity_weight must be >="),
        ({"adapt_layers": "3-x"}, "adapt_layers: '3-x'"),
        ({"adapt_layers": "0-1", "adapt_all_layers": True}, "set one of them"),
        ({"prefix_cache": "maybe"}, "prefix_cache must be"),
    ],
)
def test_config_errors_name_the_field(kwargs, needle):
    with pytest.raises(TLIError, match=needle):
        TrainConfig(layer=2, **kwargs)


def test_gold_alternative_is_never_a_negative():
    pairs = [
        Pair("bahari", "sea", alternatives=("ocean",)),
        Pair("bahari kuu", "ocean"),
        Pair("mtoto", "child"),
    ]
    gold = batch_gold(pairs, [0, 1, 2])
    assert gold[0, 1] and gold[0, 0] and not gold[0, 2] and not gold[2, 0]


def test_batches_are_seeded_and_cover_every_pair():
    a = batches_for_epoch(11, 4, seed=3, epoch=1)
    assert a == batches_for_epoch(11, 4, seed=3, epoch=1)
    assert a != batches_for_epoch(11, 4, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(11))
    assert all(len(b) >= 2 for b in batches_for_epoch(9, 4, seed=0, epoch=0))


@pytest.mark.slow
def test_two_processes_with_global_negatives_match_one_process(tiny_model_dir, tmp_path):
    """accelerate, 2 CPU processes x 3 pairs: negatives come from the global batch of 6."""
    import os
    import subprocess
    import sys

    from tli.pairs import write_pairs

    write_pairs(PAIRS, tmp_path / "pairs.tsv")
    common = [
        "--model",
        str(tiny_model_dir),
        "--pairs",
        str(tmp_path / "pairs.tsv"),
        "--layer",
        "2",
        "--epochs",
        "2",
        "--lr",
        "5e-3",
        "--warmup-steps",
        "2",
        "--lora-dropout",
        "0",
        "--save-every",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "tli",
        "train",
    ]
    proc = subprocess.run(
        launch + common + ["--batch-size", "3", "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((tmp_path / "two" / "train.json").read_text())
    assert info["processes"] == 2
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "tli",
            "train",
            *common,
            "--batch-size",
            "6",
            "--out",
            str(tmp_path / "one"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert_same_adapter(
        adapter(tmp_path / "one" / "final"), adapter(tmp_path / "two" / "final"), 1e-4
    )


def test_plan_resolves_layers_and_adapters():
    from tli.train import plan

    paper = plan(TrainConfig(layer=2), 4)
    assert paper.loss_layers == (2,) and paper.adapt == (0, 1) and paper.load_depth == 2
    both = plan(TrainConfig(layer=2, loss_layers="target,final"), 4)
    assert both.loss_layers == (2, 4) and both.loss_weights == (0.5, 0.5)
    assert both.adapt == (0, 1, 2, 3) and both.load_depth is None
    upper = plan(TrainConfig(loss_layers=("final",), adapt_layers="2,3"), 4)
    assert upper.first_adapted == 2 and upper.load_depth is None
    assert plan(TrainConfig(loss_layers=("final",), adapt_layers="last:2"), 4).adapt == (2, 3)
    assert plan(TrainConfig(loss_layers=(3,), adapt_layers="0-2"), 4).load_depth == 3
    with pytest.raises(TLIError, match="adapt_layers: block 2 is at or above"):
        plan(TrainConfig(layer=2, adapt_layers="1-3"), 4)
    with pytest.raises(TLIError, match="layer 2 has no adapted block below it"):
        plan(TrainConfig(layer=2, loss_layers="target,final", adapt_layers="2-3"), 4)
    with pytest.raises(TLIError, match="loss_layers: layer 7 is outside"):
        plan(TrainConfig(loss_layers=(7,)), 4)
    with pytest.raises(TLIError, match="adapt_layers: block 9 is outside"):
        plan(TrainConfig(loss_layers=("final",), adapt_layers="9"), 4)
    with pytest.raises(TLIError, match="target layer is not set"):
        plan(TrainConfig(loss_layers=("target",)), 4)


def test_two_loss_layers_train_all_blocks_below_the_deepest(tiny_model_dir, tmp_path):
    loaded = load_model(ModelConfig(str(tiny_model_dir)))
    cfg = TrainConfig(
        layer=2,
        loss_layers="target,final",
        loss="info_nce",
        center="batch",
        uniformity_weight=0.1,
        **FAST,
    )
    train(loaded, PAIRS, cfg, tmp_path / "run", progress=False)
    weights = adapter(tmp_path / "run" / "final")
    assert all(any(f".layers.{i}." in k for k in weights) for i in range(4))
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    meta = json.loads((tmp_path / "run" / "final" / "tli_adapter.json").read_text())
    assert meta["layer"] == 4 and meta["loss_layers"] == [2, 4] and meta["target_layer"] == 2
    with pytest.raises(TLIError, match="the final layer needs 4"):
        train(
            load_model(ModelConfig(str(tiny_model_dir)), max_layer=2),
            PAIRS,
            cfg,
            tmp_path / "cut",
            progress=False,
        )


def test_running_centre_resumes_exactly(tiny_model_dir, tmp_path):
    cfg = TrainConfig(
        layer=2,
        loss="info_nce",
        center="running",
        epochs=2,
        batch_size=4,
        warmup_steps=2,
        lr=5e-3,
        save_every=2,
    )
    train(
        load_model(ModelConfig(str(tiny_model_dir)), max_layer=2),
        PAIRS,
        cfg,
        tmp_path / "a",
        progress=False,
    )

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(
            load_model(ModelConfig(str(tiny_model_dir)), max_layer=2),
            PAIRS,
            cfg,
            tmp_path / "b",
            on_step=kill_at_5,
            progress=False,
        )
    train(
        load_model(ModelConfig(str(tiny_model_dir)), max_layer=2),
        PAIRS,
        cfg,
        tmp_path / "b",
        resume=True,
        progress=False,
    )
    assert_same_adapter(adapter(tmp_path / "a" / "final"), adapter(tmp_path / "b" / "final"), 0)



# --- damaged checkpoints ----------------------------------------------------------------------


class Killed(Exception):
    pass


def _killed_at_5(tiny_model_dir, out):
    """A training (save_every 2, 3 steps an epoch) killed at step 5: checkpoints step-3 (the
    end of epoch 1) and step-4 on disk."""
    cfg = TrainConfig(layer=2, epochs=2, batch_size=4, warmup_steps=2, lr=5e-3, save_every=2)

    def kill_at_5(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(load_model(ModelConfig(str(tiny_model_dir)), max_layer=2), PAIRS, cfg, out,
              on_step=kill_at_5, progress=False)  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory):
    """The uninterrupted training the resumed ones are compared with."""
    out = tmp_path_factory.mktemp("straight") / "a"
    cfg = TrainConfig(layer=2, epochs=2, batch_size=4, warmup_steps=2, lr=5e-3, save_every=2)
    train(load_model(ModelConfig(str(tiny_model_dir)), max_layer=2), PAIRS, cfg, out,
          progress=False)  # fmt: skip
    return out


def _resume(tiny_model_dir, out, cfg):
    return train(load_model(ModelConfig(str(tiny_model_dir)), max_layer=2), PAIRS, cfg, out,
                 resume=True, progress=False)  # fmt: skip


def test_the_previous_checkpoint_is_kept(tiny_model_dir, tmp_path):
    _killed_at_5(tiny_model_dir, tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names == ["latest", "step-3", "step-4"]


def test_a_damaged_checkpoint_falls_back_to_the_one_before(
    tiny_model_dir, tmp_path, straight_run, caplog
):
    """state.pt cut to 1 KB: the resume warns, naming the file, and continues from the
    checkpoint before it, to the same adapter as an uninterrupted training."""
    out = tmp_path / "b"
    cfg = _killed_at_5(tiny_model_dir, out)
    state = out / "checkpoints" / "step-4" / "state.pt"
    state.write_bytes(state.read_bytes()[:1024])
    with caplog.at_level("WARNING", logger="tli"):
        _resume(tiny_model_dir, out, cfg)
    assert f"{state}: damaged checkpoint" in caplog.text and "from step-3 instead" in caplog.text
    assert_same_adapter(adapter(straight_run / "final"), adapter(out / "final"), 0)
    assert (straight_run / "train_log.csv").read_text() == (out / "train_log.csv").read_text()


def test_a_malicious_checkpoint_is_refused_without_running_it(run_cli, tiny_model_dir, tmp_path):
    """state.pt holding a pickle that would run a command: weights_only refuses it; with no
    intact checkpoint left, the resume is one line naming the file."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    out = tmp_path / "b"
    _killed_at_5(tiny_model_dir, out)
    torch.save({"step": Evil()}, out / "checkpoints" / "step-4" / "state.pt")
    (out / "checkpoints" / "step-3" / "state.pt").write_bytes(b"")
    code, _, err = run_cli("train", "--resume", out)
    assert_user_error(code, err, f"{out}/checkpoints/step-4/state.pt: damaged checkpoint",
                      "holds objects other than tensors", "1 older checkpoint(s) are damaged")
    assert not (tmp_path / "pwned").exists()


def test_latest_naming_a_missing_checkpoint_resumes_from_the_newest(
    tiny_model_dir, tmp_path, straight_run, caplog
):
    out = tmp_path / "b"
    cfg = _killed_at_5(tiny_model_dir, out)
    (out / "checkpoints" / "latest").write_text("step-99\n")
    with caplog.at_level("WARNING", logger="tli"):
        result = _resume(tiny_model_dir, out, cfg)
    assert "names 'step-99', which is missing" in caplog.text
    assert result.steps == 6
    assert_same_adapter(adapter(straight_run / "final"), adapter(out / "final"), 0)


def test_check_pairs_refuses_a_list_without_negatives():
    from tli.train import check_pairs

    with pytest.raises(TLIError, match="f.tsv: training needs at least 2 pairs, got 1"):
        check_pairs([Pair("a", "x")], "f.tsv")
    with pytest.raises(TLIError, match="f.tsv: .*training has no negatives"):
        check_pairs([Pair("a", "x"), Pair("b", "x"), Pair("c", "x")], "f.tsv")
    check_pairs([Pair("a", "x"), Pair("b", "y")])

# --- tli train: bad input ---------------------------------------------------------------------


def test_train_resume_with_a_damaged_config(run_cli, tmp_path):
    (tmp_path / "train_config.json").write_text("{garbage")
    code, _, err = run_cli("train", "--resume", tmp_path)
    assert_user_error(code, err, "train_config.json")


def test_train_unknown_target_module(run_cli, tmp_path, tiny_model_dir, inputs):
    code, _, err = run_cli("train", "--model", tiny_model_dir, "--pairs",
                           inputs / "pairs.tsv", "--layer", "2", "--target-modules", "nope",
                           "--out", tmp_path / "t")  # fmt: skip
    assert_user_error(code, err, "target_modules", "nope")


def test_train_checks_its_out_directory_before_loading_the_model(
    run_cli, monkeypatch, tiny_model_dir, inputs
):
    import tli.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(tli.models, "load_model", never)
    code, _, err = run_cli("train", "--model", tiny_model_dir, "--pairs", inputs / "pairs.tsv",
                           "--layer", "2", "--out", inputs / "afile")  # fmt: skip
    assert_user_error(code, err, "afile")


def _text_drift(base_dir, adapter_dir, texts):
    """state_drift of the final-layer states on ``texts``: tuned vs base (no grad)."""
    from tli.embed import hidden_states
    from tli.losses import state_drift

    base = load_model(ModelConfig(str(base_dir)))
    enc = tokenize(base.tokenizer, texts)
    n = base.num_layers
    with torch.no_grad():
        ref = hidden_states(base.model, enc["input_ids"], enc["attention_mask"], [n], num_layers=n)
        tuned = PeftModel.from_pretrained(base.model, adapter_dir)
        now = hidden_states(tuned, enc["input_ids"], enc["attention_mask"], [n], num_layers=n)
    return float(state_drift(now[n], ref[n], enc["attention_mask"]))


def test_preservation_term_holds_the_states_of_running_text(tiny_model_dir, tmp_path):
    from tli.train import load_depth, preserve_texts

    texts = tmp_path / "texts.txt"
    sentences = ["the cat sat on the mat", "we walk to the market", "rain falls at night",
                 "she reads a book", "mtoto anacheza nje", "mama anapika chakula"]  # fmt: skip
    texts.write_text("\n".join(sentences) + "\n")
    drift = {}
    for weight in (0.0, 100.0):
        cfg = TrainConfig(
            layer=2, loss="info_nce", preserve_weight=weight, preserve_texts=str(texts),
            preserve_batch=3, **FAST,
        )  # fmt: skip
        depth = load_depth(cfg, 4)
        assert depth == (None if weight else 2)  # the term reads the final layer
        loaded = load_model(ModelConfig(str(tiny_model_dir)), max_layer=depth)
        train(loaded, PAIRS, cfg, tmp_path / f"w{weight}", progress=False)
        drift[weight] = _text_drift(tiny_model_dir, tmp_path / f"w{weight}" / "final", sentences)
        meta = json.loads((tmp_path / f"w{weight}" / "final" / "tli_adapter.json").read_text())
        assert meta["preserve_weight"] == weight
    # The preserving run loads the full model (the final layer) yet adapts only blocks below L.
    weights = adapter(tmp_path / "w100.0" / "final")
    assert all(".layers.0." in k or ".layers.1." in k for k in weights)
    assert 0 < drift[100.0] < 0.5 * drift[0.0], drift
    assert preserve_texts(str(texts)) == sentences


def test_preservation_texts_errors_and_bundled_ones(tmp_path):
    from tli.perplexity import load_texts
    from tli.train import preserve_texts

    bundled = preserve_texts()
    measured = {line for lines in load_texts().values() for line in lines}
    assert len(bundled) >= 80 and not set(bundled) & measured
    bad = tmp_path / "bad.txt"
    bad.write_text("one sentence\n\nanother\n")
    with pytest.raises(TLIError, match=r"bad.txt: line 2 is blank"):
        preserve_texts(str(bad))
    with pytest.raises(TLIError, match=r"missing.txt: cannot read"):
        preserve_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(TLIError, match="preserve_weight"):
        TrainConfig(preserve_weight=-1.0)


def test_lexicon_negatives_train_sources_against_the_frozen_targets(tiny_model_dir, tmp_path):
    import csv

    from tli.embed import embed_strings
    from tli.metrics import centered_report
    from tli.pairs import gold_mask

    cfg = TrainConfig(
        layer=2, loss="info_nce", negatives="lexicon", center="batch", temperature=0.1,
        **{**FAST, "epochs": 6},
    )  # fmt: skip
    loaded = load_model(ModelConfig(str(tiny_model_dir)), max_layer=2)
    train(loaded, PAIRS, cfg, tmp_path / "run", progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "train_log.csv").open()))
    first = sum(float(r["loss"]) for r in rows[:3]) / 3
    last = sum(float(r["loss"]) for r in rows[-3:]) / 3
    assert last < first
    meta = json.loads((tmp_path / "run" / "final" / "tli_adapter.json").read_text())
    assert meta["negatives"] == "lexicon"
    # Source words retrieve the frozen model's targets better than before training.
    base = load_model(ModelConfig(str(tiny_model_dir)), max_layer=2)
    sources, targets = [p.source for p in PAIRS], [p.target for p in PAIRS]
    bank = embed_strings(base.model, base.tokenizer, targets, [2], num_layers=4)[0]
    before = embed_strings(base.model, base.tokenizer, sources, [2], num_layers=4)[0]
    tuned = PeftModel.from_pretrained(base.model, tmp_path / "run" / "final")
    after = embed_strings(tuned, base.tokenizer, sources, [2], num_layers=4)[0]
    gold = gold_mask(PAIRS)
    mrr = [float(centered_report(v, bank, gold)["mrr_centered"]) for v in (before, after)]
    assert mrr[1] > mrr[0]
    for bad, needle in (
        (dict(loss="triplet_hardest"), "needs loss = info_nce"),
        (dict(loss="info_nce", center="running"), "center = batch or none"),
        (dict(loss="info_nce", negatives="sideways"), "negatives"),
    ):
        with pytest.raises(TLIError, match=needle):
            TrainConfig(**{"negatives": "lexicon", **bad})
def test_hold_targets_keeps_the_adapted_targets_at_their_frozen_vectors(tiny_model_dir, tmp_path):
    """The lexicon bank holds the frozen targets, but an evaluation embeds the targets through
    the adapted model; hold_targets keeps each adapted target retrieving its own frozen vector,
    and the sources retrieve the adapted targets better than without it."""
    from tli.embed import embed_strings
    from tli.metrics import centered_report
    from tli.pairs import gold_mask

    sources, targets = [p.source for p in PAIRS], [p.target for p in PAIRS]
    own, gold = torch.eye(len(PAIRS), dtype=torch.bool), gold_mask(PAIRS)
    held, evaluated = {}, {}
    for hold in (0.0, 5.0):
        cfg = TrainConfig(
            layer=2, loss="info_nce", negatives="lexicon", center="batch", temperature=0.1,
            hold_targets=hold, **{**FAST, "epochs": 6},
        )  # fmt: skip
        train(load_model(ModelConfig(str(tiny_model_dir)), max_layer=2), PAIRS, cfg,
              tmp_path / f"h{hold}", progress=False)  # fmt: skip
        base = load_model(ModelConfig(str(tiny_model_dir)), max_layer=2)
        bank = embed_strings(base.model, base.tokenizer, targets, [2], num_layers=4)[0]
        tuned = PeftModel.from_pretrained(base.model, tmp_path / f"h{hold}" / "final")
        post_t = embed_strings(tuned, base.tokenizer, targets, [2], num_layers=4)[0]
        post_s = embed_strings(tuned, base.tokenizer, sources, [2], num_layers=4)[0]
        held[hold] = float(centered_report(post_t, bank, own)["mrr_centered"])
        evaluated[hold] = float(centered_report(post_s, post_t, gold)["mrr_centered"])
        meta = json.loads((tmp_path / f"h{hold}" / "final" / "tli_adapter.json").read_text())
        assert meta["hold_targets"] == hold
    # measured: own-vector MRR 0.958 -> 1.0; source -> adapted target MRR 0.484 -> 0.520
    assert held[0.0] < 1.0 and held[5.0] == 1.0, held
    assert evaluated[5.0] > evaluated[0.0], evaluated
    with pytest.raises(TLIError, match="hold_targets needs negatives = lexicon"):
        TrainConfig(loss="info_nce", hold_targets=1.0)


# --- training curves: trackers ----------------------------------------------------------------


def test_report_to_tensorboard_writes_the_curves_into_the_training_directory(
    run_cli, tmp_path, tiny_model_dir, inputs
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "t"
    code, _, err = run_cli("train", "--model", tiny_model_dir, "--pairs", inputs / "pairs.tsv",
                           "--layer", "2", "--epochs", "2", "--batch-size", "8",
                           "--warmup-steps", "2", "--report-to", "tensorboard",
                           "--out", out)  # fmt: skip
    assert code == 0, err
    (logdir,) = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")
                 if p.parent.name == "tli"}  # fmt: skip
    events = EventAccumulator(str(logdir))
    events.Reload()
    rows = (out / "train_log.csv").read_text().splitlines()[1:]
    log = [dict(zip(("step", "epoch", "loss", "pos_sim", "neg_sim", "lr"), r.split(","),
                    strict=True)) for r in rows]  # fmt: skip
    assert {"loss", "pos_sim", "neg_sim", "lr", "epoch"} <= set(events.Tags()["scalars"])
    for tag in ("loss", "pos_sim", "neg_sim", "lr", "epoch"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [int(r["step"]) for r in log]
        assert [s.value for s in scalars] == pytest.approx([float(r[tag]) for r in log],
                                                            rel=1e-6)  # fmt: skip


def test_an_unknown_or_missing_tracker_is_one_line_before_any_model_loads(
    run_cli, monkeypatch, tmp_path, tiny_model_dir, inputs
):
    import importlib.util

    import tli.models

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the tracker was checked")

    monkeypatch.setattr(tli.models, "load_model", never)
    common = ["--model", tiny_model_dir, "--pairs", inputs / "pairs.tsv"]
    code, _, err = run_cli("train", *common, "--layer", "2", "--report-to", "neptune",
                           "--out", tmp_path / "t")  # fmt: skip
    assert_user_error(code, err, "--report-to", "neptune", "none, tensorboard, mlflow, wandb")
    code, _, err = run_cli("run", *common, "--report-to", "neptune", "--out", tmp_path / "r")
    assert_user_error(code, err, "report_to must be one of", "neptune")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    code, _, err = run_cli("train", *common, "--layer", "2", "--report-to", "wandb",
                           "--out", tmp_path / "t")  # fmt: skip
    assert_user_error(code, err, "report_to wandb", "package wandb is not installed",
                      "pip install wandb")  # fmt: skip
    code, _, err = run_cli("run", *common, "--report-to", "wandb", "--out", tmp_path / "r")
    assert_user_error(code, err, "package wandb is not installed")
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists()


def test_adapters_carry_a_model_card_for_every_epoch(tiny_model_dir, tmp_path):
    from huggingface_hub import ModelCard

    loaded = load_model(ModelConfig(str(tiny_model_dir)), max_layer=2)
    card = {"languages": ["Swahili", "English"], "command": "tli train --layer 2",
            "data": {"source": "/data/p.tsv", "sha256": {"p.tsv": "ab" * 32}, "trained": 12}}
    train(loaded, PAIRS, TrainConfig(layer=2, **FAST), tmp_path / "run", progress=False,
          card=card)  # fmt: skip
    for name, epoch in (("epoch-1", 1), ("epoch-2", 2), ("final", 2)):
        path = tmp_path / "run" / name / "README.md"
        loaded_card = ModelCard.load(path)
        assert loaded_card.data.language == ["sw", "en"], name
        assert loaded_card.data.library_name == "peft" and loaded_card.data.base_model
        text = path.read_text()
        assert "[More Information Needed]" not in text and f"epoch {epoch} of 2" in text
        assert "`ab" in text and "| `lora_r` | 16 |" in text and "tli train --layer 2" in text
    meta = json.loads((tmp_path / "run" / "final" / "tli_adapter.json").read_text())
    assert meta["languages"] == ["Swahili", "English"] and meta["train"]["lr"] == FAST["lr"]
    assert meta["training_pairs"]["n"] == len(PAIRS)
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--target-modules", "nope"], "target_modules nope: cannot add adapters"),
        (["--adapt-layers", "3"], "adapt_layers: block 3 is at or above the deepest loss layer"),
        (["--pairs", "{d}/same.tsv"], "training has no negatives"),
        (["--prefix-cache", "on"], "prefix_cache = on needs adapters only on blocks >= K > 0"),
        (["--device", "cuda:0"], "CUDA is not available"),
    ],
)
def test_train_checks_everything_before_loading_the_model(
    run_cli, monkeypatch, tiny_model_dir, inputs, tmp_path, extra, needle
):
    import tli.models

    if torch.cuda.is_available() and "cuda" in needle.lower():
        pytest.skip("this machine has CUDA")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before every check")

    monkeypatch.setattr(tli.models, "load_model", never)
    extra = [e.format(d=inputs) for e in extra]
    code, _, err = run_cli("train", "--model", tiny_model_dir, "--pairs", inputs / "pairs.tsv",
                           "--layer", "2", *extra, "--out", tmp_path / "t")  # fmt: skip
    assert_user_error(code, err, needle)
    assert not (tmp_path / "t").exists()


def test_a_second_train_into_a_live_training_directory_refuses(run_cli, tiny_model_dir, tmp_path):
    """The lock of `tli train`, and of a run whose train/ it would write into."""
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "run" / "train"
    _killed_at_5(tiny_model_dir, out)
    (out / "train_config.json").write_text(json.dumps(
        {**json.loads((out / "train_config.json").read_text()),
         "model": {"name": str(tiny_model_dir)}}))  # fmt: skip
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": sleeper.pid, "host": socket.gethostname(), "command": "train"}
        (out / "run.lock").write_text(json.dumps(holder))
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        code, _, err = run_cli("train", "--resume", out)
        assert_user_error(code, err, f"another tli train (pid {sleeper.pid}) is using this")
        (out / "run.lock").unlink()
        (out.parent / "run.lock").write_text(json.dumps({**holder, "command": "run"}))
        code, _, err = run_cli("train", "--resume", out)
        assert_user_error(code, err, f"{out.parent}: another tli run (pid {sleeper.pid})")
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    code, _, err = run_cli("train", "--resume", out)  # the holder is gone: a stale lock
    assert code == 0, err
    assert not (out / "run.lock").exists() and (out / "final").is_dir()
    assert os.path.exists(out.parent / "run.lock")  # someone else's stale lock: left alone
