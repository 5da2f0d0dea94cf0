"""``--threads N`` (or ``TLI_THREADS``): the layer scan with 1 thread vs. 2 on this machine.

Runs ``tli --threads N scan`` on the bundled lexicon (863 + 95 pairs, all 19 layers of the
embedded model) in separate processes, alternating N = 1 and N = 2 (``--repeats`` each), and
reads the scan's own time (``scan.json`` timings, model load excluded). torch's default on
this machine is as many threads as cores (2); when other processes hold the cores, threads
that wait for each other can make more threads slower, which is what the option is for.

Usage: python benchmarks/threads.py [--repeats 3] [--threads 1,2] [--n-pairs N]
       (--n-pairs: a seeded sample of N lexicon pairs instead of all, for a shorter run)
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--n-pairs", type=int, default=0, help="sample of the lexicon (0: all)")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    times: dict[int, list[float]] = {n: [] for n in counts}
    loads = []
    with tempfile.TemporaryDirectory(prefix="tli-bench-threads-") as tmp:
        pairs_args: list[str] = []
        if args.n_pairs:
            import random

            from tli.pairs import load_lexicon, write_pairs

            lexicon = load_lexicon()
            keep = sorted(random.Random(0).sample(range(len(lexicon)), args.n_pairs))
            write_pairs([lexicon[i] for i in keep], Path(tmp) / "pairs.tsv")
            pairs_args = ["--pairs", str(Path(tmp) / "pairs.tsv")]
        for i in range(args.repeats):
            for n in counts:
                out = Path(tmp) / f"t{n}-{i}"
                env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
                cmd = [sys.executable, "-m", "tli", "--threads", str(n), "scan",
                       "--model", args.model, *pairs_args, "--out", str(out)]  # fmt: skip
                subprocess.run(cmd, check=True, capture_output=True, env=env)
                times[n].append(json.loads((out / "scan.json").read_text())["timings"]["total_s"])
                loads.append(os.getloadavg()[0])
                time.sleep(1)
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {
        "benchmark": "threads",
        "model": args.model,
        "cpus": os.cpu_count(),
        "pairs": args.n_pairs or "all",
        "scan_s_median": {str(n): round(v, 2) for n, v in med.items()},
        "runs": {str(n): [round(x, 2) for x in v] for n, v in times.items()},
        "ratio_1_over_2": round(med[1] / med[2], 3) if 1 in med and 2 in med else None,
        "load_avg_1min": [round(x, 2) for x in loads],
    }
    print(", ".join(f"{n} thread(s): scan {v:.1f} s" for n, v in med.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
