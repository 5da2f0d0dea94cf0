"""Plans before loading (--plan) and the memory check: from the config alone, no weights read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tli import cli, geometry, memory

from conftest import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "examples" / "paper-lugha-llama-8b.toml"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llama3_config_dir(tmp_path_factory):
    """A model directory holding only Llama-3-8B's config.json: no weights, no tokenizer."""
    path = tmp_path_factory.mktemp("llama-3-8b-config")
    geometry.config("llama-3-8b").save_pretrained(path)
    assert [p.name for p in path.iterdir()] == ["config.json"]
    return path


def test_the_paper_config_plan_matches_the_readme(capsys, llama3_config_dir, tmp_path):
    """README, "The paper's setup on a GPU": the same parts, parameters and memory."""
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "run", "--config", PAPER, "--set",
                         f"model.name={llama3_config_dir}", "--out", out_dir, "--plan")  # fmt: skip
    assert code == 0, err
    assert not out_dir.exists()  # a plan writes nothing
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "525.3 M" in rows["embeddings"] and "1.05 GB" in rows["embeddings"]
    assert "218.1 M" in rows["each"] and "0.123 GB" in rows["each"]
    assert "6.98 B" in rows["32"] and "3.93 GB" in rows["32"]
    assert "525.3 M" in rows["LM"] and "1.05 GB" in rows["LM"]
    assert "8.03 B" in rows["scan"] and "6.03 GB" in rows["scan"]
    layer2 = next(line for line in out.splitlines() if "train (layer 2)" in line)
    assert "blocks 0-1" in layer2 and "no LM head" in layer2 and "1.30 GB" in layer2
    assert "LoRA 426.0 k" in layer2  # r 16 on q_proj and v_proj of blocks 0 and 1
    assert "NF4 (0.5625 bytes per weight" in out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for figure in ("218.1 M", "6.98 B", "525.3 M", "0.5625", "3.93 GB", "6.03 GB", "1.30 GB"):
        assert figure in readme, figure


def test_readme_calculation_from_the_architecture():
    """The README's arithmetic, done again from Llama-3-8B's published shapes."""
    d, mlp, kv = 4096, 14336, 8 * 128
    block = d * d + 2 * d * kv + d * d + 3 * d * mlp  # q, k and v, o, gate/up/down
    assert block == 218_103_808  # 218.1 M, and two norms of 4096
    fp = memory.footprint(geometry.config("llama-3-8b"), "bfloat16", load_in_4bit=True)
    assert fp.blocks[0].linear == block and fp.blocks[0].params == block + 2 * d
    assert len(fp.blocks) == 32
    assert fp.part("embeddings").params == fp.part("LM head").params == 128_256 * 4096
    assert fp.bytes == pytest.approx(32 * block * memory.NF4_BYTES + 2 * 2 * 128_256 * 4096,
                                     abs=2e6)  # fmt: skip (norms: 65 norms of 4096 in bf16)
    cut = memory.footprint(geometry.config("llama-3-8b"), "bfloat16", load_in_4bit=True,
                           max_layer=2)  # fmt: skip
    assert cut.bytes == pytest.approx(2 * block * memory.NF4_BYTES + 2 * 128_256 * 4096, abs=1e5)
    assert memory.NF4_BYTES == 0.5625 and round(memory.NF4_DOUBLE_BYTES, 4) == 0.5159


def test_nf4_bytes_per_weight_are_what_bitsandbytes_stores():
    """0.5625 bytes per weight: the packed 4-bit codes and one float32 absmax per 64 weights."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    weight = torch.randn(256, 512, dtype=torch.bfloat16)
    for double, per in ((False, memory.NF4_BYTES), (True, memory.NF4_DOUBLE_BYTES)):
        packed, state = bnb.functional.quantize_4bit(
            weight, quant_type="nf4", blocksize=memory.NF4_BLOCK, compress_statistics=double
        )
        stored = packed.numel() * packed.element_size()
        stored += state.absmax.numel() * state.absmax.element_size()
        if double:
            stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
        assert stored == pytest.approx(per * weight.numel(), rel=0.01)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan-tiny")
    tiny_model("llama", 4).save_pretrained(path)
    tiny_tokenizer("left").save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("command", "needles"),
    [
        (["scan"], ["scan", "blocks 0-3", "LM head"]),
        (["train", "--layer", "2"], ["train (layer 2)", "blocks 0-1", "no LM head", "LoRA"]),
        (["train", "--layer", "2", "--load-in-4bit"], ["NF4", "train (layer 2)"]),
        (["run"], ["scan", "train (layer 2)", "train (layer 4)", "evaluate, probe"]),
    ],
)
def test_plan_of_each_command_loads_nothing(capsys, tiny_dir, tmp_path, monkeypatch, command,
                                            needles):  # fmt: skip
    import tli.models

    def no_load(*args, **kwargs):
        raise AssertionError("a plan loaded the model")

    monkeypatch.setattr(tli.models, "load_model", no_load)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *command, "--model", tiny_dir, "--plan")
    assert code == 0, err
    for needle in needles:
        assert needle in out, (needle, out)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_evaluate_plan_uses_the_adapters_base(capsys, tiny_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tiny_dir), "peft_type": "LORA", "r": 2,
                    "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    import torch
    from safetensors.torch import save_file

    save_file({"x.lora_A.weight": torch.zeros(2, 2)}, str(adapter / "adapter_model.safetensors"))
    code, out, err = run(capsys, "evaluate", "--adapter", adapter, "--plan")
    assert code == 0, err
    assert "evaluate" in out and str(tiny_dir) in out


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--layer", "2", "--out", "{out}"],
        ["scan", "--out", "{out}"],
        ["run", "--out", "{out}"],
        ["train", "--layer", "2", "--out", "{out}", "--plan"],
    ],
)
def test_too_little_memory_is_one_line_before_loading(capsys, tiny_dir, tmp_path, monkeypatch,
                                                      argv):  # fmt: skip
    import tli.models

    monkeypatch.setattr(memory, "available_bytes", lambda device: 10_000)
    monkeypatch.setattr(tli.models, "load_tokenizer", lambda *a, **k: pytest.fail("loaded"))
    out = tmp_path / "out"
    code, stdout, err = run(capsys, *[a.replace("{out}", str(out)) for a in argv], "--model",
                            tiny_dir)  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tli: error: "), err
    assert "free" in lines[0] and "GB" in lines[0] and "needs" in lines[0]
    assert not out.exists()
    if "--plan" in argv:
        assert "DOES NOT FIT" in stdout


def test_footprint_counts_what_a_load_builds_for_every_geometry():
    """Published parameter counts of the four models, from their configs alone."""
    published = {
        "llama-3-8b": 8_030_261_248,
        "mistral-7b": 7_241_732_096,
        "qwen2.5-7b": 7_615_616_512,
        "gemma-2-9b": 9_241_705_984,
    }
    for name, params in published.items():
        fp = memory.footprint(geometry.config(name), "bfloat16")
        assert fp.params == params, name
        assert fp.tied == (name == "gemma-2-9b")
