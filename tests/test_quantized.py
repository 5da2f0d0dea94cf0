"""4-bit NF4 (bitsandbytes on the CPU): load, embed, train, resume, evaluate, probe, adapters.

The paper's setting (an 8B Llama in NF4 with bf16 compute and QLoRA), on tiny random Llama and
Gemma 3 models, so that it runs in CI without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes")

from tli import cli, memory, surgery  # noqa: E402
from tli.adapters import Merged, read_adapter  # noqa: E402
from tli.embed import embed_strings  # noqa: E402
from tli.errors import TLIError  # noqa: E402
from tli.models import ModelConfig, load_model  # noqa: E402
from tli.pairs import Pair, write_pairs  # noqa: E402
from tli.train import TrainConfig, prepare_for_kbit_training, train  # noqa: E402

from conftest import WORDS, tiny_model, tiny_tokenizer  # noqa: E402

PAIRS = [Pair(s, t) for s, t in WORDS]
CONTROL = [Pair("moto", "fire"), Pair("ndege", "bird"), Pair("samaki", "fish")]
FAST = dict(epochs=2, batch_size=4, warmup_steps=2, lr=5e-3, save_every=0)
ARCHS = ["llama", "gemma3_text"]


def nf4(path, **kw):
    """The paper's 4-bit setting: NF4 weights, bf16 compute, everything else in bf16."""
    return ModelConfig(str(path), dtype="bfloat16", load_in_4bit=True, **kw)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny Llama (untied LM head) and a tiny Gemma 3 (tied), saved as model directories."""
    dirs = {}
    for model_type in ARCHS:
        path = tmp_path_factory.mktemp(f"q-{model_type}")
        tied = model_type != "llama"
        tiny_model(model_type, 4, tie_word_embeddings=tied).save_pretrained(path)
        tiny_tokenizer("left").save_pretrained(path)
        dirs[model_type] = path
    return dirs


def linear4bit():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def logical_params(model):
    """Parameters as the unquantized model counts them (a 4-bit weight packs 2 per byte)."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    return total


