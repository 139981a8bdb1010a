"""Peak RSS of `levante quantize --awq` on a random Mixtral (layer-by-layer AWQ: memory ~ one layer).

Writes a random bf16 Mixtral HF directory (default: hidden 512, intermediate 1536, 8 layers, 8 experts,
vocab 32000 with the Mixtral tokenizer: 330 MB of bf16 weights in two shards), runs the CLI in a fresh
subprocess (one thread) and prints that process's peak resident set size (ru_maxrss).

    python benchmarks/awq_memory.py [--layers 8] [--hidden 512] [--intermediate 1536] [--experts 8]
                                    [--calib-chars 2000] [--awq-module PATH]

`--awq-module PATH` runs the CLI with another copy of the calibration tool levante/tools/awq.py (e.g. an
older commit's, `git show REV:levante/tools/awq.py > /tmp/awq_old.py`) to compare before / after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from levante.formats.safetensors import save_safetensors  # noqa: E402
from tests.fixtures import mistral_tokenizer_model  # noqa: E402

CHILD = r"""
import importlib.util, os, resource, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
if {module!r}:
    spec = importlib.util.spec_from_file_location("levante.tools.awq", {module!r})
    mod = importlib.util.module_from_spec(spec)
    sys.modules["levante.tools.awq"] = mod
    spec.loader.exec_module(mod)
from levante.cli import main
rc = main({argv!r})
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(rc)
"""


def make_mixtral(path: Path, layers: int, hidden: int, inter: int, experts: int, vocab: int = 32000) -> int:
    """A random bf16 Mixtral HF directory (classic per-expert names, two shards); returns its weight bytes."""
    path.mkdir(parents=True, exist_ok=True)
    heads, kv = hidden // 64, max(1, hidden // 256)
    conf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 64, "rms_norm_eps": 1e-5,
            "rope_theta": 1e6, "max_position_embeddings": 4096, "num_local_experts": experts,
            "num_experts_per_tok": 2, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    shutil.copy(mistral_tokenizer_model(), path / "tokenizer.model")
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).bfloat16()

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(hidden, generator=gen)).bfloat16()

    weight_map: dict[str, str] = {}
    total = 0
    shards = [range(0, layers // 2), range(layers // 2, layers)]
    for si, rng in enumerate(shards):
        name = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        t: dict[str, torch.Tensor] = {}
        if si == 0:
            t["model.embed_tokens.weight"] = rnd(vocab, hidden)
        for i in rng:
            p = f"model.layers.{i}."
            t[p + "input_layernorm.weight"] = norm()
            t[p + "post_attention_layernorm.weight"] = norm()
            t[p + "self_attn.q_proj.weight"] = rnd(heads * 64, hidden)
            t[p + "self_attn.k_proj.weight"] = rnd(kv * 64, hidden)
            t[p + "self_attn.v_proj.weight"] = rnd(kv * 64, hidden)
            t[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * 64)
            t[p + "block_sparse_moe.gate.weight"] = rnd(experts, hidden)
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                t[q + "w1.weight"], t[q + "w3.weight"] = rnd(inter, hidden), rnd(inter, hidden)
                t[q + "w2.weight"] = rnd(hidden, inter)
        if si == len(shards) - 1:
            t["model.norm.weight"] = norm()
            t["lm_head.weight"] = rnd(vocab, hidden)
        save_safetensors(t, path / name, metadata={"format": "pt"})
        total += sum(x.numel() * x.element_size() for x in t.values())
        weight_map.update({k: name for k in t})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--calib-chars", type=int, default=2000)
    ap.add_argument("--awq-module", default="", help="path of another awq.py to run instead of levante's")
    ap.add_argument("--workdir", default=None, help="where to write the model (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="awq_mem_"))
    src = work / "src"
    nbytes = make_mixtral(src, args.layers, args.hidden, args.intermediate, args.experts)
    calib = work / "calib.txt"
    calib.write_text((ROOT / "tests" / "data" / "oracle_text.txt").read_text(encoding="utf-8")[: args.calib_chars])
    out = work / "awq"
    argv = ["quantize", "--awq", "-m", str(src), "-o", str(out), "--calib", f"@{calib}", "--force"]
    code = CHILD.format(root=str(ROOT), module=str(Path(args.awq_module).resolve()) if args.awq_module else "",
                        argv=argv)
    t = time.time()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    sys.stderr.write(res.stderr[-3000:])
    if res.returncode:
        raise SystemExit(f"quantize failed (rc {res.returncode})")
    peak = int(res.stdout.split("PEAK_RSS_KB")[1].split()[0])
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.experts} experts; {nbytes / 2**20:.0f} MiB bf16 ({nbytes * 2 / 2**20:.0f} MiB as float32); "
          f"output {out_bytes / 2**20:.0f} MiB")
    print(f"awq module: {args.awq_module or 'levante.tools.awq'}; {time.time() - t:.0f} s; "
          f"peak RSS {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
