"""How much merging a LoRA adapter into 4-bit weights would change tli's evaluation figures.

peft's ``merge_and_unload`` on a bitsandbytes 4-bit model de-quantizes each adapted weight, adds
the LoRA product and quantizes the sum again: the merged model is the trained function plus a new
rounding error. tli's evaluation therefore runs the adapter unmerged on 4-bit bases. This script
measures what merging would have cost, on tiny random models in NF4 (bf16 compute):

1. train an adapter with ``tli.train.train`` at layer 2 in 4-bit (the paper's settings but
   ``epochs``, a small batch and a larger learning rate, so that a few steps move the vectors);
2. embed the word list at the final layer: base (pre), base + adapter unmerged (post, what tli
   reports) and base with the adapter merged (post, what a merge would report);
3. compare per-pair cosines: the merge error |cos(merged) - cos(unmerged)| against the training
   effect |cos(unmerged) - cos(pre)|, and the largest change of any vector component.

Usage: PYTHONPATH=src python benchmarks/merge_error.py [--epochs 3]
(the tests' tiny random Llama and Gemma 3: 4 blocks, hidden size 32). Prints one JSON line per
architecture.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def measure(model_dir: Path, label: str, work: Path, epochs: int) -> dict:
    from peft import PeftModel

    from tli.embed import embed_strings
    from tli.models import ModelConfig, load_model
    from tli.pairs import load_sets
    from tli.train import TrainConfig, train

    pairs = load_sets(None, None).trained[:64]
    nf4 = ModelConfig(str(model_dir), dtype="bfloat16", load_in_4bit=True)
    cfg = TrainConfig(layer=2, epochs=epochs, batch_size=8, warmup_steps=2, lr=2e-3, save_every=0)
    result = train(load_model(nf4, max_layer=2), pairs, cfg, work / label, progress=False)
    texts = list(dict.fromkeys(w for p in pairs for w in (p.source, p.target)))
    src = [texts.index(p.source) for p in pairs]
    tgt = [texts.index(p.target) for p in pairs]

    def final(model, tok, n):
        v = embed_strings(model, tok, texts, [n], num_layers=n, pooling="mean_all")[0]
        return (v[src] * v[tgt]).sum(-1), v  # per-pair cosine (vectors are unit-norm), vectors

    base = load_model(nf4)
    n = base.num_layers
    cos_pre, _ = final(base.model, base.tokenizer, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = PeftModel.from_pretrained(base.model, str(result.adapter_dir)).eval()
        cos_post, v_post = final(tuned, base.tokenizer, n)
        merged = tuned.merge_and_unload()  # de-quantize, add B @ A, quantize again
    cos_merged, v_merged = final(merged, base.tokenizer, n)
    effect = (cos_post - cos_pre).abs()
    error = (cos_merged - cos_post).abs()
    return {
        "model": label, "pairs": len(pairs), "train_steps": result.steps,
        "final_layer": n, "mean_abs_effect": round(effect.mean().item(), 5),
        "mean_abs_merge_error": round(error.mean().item(), 5),
        "max_abs_merge_error": round(error.max().item(), 5),
        "merge_error_over_effect": round((error.mean() / effect.mean()).item(), 3),
        "mean_pair_cosine_post": round(cos_post.mean().item(), 5),
        "mean_pair_cosine_merged": round(cos_merged.mean().item(), 5),
        "max_abs_vector_change": round((v_merged - v_post).abs().max().item(), 5),
        "torch": torch.__version__,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tli-merge-") as tmp:
        work = Path(tmp)
        from conftest import tiny_model, tiny_tokenizer

        for model_type in ("llama", "gemma3_text"):
            path = work / model_type
            tiny_model(model_type, 4, tie_word_embeddings=model_type != "llama").save_pretrained(
                path
            )
            tiny_tokenizer("left").save_pretrained(path)
            print(json.dumps(measure(path, f"tiny {model_type}", work, args.epochs)), flush=True)


if __name__ == "__main__":
    main()
