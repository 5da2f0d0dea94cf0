"""TLI at the paper's scale without downloads: Llama-3-8B geometry, random weights.

A random-initialised checkpoint with Llama-3-8B's real geometry (tli.geometry: hidden 4096, MLP
14336, 32 query / 8 key-value heads of 128, vocabulary 128,256, 32 blocks, untied LM head) is
written as safetensors, shard by shard. Then, each in a fresh process so that its peak RSS is its
own:

* ladder: ``tli.train.train`` at layer 2 (the paper's), batch 8, the paper's hyper-parameters
  (LoRA r 16 / alpha 32 / dropout 0.05 on q_proj + v_proj, triplet margin 0.4, AdamW 2e-4, 50
  warm-up steps, mean pooling over all tokens) on a checkpoint that holds only what that load
  reads (embeddings, blocks 0-1, final norm), in float32, bfloat16 and 4-bit NF4 (bf16 compute,
  the paper's), and on the CPU also NF4 with float32 compute;
* paper: the paper's way, for a few steps: the full model (32 blocks and the LM head) in 4-bit
  NF4 with bf16 compute, peft's ``prepare_model_for_kbit_training`` (without gradient
  checkpointing, the cheapest form), LoRA on every block, a full forward with
  ``output_hidden_states`` (logits included), the loss at layer 2;
* scan: tli's layer scan pass (``tli.embed.embed_strings``, every layer 0..32, batches of 64)
  over ~200 short strings on the full 4-bit model, as ``tli scan`` loads it.

The full checkpoint (16 GB in bf16) is written only when the disk has room, and removed after.
Every process first touches each weight once, so lazily mapped weights count in its RSS.

Usage:
    PYTHONPATH=src python benchmarks/scale.py [--workdir DIR] [--steps 5] [--paper-steps 2]
    PYTHONPATH=src python benchmarks/scale.py --device cuda   # benchmarks/gpu.sh

Prints one JSON line per measurement, then a summary JSON line with medians, ratios and goals.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GEOMETRY = "llama-3-8b"
LAYER = 2
SCAN_STRINGS = 200
GOAL_RSS_GB = 2.5
GOAL_SPEEDUP = 10.0
#: --tiny: the same geometry with 4 blocks, a 1,024-word vocabulary and a 256-wide MLP (a dry run).
TINY = {"num_layers": 4, "vocab_size": 1024, "intermediate_size": 256}
RUNGS = {  # name -> ModelConfig values
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "nf4": {"dtype": "bfloat16", "load_in_4bit": True},  # the paper's: bf16 compute
    "nf4-fp32-compute": {"dtype": "bfloat16", "load_in_4bit": True, "compute_dtype": "float32"},
}


# --- measurement helpers (children) -------------------------------------------------------------


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_peak_gb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def touch_every_weight(model) -> None:
    """Read each weight once: safetensors maps them lazily, and an untouched page is not in RSS."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def words(n_pairs: int):
    from tli.pairs import load_sets

    return load_sets(None, None).trained[:n_pairs]


def load(ckpt: str, values: dict, device: str, **kw):
    from tli.models import ModelConfig, load_model

    start = time.perf_counter()
    loaded = load_model(ModelConfig(ckpt, device=device, **values), **kw)
    touch_every_weight(loaded.model)
    sync(device)
    return loaded, time.perf_counter() - start


class _Enough(Exception):
    pass