def storage_bytes(model):
    """Bytes of the weights as stored: 4-bit codes, their float32 block scales, the rest."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


# --- load and embed ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ARCHS)
def test_4bit_load_quantizes_the_blocks_and_embeds_close_to_fp32(model_dirs, model_type):
    path = model_dirs[model_type]
    q = load_model(nf4(path))
    layers = surgery.blocks(q.model)
    assert isinstance(layers[0].self_attn.q_proj, linear4bit())
    assert sum(isinstance(m, linear4bit()) for m in layers.modules()) == 7 * len(layers)
    assert not isinstance(surgery.lm_head(q.model), linear4bit())  # the LM head stays bf16
    assert surgery.input_embeddings(q.model).weight.dtype == torch.bfloat16
    assert q.quantization == {
        "method": "bitsandbytes", "bits": 4, "quant_type": "nf4", "compute_dtype": "bfloat16",
        "double_quant": False,
    }  # fmt: skip
    full = load_model(ModelConfig(str(path)))
    words = [w for pair in WORDS for w in pair]
    a = embed_strings(full.model, full.tokenizer, words, [2, 4], num_layers=4)
    b = embed_strings(q.model, q.tokenizer, words, [2, 4], num_layers=4)
    cos = (a * b).sum(-1).mean(-1)  # (L,) mean cosine per layer; vectors are unit-norm
    report = (
        f"{model_type}: mean cosine of 4-bit to fp32 vectors, layer 2 {cos[0]:.4f}, "
        f"final {cos[1]:.4f}"
    )
    assert cos.min() > 0.9, report  # measured: 0.95-0.995 (docs/design.md, fact 7)
    print(report)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("four_bit", [False, True])
def test_truncated_load_builds_no_lm_head_and_memory_follows_the_kept_blocks(
    model_dirs, model_type, four_bit
):
    path = model_dirs[model_type]
    cfg = nf4(path) if four_bit else ModelConfig(str(path))
    full = load_model(cfg)
    cut = load_model(cfg, max_layer=2)
    assert full.has_lm_head and not cut.has_lm_head and cut.depth == 2
    with pytest.raises(TLIError, match="without its LM head"):
        surgery.lm_head(cut.model)(torch.zeros(1, 32))
    # What a truncated load holds: the embeddings, blocks 0-1 and the final norm, nothing else.
    kept = [surgery.input_embeddings(full.model), *surgery.blocks(full.model)[:2]]
    kept.append(surgery.final_norm(full.model))
    expected = sum(logical_params(m) for m in kept)
    assert logical_params(cut.model) == expected
    fp = memory.footprint(
        full.model.config, cfg.dtype, load_in_4bit=four_bit, max_layer=2, name=str(path)
    )
    assert fp.params == expected and not fp.lm_head
    stored = storage_bytes(cut.model)
    assert abs(stored - fp.bytes) <= 0.01 * fp.bytes, (stored, fp.bytes)
    # The full model holds the LM head on top (its own matrix, or the embeddings when tied).
    head = surgery.lm_head(full.model).weight
    tied = head is surgery.input_embeddings(full.model).weight
    assert tied == (model_type != "llama")
    extra = 0 if tied else head.numel()
    assert logical_params(full.model) == logical_params(
        torch.nn.ModuleList([surgery.input_embeddings(full.model), surgery.blocks(full.model),
                             surgery.final_norm(full.model)])
    ) + extra  # fmt: skip


def test_compute_dtype_and_double_quant_reach_bitsandbytes(model_dirs):
    q = load_model(nf4(model_dirs["llama"], compute_dtype="float32", double_quant=True))
    layer = surgery.blocks(q.model)[0].self_attn.q_proj
    assert layer.compute_dtype == torch.float32
    assert layer.weight.quant_state.nested  # the block scales are quantized too
    assert q.quantization["double_quant"] and q.quantization["compute_dtype"] == "float32"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"double_quant": True}, "double_quant applies to 4-bit weights only"),
        ({"compute_dtype": "float32"}, "compute_dtype float32 applies to 4-bit weights only"),
        ({"load_in_4bit": True, "compute_dtype": "int8"}, "compute_dtype"),
    ],
)
def test_4bit_options_are_checked(kwargs, needle):
    with pytest.raises(TLIError, match=needle):
        ModelConfig("x", **kwargs)


def test_gpt2_conv1d_is_quantized_too(tmp_path):
    """transformers converts GPT-2's Conv1D to Linear4bit, so GPT-2 loads and embeds in 4-bit."""
    tiny_model("gpt2", 4).save_pretrained(tmp_path)
    tiny_tokenizer("left").save_pretrained(tmp_path)
    q = load_model(nf4(tmp_path))
    assert isinstance(surgery.blocks(q.model)[0].attn.c_attn, linear4bit())
    full = load_model(ModelConfig(str(tmp_path)))
    a = embed_strings(full.model, full.tokenizer, ["mtoto", "child"], [4], num_layers=4)
    b = embed_strings(q.model, q.tokenizer, ["mtoto", "child"], [4], num_layers=4)
    assert (a * b).sum(-1).mean() > 0.95


