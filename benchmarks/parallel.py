"""Tensor / expert parallelism on this machine, side by side in one run: memory per rank and speed.

    python benchmarks/parallel.py [-r 2] [--layers 13]

Model: a random Mixtral-shaped model of ~1.5 B parameters written as a Q4_0 GGUF (hidden 2048, 16 heads / 8 kv
heads, 8 experts of 1792, top-2, 13 layers, SmolLM2's 49152-token vocabulary and tokenizer), made here.

Memory: peak RSS (VmHWM) of each process after loading and generating, minus the RSS of a process that only
imported levante (torch and the C++ kernels): the "model share". Single process vs each rank of --tp 2 and --ep 2.

Speed: `levante bench`'s measurement (prefill of -p tokens, greedy decode of -n) for 1 process with 2 threads vs
--tp 2 / --ep 2 with 1 thread per rank, reps interleaved; ratios are medians of per-rep ratios. Writes
benchmarks/results/parallel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys
import torch
from levante import LLM
from levante.tools.bench import run_bench

def hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

path, mode, n_prompt, n_gen, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
kw = {} if mode == "1" else dict(tensor_parallel_size=2, enable_expert_parallel=mode == "ep2")
llm = LLM(path, n_ctx=n_prompt + n_gen + 8, n_threads=2 if mode == "1" else 1, **kw)
res = run_bench(llm, n_prompt, n_gen, reps)
pids = [os.getpid()] + ([p.pid for p in llm.model._workers.procs] if mode != "1" else [])
print(json.dumps({"prefill": res.prefill_tps, "decode": res.decode_tps, "rss": [hwm(p) for p in pids]}))
llm.close()
"""

BASELINE = r"""
import os, levante, torch
from levante.quant.kernels import decode_ext
decode_ext()
with open(f"/proc/{os.getpid()}/status") as f:
    print(next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS")))
"""