def child_ladder(ckpt: str, rung: str, steps: int, device: str, out: str, warmup: bool) -> dict:
    """tli.train.train at layer 2 for ``steps`` timed steps, after one warm-up step if asked."""
    import torch

    from tli.train import TrainConfig, train

    baseline = peak_rss_gb()
    loaded, load_s = load(ckpt, RUNGS[rung], device, max_layer=LAYER)
    after_load = rss_gb()
    stamps: list[float] = []
    total = steps + 1 if warmup else steps

    def on_step(step: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())
        if step == total:
            raise _Enough

    cfg = TrainConfig(layer=LAYER, pooling="mean_all")  # every other default is the paper's
    pairs = words(8 * (steps + 1))
    start = time.perf_counter()  # train() builds the adapters before its first step
    try:
        train(loaded, pairs, cfg, out, progress=False, on_step=on_step)
    except _Enough:
        pass
    times = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    if warmup:
        times = times[1:]
    params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "measure": "ladder", "rung": rung, "device": device, "layer": LAYER, "batch_size": 8,
        "blocks_built": loaded.depth, "lm_head": loaded.has_lm_head, "stored_params": params,
        "load_s": round(load_s, 1), "step_s": [round(t, 3) for t in times],
        "median_step_s": round(statistics.median(times), 3), "warmup_discarded": warmup,
        "rss_after_imports_gb": round(baseline, 3), "rss_after_load_gb": round(after_load, 3),
        "peak_rss_gb": round(peak_rss_gb(), 3), "peak_gpu_gb": gpu_peak_gb(device),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def child_paper(ckpt: str, steps: int, device: str, rung: str) -> dict:
    """The paper's way: full 4-bit model with its LM head, full forward, loss at layer 2."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import get_linear_schedule_with_warmup

    from tli.embed import pooled_via_full_forward, tokenize
    from tli.losses import triplet_hardest
    from tli.train import TrainConfig, batch_gold, batches_for_epoch, lora_config

    baseline = peak_rss_gb()
    loaded, load_s = load(ckpt, RUNGS[rung], device)
    assert loaded.has_lm_head and not loaded.truncated
    after_load = rss_gb()
    cfg = TrainConfig(layer=LAYER, pooling="mean_all", adapt_all_layers=True)
    model = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(cfg, loaded.num_layers, model))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pairs = words(8 * (steps + 1))
    batches = batches_for_epoch(len(pairs), cfg.batch_size, cfg.seed, 0)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, len(batches) * cfg.epochs)
    times, logits_shape = [], None
    for index in batches[: steps + 1]:
        sync(device)
        start = time.perf_counter()
        texts = [pairs[i].source for i in index] + [pairs[i].target for i in index]
        enc = tokenize(loaded.tokenizer, texts, loaded.model.device)
        vec = pooled_via_full_forward(model, enc, [LAYER], pooling=cfg.pooling)[0]
        b = len(index)
        gold = batch_gold(pairs, index).to(vec.device)
        loss = triplet_hardest(vec[:b].float(), vec[b:].float(), gold, cfg.margin).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sync(device)
        times.append(time.perf_counter() - start)
        logits_shape = [b * 2, enc["input_ids"].shape[1], loaded.model.config.vocab_size]
    times = times[1:]  # the first step is the warm-up
    return {
        "measure": "paper", "rung": rung, "device": device, "layer": LAYER, "batch_size": 8,
        "blocks_built": loaded.depth, "lm_head": loaded.has_lm_head,
        "logits_per_step": logits_shape, "load_s": round(load_s, 1),
        "step_s": [round(t, 3) for t in times], "median_step_s": round(statistics.median(times), 3),
        "rss_after_imports_gb": round(baseline, 3), "rss_after_load_gb": round(after_load, 3),
        "peak_rss_gb": round(peak_rss_gb(), 3), "peak_gpu_gb": gpu_peak_gb(device),
        "gradient_checkpointing": False, "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def child_scan(ckpt: str, n_strings: int, device: str, rung: str) -> dict:
    """tli's scan pass over n_strings short strings, every layer, on the full 4-bit model."""
    import torch

    from tli.embed import embed_strings

    baseline = peak_rss_gb()
    loaded, load_s = load(ckpt, RUNGS[rung], device)
    after_load = rss_gb()
    texts = list(dict.fromkeys(w for p in words(n_strings) for w in (p.source, p.target)))
    texts = texts[:n_strings]
    tokens = [len(ids) for ids in loaded.tokenizer(texts)["input_ids"]]
    sync(device)
    start = time.perf_counter()
    vectors = embed_strings(
        loaded.model, loaded.tokenizer, texts, list(range(loaded.num_layers + 1)),
        num_layers=loaded.num_layers, pooling="mean_all", batch_size=64,
    )  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - start
    assert bool(torch.isfinite(vectors).all())
    return {
        "measure": "scan", "rung": rung, "device": device, "strings": len(texts),
        "tokens_per_string": round(statistics.mean(tokens), 2), "layers": loaded.num_layers + 1,
        "load_s": round(load_s, 1), "scan_s": round(seconds, 1),
        "strings_per_s": round(len(texts) / seconds, 3),
        "rss_after_imports_gb": round(baseline, 3), "rss_after_load_gb": round(after_load, 3),
        "peak_rss_gb": round(peak_rss_gb(), 3), "peak_gpu_gb": gpu_peak_gb(device),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def child(spec: dict) -> None:
    import torch  # noqa: F401  (imported before the baseline RSS, as every child does)
    import transformers  # noqa: F401

    kind = spec.pop("kind")
    if kind == "ladder":
        result = child_ladder(**spec)
    elif kind == "paper":
        result = child_paper(**spec)
    elif kind == "scan":
        result = child_scan(**spec)
    else:
        from tli import geometry

        config = geometry.config(GEOMETRY, **(TINY if spec.get("tiny") else {}))
        start = time.perf_counter()
        geometry.write_checkpoint(spec["out"], config, max_layer=spec["max_layer"])
        result = {
            "measure": "write", "max_layer": spec["max_layer"],
            "gb": round(geometry.checkpoint_bytes(spec["out"]) / 1e9, 3),
            "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gb": round(peak_rss_gb(), 3),
        }  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent ----------------------------------------------------------------------------------


def computes_in_bf16(rung: str) -> bool:
    values = RUNGS[rung]
    if values.get("load_in_4bit"):
        return values.get("compute_dtype", "bfloat16") == "bfloat16"
    return values["dtype"] == "bfloat16"


def run_child(spec: dict, timeout: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = dict(os.environ, TLI_CACHE=os.environ.get("TLI_CACHE", ""), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            print(json.dumps(result), flush=True)
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    failed = {"measure": spec["kind"], "rung": spec.get("rung"), "error": f"exit {proc.returncode}",
              "stderr": tail}  # fmt: skip
    print(json.dumps(failed), flush=True)
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints are written")
    p.add_argument("--steps", type=int, default=5, help="timed steps per ladder rung")
    p.add_argument("--paper-steps", type=int, default=2, help="timed steps of the paper's way")
    p.add_argument("--rungs", default=None, help="comma-separated ladder rungs")
    p.add_argument(
        "--bf16-steps", type=int, default=1,
        help="CPU only: timed steps (no warm-up) of rungs that compute in bf16, whose backward "
        "matmuls are very slow on CPUs without AVX-512 BF16",
    )  # fmt: skip
    p.add_argument(
        "--full-rung", default=None,
        help="settings of the paper's way and the scan (default: nf4 on CUDA; "
        "nf4-fp32-compute on the CPU, see --bf16-steps)",
    )  # fmt: skip
    p.add_argument("--scan-strings", type=int, default=SCAN_STRINGS)
    p.add_argument("--skip-full", action="store_true", help="no full checkpoint: no paper, scan")
    p.add_argument("--tiny", action="store_true", help="a dry run on a shrunk geometry (seconds)")
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    # A SIGTERM (e.g. from gpu.sh's timeout) still removes the checkpoints (finally, below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cuda = args.device.startswith("cuda")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            sys.exit("scale.py: --device cuda needs a CUDA GPU, and torch sees none")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            sys.exit("scale.py: 4-bit needs bitsandbytes: pip install -e '.[quant]'")
    rungs = (args.rungs or ("bf16,nf4" if cuda else ",".join(RUNGS))).split(",")
    full_rung = args.full_rung or ("nf4" if cuda else "nf4-fp32-compute")
    if any(r not in RUNGS for r in [*rungs, full_rung]):
        sys.exit(f"scale.py: rungs are {', '.join(RUNGS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tli-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    full = work / "full"
    try:
        cut = work / f"layer{LAYER}"
        results.append(
            run_child({"kind": "write", "out": str(cut), "max_layer": LAYER, "tiny": args.tiny})
        )
        for rung in rungs:
            out = work / f"train-{rung}"
            shutil.rmtree(out, ignore_errors=True)
            slow = not cuda and computes_in_bf16(rung)
            spec = {"kind": "ladder", "ckpt": str(cut), "rung": rung, "device": args.device,
                    "steps": args.bf16_steps if slow else args.steps, "warmup": not slow,
                    "out": str(out)}  # fmt: skip
            results.append(run_child(spec))
        shutil.rmtree(cut, ignore_errors=True)
        needed = 0 if args.tiny else 8.03e9 * 2 * 1.1  # bf16 weights of the model, 10% to spare
        free = shutil.disk_usage(work).free
        if args.skip_full:
            print(json.dumps({"measure": "full", "skipped": "--skip-full"}), flush=True)
        elif free < needed:
            print(json.dumps({"measure": "full", "skipped": f"{free / 1e9:.1f} GB free on "
                              f"{work}, the full checkpoint needs {needed / 1e9:.1f} GB"}))
        else:
            results.append(
                run_child({"kind": "write", "out": str(full), "max_layer": None, "tiny": args.tiny})
            )
            results.append(run_child({"kind": "paper", "ckpt": str(full), "rung": full_rung,
                                      "steps": args.paper_steps, "device": args.device}))
            results.append(run_child({"kind": "scan", "ckpt": str(full), "rung": full_rung,
                                      "n_strings": args.scan_strings, "device": args.device}))
    finally:
        shutil.rmtree(full, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary(results, cuda, args.tiny)


def summary(results: list[dict], cuda: bool, tiny: bool = False) -> None:
    ladder = {r["rung"]: r for r in results if r.get("measure") == "ladder" and "error" not in r}
    paper = next((r for r in results if r.get("measure") == "paper" and "error" not in r), None)
    scan = next((r for r in results if r.get("measure") == "scan" and "error" not in r), None)
    out: dict = {"summary": "scale", "geometry": GEOMETRY + (" (tiny)" if tiny else ""),
                 "layer": LAYER, "batch_size": 8, "device": "cuda" if cuda else "cpu"}  # fmt: skip
    for rung, r in ladder.items():
        out[f"{rung}_median_step_s"] = r["median_step_s"]
        out[f"{rung}_peak_rss_gb"] = r["peak_rss_gb"]
        if cuda:
            out[f"{rung}_peak_gpu_gb"] = r["peak_gpu_gb"]
    four_bit = [r for r in ladder.values() if RUNGS[r["rung"]].get("load_in_4bit")]
    if four_bit and not cuda:
        out["goal_rss_gb"] = GOAL_RSS_GB
        out["rss_goal_met"] = all(r["peak_rss_gb"] <= GOAL_RSS_GB for r in four_bit)
    if paper:
        out["paper_rung"] = paper["rung"]
        out["paper_median_step_s"] = paper["median_step_s"]
        out["paper_peak_rss_gb"] = paper["peak_rss_gb"]
        if cuda:
            out["paper_peak_gpu_gb"] = paper["peak_gpu_gb"]
        same = ladder.get(paper["rung"])  # tli with the same weights and compute dtype
        if same:
            ratio = paper["median_step_s"] / same["median_step_s"]
            out["speedup_vs_paper"] = round(ratio, 1)
            out["speedup_goal_met"] = ratio >= GOAL_SPEEDUP
    if scan:
        out["scan_rung"] = scan["rung"]
        out["scan_strings"] = scan["strings"]
        out["scan_strings_per_s"] = scan["strings_per_s"]
        out["scan_s"] = scan["scan_s"]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
