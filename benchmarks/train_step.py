"""Training step time at L = 2, batch 8, on the embedded model: the paper's way vs. tli.

Three ways to take the same optimisation step (LoRA r 16 on q_proj + v_proj, hardest-negative
triplet loss on mean-pooled layer-2 states, AdamW), timed in one run:

* paper: the full model with adapters on every block, a full forward with
  ``output_hidden_states`` (LM head included), loss at layer 2;
* tli: ``tli.train.train`` itself (depth-truncated model, blocks 0..1 only), step times taken
  from its per-step callback;
* bound: the same computation in bare torch: the truncated model with each LoRA product written
  as a plain matmul in a forward hook, no peft, no accelerate.

Then tli trains 5 epochs over the bundled trained split, timed end to end (model loaded).

Usage: python benchmarks/train_step.py [--steps 20]. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from tli.embed import pooled, pooled_via_full_forward, tokenize
from tli.losses import triplet_hardest
from tli.models import ModelConfig, load_model, load_tokenizer
from tli.pairs import load_lexicon, split_sets
from tli.train import TrainConfig, batch_gold, batches_for_epoch, lora_config, train

LAYER = 2


def batches(pairs, n):
    out = batches_for_epoch(len(pairs), 8, 0, 0)
    return [b for b in out if len(b) == 8][:n]


def time_paper(tok, pairs, steps):
    from peft import get_peft_model

    loaded = load_model(ModelConfig(), tokenizer=tok)
    cfg = TrainConfig(layer=LAYER, adapt_all_layers=True)
    model = get_peft_model(loaded.model, lora_config(cfg, loaded.num_layers, loaded.model))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    times = []
    for index in batches(pairs, steps + 2):
        t = time.perf_counter()
        texts = [pairs[i].source for i in index] + [pairs[i].target for i in index]
        vec = pooled_via_full_forward(model, tokenize(tok, texts), [LAYER])[0]
        loss = triplet_hardest(vec[:8], vec[8:], batch_gold(pairs, index)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return times[2:]


def time_bound(tok, pairs, steps):
    loaded = load_model(ModelConfig(), max_layer=LAYER, tokenizer=tok)
    model = loaded.model
    model.requires_grad_(False)
    torch.manual_seed(0)
    params = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            a = torch.nn.Parameter(torch.randn(16, module.in_features) * 0.01)
            b = torch.nn.Parameter(torch.zeros(module.out_features, 16))
            params += [a, b]

            def hook(mod, args, out, a=a, b=b):
                x = torch.nn.functional.dropout(args[0], 0.05, training=True)
                return out + (x @ a.T @ b.T) * 2.0

            module.register_forward_hook(hook)
    opt = torch.optim.AdamW(params, lr=2e-4)
    times = []
    for index in batches(pairs, steps + 2):
        t = time.perf_counter()
        texts = [pairs[i].source for i in index] + [pairs[i].target for i in index]
        vec = pooled(model, tokenize(tok, texts), [LAYER], num_layers=loaded.num_layers)[0]
        loss = triplet_hardest(vec[:8], vec[8:], batch_gold(pairs, index)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return times[2:]


def time_tli(tok, pairs, steps, epochs=1):
    loaded = load_model(ModelConfig(), max_layer=LAYER, tokenizer=tok)
    stamps = []
    cfg = TrainConfig(layer=LAYER, epochs=epochs, save_every=0)
    subset = pairs if epochs > 1 else [pairs[i] for b in batches(pairs, steps + 2) for i in b]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        stamps.append(start)
        result = train(
            loaded,
            subset,
            cfg,
            out,
            on_step=lambda s: stamps.append(time.perf_counter()),
            progress=False,
        )
        total = time.perf_counter() - start
    steps_t = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return steps_t[2:], total, result.steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tok = load_tokenizer("gemma-3-270m")
    pairs = split_sets(load_lexicon())["trained"]
    tli_steps, _, _ = time_tli(tok, pairs, args.steps)
    bound_steps = time_bound(tok, pairs, args.steps)
    paper_steps = time_paper(tok, pairs, max(5, args.steps // 4))
    _, five_epochs_s, n_steps = time_tli(tok, pairs, args.steps, epochs=5)
    med = {
        k: statistics.median(v)
        for k, v in {"paper": paper_steps, "tli": tli_steps, "bound": bound_steps}.items()
    }
    result = {
        "model": "gemma-3-270m",
        "layer": LAYER,
        "batch_size": 8,
        "paper_step_s": round(med["paper"], 4),
        "tli_step_s": round(med["tli"], 4),
        "bound_step_s": round(med["bound"], 4),
        "speedup_vs_paper": round(med["paper"] / med["tli"], 1),
        "tli_over_bound": round(med["tli"] / med["bound"], 3),
        "five_epochs_s": round(five_epochs_s, 1),
        "five_epochs_steps": n_steps,
        "trained_pairs": len(pairs),
        "threads": torch.get_num_threads(),
    }
    print(
        f"median step: paper {med['paper']:.3f} s, tli {med['tli']:.4f} s, "
        f"bare-torch bound {med['bound']:.4f} s"
    )
    print(
        f"tli is {result['speedup_vs_paper']}x faster than the paper's way and "
        f"{result['tli_over_bound']}x the bound; 5 epochs over {len(pairs)} pairs "
        f"({n_steps} steps): {five_epochs_s:.1f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
