"""Matmul speed on this CPU by dtype and layout: why tli warns about 16-bit training on some CPUs.

A linear layer's forward computes ``x @ W.T``; its backward computes the input gradient as
``g @ W`` (``W`` not transposed). On CPUs without AVX-512 BF16 or AMX, torch's bf16 kernels for
the second layout can be far slower than float32. Measured for a 4096 x 4096 weight and 112
tokens (a batch of 16 short strings), as plain matmuls and as a bitsandbytes NF4 ``Linear4bit``
(forward, and forward + backward to the input) with bf16 and float32 compute.

Usage: PYTHONPATH=src python benchmarks/cpu_matmul.py. Prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

D, T = 4096, 112


def seconds(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    flops = 2 * T * D * D
    out: dict = {"weight": [D, D], "tokens": T, "torch": torch.__version__,
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "threads": torch.get_num_threads()}  # fmt: skip
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        w = torch.randn(D, D).to(dtype)
        x = torch.randn(T, D).to(dtype)
        forward = seconds(lambda x=x, w=w: x @ w.T)
        backward = seconds(lambda x=x, w=w: x @ w, repeat=1)
        out[f"{name}_forward_layout_gflops"] = round(flops / forward / 1e9, 2)
        out[f"{name}_backward_layout_gflops"] = round(flops / backward / 1e9, 2)
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    if bnb is not None:
        weight = (torch.randn(D, D) * 0.02).to(torch.bfloat16)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            layer = bnb.nn.Linear4bit(D, D, bias=False, compute_dtype=dtype, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            layer = layer.to("cpu")
            x = torch.randn(16, T // 16, D, requires_grad=True)

            def forward(layer=layer, x=x):
                with torch.no_grad():
                    layer(x)

            def both(layer=layer, x=x):
                layer(x).sum().backward()

            out[f"nf4_{name}_compute_forward_s"] = round(seconds(forward), 3)
            out[f"nf4_{name}_compute_forward_backward_s"] = round(seconds(both, repeat=1), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
