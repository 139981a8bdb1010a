"""Does `torch.compile` speed up levante's decode step? Eager vs compiled, same model, same run.

    python benchmarks/torch_compile.py [-m benchmarks/cache/mixtral-1.5b-Q4_K_M.gguf] [-n 64]

Four cases, each in a fresh subprocess (2 threads): the fused C++ decode step (`layer_decode`, the
default for GGML weights) and the module-by-module path (what float / AWQ / low-rank weights run),
each eager and under `torch.compile` (reduce-overhead for the fused step, max-autotune-no-cudagraphs
for the module path; dynamic shapes, since the cache grows every step). Reports compile/warm-up time
for 8 steps and decode tok/s over the next n. Writes benchmarks/results/torch_compile.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

CHILD = r"""
import sys, time, warnings
import torch
warnings.filterwarnings("ignore")
import levante.model as lm
from levante.loader import load
torch.set_num_threads(2)
path, mode, fused, n = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
m = load(path).model
if not fused:
    lm.decode_ext = lambda: None
fwd = m if mode == "eager" else torch.compile(m, mode=mode, dynamic=True)
prompt = torch.randint(100, m.cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    cache = m.new_cache(1, 64 + n + 16)
    tok = m(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(8):
        tok = fwd(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        tok = fwd(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    print(f"{warm:.1f} {n / (time.perf_counter() - t0):.1f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "cache" / "mixtral-1.5b-Q4_K_M.gguf"))
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "results" / "torch_compile.md"))
    args = ap.parse_args()
    cases = [("fused C++ step", "1", "eager"), ("fused C++ step", "1", "reduce-overhead"),
             ("module path", "0", "eager"), ("module path", "0", "max-autotune-no-cudagraphs")]
    rows = []
    for path_name, fused, mode in cases:
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, mode, fused, str(args.n)],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            sys.exit(f"{path_name} / {mode} failed:\n{out.stderr[-2000:]}")
        warm, tps = out.stdout.split()[-2:]
        rows.append(f"| {path_name} | {mode} | {warm} | {tps} |")
        print(rows[-1], flush=True)
    text = [f"# torch.compile of the decode step ({Path(args.model).name}, 2 threads, {args.n} tokens)", "",
            "| path | mode | warm-up + compile, 8 steps (s) | decode tok/s |", "|---|---|---|---|", *rows]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
