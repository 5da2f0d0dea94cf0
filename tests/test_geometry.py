"""Real geometries without downloads: Llama-3-8B, Mistral-7B, Qwen2.5-7B and Gemma-2-9B.

Each keeps the shapes that make its architecture (hidden size, query and key/value heads, head
size, rope, tied or untied LM head) and shrinks what only costs time: the vocabulary, the depth
(3 blocks) and the MLP width. A checkpoint holding only what a depth-truncated load reads
(embeddings, blocks 0-1, final norm) loads in 4-bit and trains at layer 2; the adapter then
loads with peft onto the full model and ``tli.evaluate`` evaluates it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tli import geometry, memory, surgery
from tli.errors import TLIError
from tli.models import ModelConfig, load_model
from tli.pairs import Pair
from tli.train import TrainConfig, train

from conftest import WORDS

ROOT = Path(__file__).resolve().parents[1]
SHRUNK = {"num_layers": 3, "vocab_size": 1024, "intermediate_size": 256}
PAIRS = [Pair(s, t) for s, t in WORDS[:8]]


def logical_params(model):
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    return total


@pytest.mark.parametrize("name", list(geometry.CONFIGS))
def test_shrunk_configs_keep_the_shapes_that_matter(name):
    real, small = geometry.config(name), geometry.config(name, **SHRUNK)
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rope_theta", "tie_word_embeddings"):  # fmt: skip
        assert getattr(small, key, None) == getattr(real, key, None), key
    assert surgery.num_layers(small) == 3 and small.vocab_size == 1024


@pytest.mark.slow
@pytest.mark.parametrize("name", list(geometry.CONFIGS))
def test_truncated_checkpoint_loads_trains_and_evaluates(name, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from tli.evaluate import EvalConfig, evaluate

    config = geometry.config(name, **SHRUNK)
    cut = geometry.write_checkpoint(tmp_path / "cut", config, max_layer=2)
    shards = sorted(p.name for p in cut.glob("*.safetensors"))
    assert shards == ["model-block-000.safetensors", "model-block-001.safetensors",
                      "model-embeddings.safetensors", "model-final-norm.safetensors"]  # fmt: skip
    index = json.loads((cut / "model.safetensors.index.json").read_text())
    assert not any("lm_head" in k or ".layers.2." in k for k in index["weight_map"])
    # The full model needs weights this checkpoint does not hold: a one-line error, not noise.
    with pytest.raises(TLIError, match="the checkpoint lacks"):
        load_model(ModelConfig(str(cut), dtype="bfloat16"))
    # float32 compute: this CPU's bf16 backward matmuls are slow (docs/benchmarks.md).
    cfg = ModelConfig(str(cut), dtype="bfloat16", load_in_4bit=True, compute_dtype="float32")
    loaded = load_model(cfg, max_layer=2)
    assert loaded.depth == 2 and not loaded.has_lm_head
    fp = memory.footprint(config, "bfloat16", load_in_4bit=True, max_layer=2)
    assert logical_params(loaded.model) == fp.params
    q = surgery.blocks(loaded.model)[0].self_attn.q_proj
    assert (q.in_features, q.out_features) == (
        config.hidden_size, config.num_attention_heads * config.head_dim
    )
    tcfg = TrainConfig(layer=2, epochs=1, batch_size=4, warmup_steps=1, lr=5e-3, save_every=0)
    result = train(loaded, PAIRS, tcfg, tmp_path / "train", progress=False)
    assert result.steps == 2 and result.final_loss == result.final_loss  # finite
    # The adapter fits the full causal LM: peft loads it, and tli evaluates it (a bf16 base:
    # said in one warning, as any base quantized unlike the adapter's). The full checkpoint
    # goes to the same directory (the model the adapter names); same seed, same first blocks.
    geometry.write_checkpoint(cut, config)
    assert len(list(cut.glob("*.safetensors"))) == 5 + (not config.tie_word_embeddings)
    full = load_model(ModelConfig(str(cut), dtype="bfloat16"))
    assert full.has_lm_head and full.depth == 3
    tuned = PeftModel.from_pretrained(full.model, str(result.adapter_dir))
    assert sum("lora_A" in n for n, _ in tuned.named_parameters()) == 4
    tuned.unload()
    sets = {"trained": PAIRS, "control": [Pair("moto", "fire"), Pair("ndege", "bird")]}
    # perplexity and Procrustes off: 248 sentences through a real-width model twice, and one
    # SVD of D x D per layer, would take minutes here
    ev = evaluate(full, result.adapter_dir, sets, EvalConfig(perplexity=False, procrustes=False),
                  out_dir=tmp_path / "eval")
    assert "turned off" in ev.yardsticks["absent"]["procrustes"]
    assert ev.adapter["applied"].startswith("merged") and ev.num_layers == 3
    assert any("trained on 4-bit NF4 weights" in w for w in ev.warnings)


def test_scale_benchmark_parses_and_refuses_cuda_without_a_gpu():
    script = ROOT / "benchmarks" / "scale.py"
    help_out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    assert "--device" in help_out and "--tiny" in help_out
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "scale.py: --device cuda needs a CUDA GPU, and torch sees none"
    ]
    gpu = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True,
                         text=True)  # fmt: skip
    assert gpu.returncode != 0 and "needs a CUDA GPU" in gpu.stderr