def write_model(path: Path, layers: int) -> int:
    """The random Q4_0 Mixtral-shaped GGUF; returns its parameter count."""
    import gguf

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import smollm2_gguf

    H, heads, kv, ffn, E = 2048, 16, 8, 1792, 8
    hd = H // heads
    rng = np.random.default_rng(0)
    src = gguf.GGUFReader(smollm2_gguf())
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random Mixtral-shaped 1.5B")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0))
    for key, val in {"llama.vocab_size": vocab, "llama.context_length": 4096, "llama.embedding_length": H,
                     "llama.block_count": layers, "llama.feed_forward_length": ffn, "llama.rope.dimension_count": hd,
                     "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv,
                     "llama.expert_count": E, "llama.expert_used_count": 2}.items():
        w.add_uint32(key, val)
    w.add_float32("llama.rope.freq_base", 1e6)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for name, field in src.fields.items():  # SmolLM2's tokenizer
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(name, field.contents(), vtype)
    n_params = 0

    def q4_0(rows: int, cols: int, scale: float) -> None:
        nonlocal n_params
        n_params += rows * cols
        blocks = np.empty((rows, cols // 32, 18), dtype=np.uint8)
        blocks[:, :, :2] = np.full((rows, cols // 32, 1), scale, dtype=np.float16).view(np.uint8)
        blocks[:, :, 2:] = rng.integers(0, 256, size=(rows, cols // 32, 16), dtype=np.uint8)
        return blocks.reshape(rows, -1)

    def add(name: str, arr: np.ndarray, qtype=gguf.GGMLQuantizationType.Q4_0) -> None:
        w.add_tensor(name, arr, raw_dtype=qtype)

    add("token_embd.weight", q4_0(vocab, H, 0.01))
    add("output.weight", q4_0(vocab, H, 0.01))
    add("output_norm.weight", np.ones(H, dtype=np.float32), gguf.GGMLQuantizationType.F32)
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", np.ones(H, dtype=np.float32), gguf.GGMLQuantizationType.F32)
        add(p + "ffn_norm.weight", np.ones(H, dtype=np.float32), gguf.GGMLQuantizationType.F32)
        add(p + "attn_q.weight", q4_0(heads * hd, H, 0.004))
        add(p + "attn_k.weight", q4_0(kv * hd, H, 0.004))
        add(p + "attn_v.weight", q4_0(kv * hd, H, 0.004))
        add(p + "attn_output.weight", q4_0(H, heads * hd, 0.004))
        add(p + "ffn_gate_inp.weight", rng.normal(0, 0.02, (E, H)).astype(np.float32),
            gguf.GGMLQuantizationType.F32)
        n_params += E * H
        for kind, (r, c) in (("gate", (ffn, H)), ("up", (ffn, H)), ("down", (H, ffn))):
            add(f"{p}ffn_{kind}_exps.weight", np.stack([q4_0(r, c, 0.004) for _ in range(E)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n_params


def run(path: Path, mode: str, n_prompt: int, n_gen: int, reps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(n_prompt), str(n_gen), str(reps)],
                         capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-r", "--reps", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "parallel.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mixtral-1.5b.Q4_0.gguf"
        n_params = write_model(path, args.layers)
        size = path.stat().st_size
        base = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                  check=True).stdout)
        modes = ["1", "tp2", "ep2"]
        res: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.reps):  # interleaved: each rep runs every mode once, in a fresh process
            for m in modes:
                res[m].append(run(path, m, args.n_prompt, args.n_gen, 1))
                print(m, res[m][-1], flush=True)

    def med(m: str, key: str) -> float:
        return statistics.median(x for r in res[m] for x in r[key])

    def ratio(m: str, key: str) -> float:
        return statistics.median(a[key][0] / b[key][0] for a, b in zip(res[m], res["1"]))

    share = {m: [statistics.median(r["rss"][i] for r in res[m]) - base for i in range(len(res[m][0]["rss"]))]
             for m in modes}
    mib = 2**20
    lines = [
        "# Tensor / expert parallelism on one 2-core machine (gloo)", "",
        f"`python benchmarks/parallel.py -r {args.reps}`: a random Mixtral-shaped model, {n_params / 1e9:.2f} B "
        f"parameters, Q4_0 GGUF of {size / mib:.0f} MiB ({args.layers} layers, hidden 2048, 16 / 8 heads, "
        f"8 experts of 1792, top-2, 49152-token vocabulary). torch {__import__('torch').__version__}, "
        f"{os.cpu_count()} CPUs.", "",
        "## Memory", "",
        f"Peak RSS (VmHWM) after loading and generating, minus {base / mib:.0f} MiB (a process that only imported "
        "levante and its kernels): the model share.", "",
        "| run | process | peak RSS | model share | share vs single process |", "|---|---|---|---|---|",
    ]
    single = share["1"][0]
    for m in modes:
        for i, s in enumerate(share[m]):
            run_name, proc = ("1 process", "-") if m == "1" else (m, f"rank {i}")
            lines.append(f"| {run_name} | {proc} | {(s + base) / mib:.0f} MiB | {s / mib:.0f} MiB | "
                         f"{s / single:.2f}x |")
    lines += [
        "", "## Speed", "",
        f"`levante bench` measurement, prefill {args.n_prompt} tokens and greedy decode {args.n_gen}: one process "
        "with 2 threads vs 2 ranks with 1 thread each (the same 2 cores).", "",
        "| run | prefill tok/s | decode tok/s | prefill ratio | decode ratio |", "|---|---|---|---|---|",
        f"| 1 process, 2 threads | {med('1', 'prefill'):.1f} | {med('1', 'decode'):.2f} | 1.00x | 1.00x |",
    ]
    for m in ("tp2", "ep2"):
        lines.append(f"| {m}, 1 thread per rank | {med(m, 'prefill'):.1f} | {med(m, 'decode'):.2f} | "
                     f"{ratio(m, 'prefill'):.2f}x | {ratio(m, 'decode'):.2f}x |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