def test_a_4bit_load_that_quantizes_nothing_is_refused(model_dirs, monkeypatch, capsys, tmp_path):
    """A model whose blocks bitsandbytes leaves alone: one line and exit 2, not a silent fp load."""
    import tli.models

    real = tli.models._quantization

    def skip_blocks(cfg):
        kwargs = real(cfg)
        if kwargs:
            kwargs["quantization_config"].llm_int8_skip_modules = ["model.layers", "lm_head"]
        return kwargs

    monkeypatch.setattr(tli.models, "_quantization", skip_blocks)
    out = tmp_path / "v.safetensors"
    code = cli.main(["embed", "--model", str(model_dirs["llama"]), "--load-in-4bit", "mtoto",
                     "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "quantized none of its decoder blocks' layers" in err and not out.exists()


def test_missing_bitsandbytes_is_one_line_naming_the_extra(
    model_dirs, monkeypatch, capsys, tmp_path
):
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    out = tmp_path / "v.safetensors"
    code = cli.main(
        ["embed", "--model", str(model_dirs["llama"]), "--load-in-4bit", "x", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "needs bitsandbytes: pip install 'tli[quant]'" in err


def test_bitsandbytes_notices_go_to_the_debug_log(monkeypatch, caplog, capsys):
    """bitsandbytes may log a notice as it is imported (a missing optional CPU kernel), by tli
    or by peft: it goes to tli's debug log, never to stderr."""
    import sys

    import tli.models

    monkeypatch.delitem(sys.modules, "bitsandbytes")
    real = importlib.import_module

    def fake_import(name, *args):
        if name == "bitsandbytes":
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load kernels")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with caplog.at_level(logging.DEBUG, logger="tli"):
        tli.models.import_bitsandbytes()
        logging.getLogger("bitsandbytes.cextension").warning("another notice")  # e.g. via peft
    notices = [r for r in caplog.records if "bitsandbytes: " in r.getMessage()]
    assert [r.levelno for r in notices] == [logging.DEBUG, logging.DEBUG]
    err = capsys.readouterr().err
    assert "Failed to load kernels" not in err and "another notice" not in err


# --- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ARCHS)
def test_kbit_preparation_gives_peft_s_states_and_gradients(model_dirs, model_type):
    """tli keeps the embedding table in bf16 but gives exactly peft's float32 rows."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from tli.embed import pooled, tokenize
    from tli.train import lora_config

    cfg = TrainConfig(layer=2, lora_dropout=0.0)
    results = []
    for ours in (True, False):
        loaded = load_model(nf4(model_dirs[model_type]), max_layer=2)
        if ours:
            prepare_for_kbit_training(loaded.model)
            model = loaded.model
        else:
            model = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
        emb = surgery.input_embeddings(model).weight
        assert emb.dtype == (torch.bfloat16 if ours else torch.float32)
        torch.manual_seed(0)
        model = get_peft_model(model, lora_config(cfg, 4, model))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        batch = tokenize(loaded.tokenizer, ["mtoto", "child", "maji", "water"])
        vec = pooled(model, batch, [1, 2], num_layers=4)
        vec.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((vec.detach(), grads))
    (ours_vec, ours_grads), (peft_vec, peft_grads) = results
    assert torch.equal(ours_vec, peft_vec)
    assert ours_grads.keys() == peft_grads.keys() and ours_grads
    for name in ours_grads:
        assert torch.equal(ours_grads[name], peft_grads[name]), name


@pytest.mark.parametrize("model_type", ARCHS)
def test_4bit_training_at_layer_l_resumes_exactly(model_dirs, tmp_path, model_type):
    path = model_dirs[model_type]
    cfg = TrainConfig(layer=2, epochs=2, batch_size=4, warmup_steps=2, lr=5e-3, save_every=2)

    def fresh():
        return load_model(nf4(path), max_layer=2)

    straight = train(fresh(), PAIRS, cfg, tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:  # mid-epoch 2; the newest checkpoint is step 4
            raise Killed

    with pytest.raises(Killed):
        train(fresh(), PAIRS, cfg, tmp_path / "b", on_step=kill_at_5, progress=False)
    resumed = train(fresh(), PAIRS, cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.steps == straight.steps == 6
    a = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(b[k].abs().sum() > 0 for k in b if "lora_B" in k)  # it trained
    log_a, log_b = ((d / "train_log.csv").read_text() for d in (tmp_path / "a", tmp_path / "b"))
    assert log_a == log_b
    meta = json.loads((tmp_path / "a" / "final" / "tli_adapter.json").read_text())
    assert meta["quantization"]["bits"] == 4 and meta["quantization"]["quant_type"] == "nf4"


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    """Per architecture: an adapter trained at layer 2 in 4-bit, and one trained in fp32."""
    out = {}
    for model_type, path in model_dirs.items():
        root = tmp_path_factory.mktemp(f"adapters-{model_type}")
        cfg = TrainConfig(layer=2, **FAST)
        train(load_model(nf4(path), max_layer=2), PAIRS, cfg, root / "q", progress=False)
        train(load_model(ModelConfig(str(path)), max_layer=2), PAIRS, cfg, root / "f",
              progress=False)  # fmt: skip
        out[model_type] = {"4bit": root / "q" / "final", "fp32": root / "f" / "final"}
    return out


@pytest.mark.parametrize("model_type", ARCHS)
def test_adapter_trained_truncated_loads_with_peft_on_the_full_4bit_model(
    model_dirs, adapters, model_type
):
    base = load_model(nf4(model_dirs[model_type]))
    words = ["mtoto", "child", "kitabu", "book"]
    before = embed_strings(base.model, base.tokenizer, words, [2, 4], num_layers=4)
    tuned = PeftModel.from_pretrained(base.model, str(adapters[model_type]["4bit"]))
    # Every adapter weight found its module (the names are those of the full causal LM).
    injected = [n for n, m in tuned.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(injected) == 4  # q_proj and v_proj of blocks 0 and 1
    after = embed_strings(tuned, base.tokenizer, words, [2, 4], num_layers=4)
    assert (before - after).abs().max() > 1e-3


# --- evaluation and probe ----------------------------------------------------------------------


def _pairs(tmp_path):
    trained = [Pair(p.source, p.target, split="trained") for p in PAIRS]
    control = [Pair(p.source, p.target, split="control") for p in CONTROL]
    write_pairs(trained + control, tmp_path / "pairs.tsv")
    return tmp_path / "pairs.tsv"


def _evaluate(capsys, tmp_path, adapter, model_dir, *extra):
    out = tmp_path / "eval"
    code = cli.main([
        "evaluate", "--adapter", str(adapter), "--model", str(model_dir), "--pairs",
        str(_pairs(tmp_path)), "--out", str(out), "--n-boot", "20", *extra,
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return out, captured.err


@pytest.mark.parametrize("model_type", ARCHS)
def test_evaluate_on_4bit_runs_the_adapter_unmerged(
    capsys, tmp_path, model_dirs, adapters, model_type
):
    path, adapter = model_dirs[model_type], adapters[model_type]["4bit"]
    out, err = _evaluate(capsys, tmp_path, adapter, path, "--load-in-4bit", "--dtype", "bfloat16")
    assert "tli: warning:" not in err, err
    data = json.loads((out / "evaluation.json").read_text())
    assert data["adapter"]["applied"].startswith("unmerged")
    assert data["model"]["quantization"]["bits"] == 4
    saved = load_file(out / "vectors.safetensors")
    # The reference: a fresh 4-bit base with the adapter loaded by peft, run unmerged on the
    # same strings in the same batches (bf16 kernels round differently for other batch shapes).
    config = data["config"]
    base = load_model(nf4(path))
    tuned = PeftModel.from_pretrained(base.model, str(adapter)).eval()
    texts = list(dict.fromkeys(w for p in PAIRS + CONTROL for w in (p.source, p.target)))
    ref = embed_strings(tuned, base.tokenizer, texts, [2, 4], num_layers=4,
                        pooling=config["pooling"], batch_size=config["batch_size"])  # fmt: skip
    for name, pairs in (("trained", PAIRS), ("control", CONTROL)):
        for side in ("source", "target"):
            rows = [texts.index(getattr(p, side)) for p in pairs]
            for i, layer in enumerate((2, 4)):
                got = saved[f"{name}.post.{side}.layer{layer}"]
                assert torch.allclose(got, ref[i, rows], atol=1e-6, rtol=0), (name, side, layer)


def test_merged_refuses_quantized_weights(model_dirs, adapters):
    base = load_model(nf4(model_dirs["llama"]))
    with pytest.raises(TLIError, match="cannot be merged into the quantized weights"):
        Merged(base, read_adapter(adapters["llama"]["4bit"]))


@pytest.mark.parametrize(
    ("trained_on", "base_args", "needle"),
    [
        ("4bit", [], "trained on 4-bit NF4 weights but is applied to unquantized weights"),
        ("fp32", ["--load-in-4bit"], "trained on unquantized weights but is applied to 4-bit NF4"),
    ],
)
def test_adapter_and_base_quantized_differently_is_allowed_but_said_once(
    capsys, tmp_path, model_dirs, adapters, trained_on, base_args, needle
):
    adapter = adapters["llama"][trained_on]
    out, err = _evaluate(capsys, tmp_path, adapter, model_dirs["llama"], *base_args)
    warnings = [line for line in err.splitlines() if line.startswith("tli: warning:")]
    assert len([w for w in warnings if needle in w]) == 1, err
    data = json.loads((out / "evaluation.json").read_text())
    assert any(needle in w for w in data["warnings"])


def test_probe_on_4bit_generates_with_the_adapter_attached(capsys, tmp_path, model_dirs, adapters):
    out = tmp_path / "probe"
    code = cli.main([
        "probe", "--adapter", str(adapters["llama"]["4bit"]), "--model", str(model_dirs["llama"]),
        "--load-in-4bit", "--dtype", "bfloat16", "--pairs", str(_pairs(tmp_path)),
        "--out", str(out), "--n", "2", "--max-new-tokens", "3",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "tli: warning:" not in err.replace("generated exactly the base", ""), err
    assert (out / "probe.json").is_file()


def test_scan_in_4bit(capsys, tmp_path, model_dirs):
    out = tmp_path / "scan"
    code = cli.main(["scan", "--model", str(model_dirs["gemma3_text"]), "--load-in-4bit",
                     "--dtype", "bfloat16", "--pairs", str(_pairs(tmp_path)), "--out", str(out),
                     "--n-boot", "20"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert json.loads((out / "scan.json").read_text())["num_layers"] == 4


@pytest.mark.slow
def test_the_whole_run_in_4bit(capsys, tmp_path, model_dirs):
    """``tli run`` the paper's way (4-bit NF4, bf16): scan, train, evaluate unmerged, report."""
    from tli.pairs import load_lexicon

    pairs = tmp_path / "pairs.tsv"
    write_pairs([Pair(p.source, p.target) for p in load_lexicon()[:60]], pairs)
    out = tmp_path / "run"
    code = cli.main(["run", "--model", str(model_dirs["llama"]), "--pairs", str(pairs),
                     "--out", str(out), "--set", "model.load_in_4bit=true",
                     "--set", "model.dtype=bfloat16", "--set", "train.epochs=1",
                     "--set", "train.batch_size=4", "--set", "figures.tsne_pairs=12",
                     "--set", "scan.n_boot=50", "--set", "evaluate.n_boot=50"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    evaluation = json.loads((out / "eval" / "evaluation.json").read_text())
    assert evaluation["adapter"]["applied"].startswith("unmerged")
    assert evaluation["adapter"]["tli"]["quantization"]["quant_type"] == "nf4"
    assert not any("quantized" in w for w in evaluation["warnings"])
    assert (out / "report.html").is_file()


def test_a_4bit_load_lets_go_of_the_checkpoint_maps(model_dirs):
    """No shard stays mapped for a norm's sake, holding the pages of weights quantized away."""
    from pathlib import Path

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    path = model_dirs["llama"]
    loaded = load_model(nf4(path), max_layer=2)
    mapped = [line for line in maps.read_text().splitlines() if str(path) in line]
    assert mapped == [], mapped
    assert loaded.depth == 2


def test_16_bit_training_on_a_cpu_without_bf16_is_said(model_dirs, tmp_path, monkeypatch, caplog):
    import tli.train

    q = load_model(nf4(model_dirs["llama"]), max_layer=2)
    assert tli.train.half_precision_matmuls(q.model)
    fast = load_model(nf4(model_dirs["llama"], compute_dtype="float32"), max_layer=2)
    assert not tli.train.half_precision_matmuls(fast.model)
    fp32 = load_model(ModelConfig(str(model_dirs["llama"])))
    assert not tli.train.half_precision_matmuls(fp32.model)
    monkeypatch.setattr(tli.train, "cpu_lacks_bf16", lambda: True)
    cfg = TrainConfig(layer=2, epochs=1, batch_size=4, save_every=0)
    with caplog.at_level(logging.WARNING, logger="tli"):
        train(q, PAIRS, cfg, tmp_path / "slow", progress=False)
        train(fast, PAIRS, cfg, tmp_path / "fast", progress=False)
    said = [r for r in caplog.records if "without AVX-512 BF16" in r.getMessage()]
    assert len(said) == 1
