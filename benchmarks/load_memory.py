"""Host memory of loading a model onto a GPU (issue 13's real-size load), at Mixtral-8x7B's layer sizes.

Writes a random bf16 Mixtral HF checkpoint of `--layers` layers with Mixtral-8x7B's shapes (2.8 GiB per layer)
and its Q4_K_M GGUF (`levante quantize`), then loads each in a fresh subprocess while a thread samples the
process's anonymous resident memory (RssAnon: what it holds beyond the page cache of the mapped files, i.e. a
second copy of the weights in host RAM would show here).

On a GPU the weights go to `cuda` through `levante.load(..., device="cuda")`, and transformers'
`from_pretrained(device_map="cuda")` loads the bf16 checkpoint side by side. Without one they go to the meta
device through the same steps (the checkpoint read as views of the mapped files, the model built, GGUF blocks
packed, the experts fused), all but the copies to the device themselves, which read the mapped file a module at a
time. Results: benchmarks/results/load_memory.md.

    python benchmarks/load_memory.py [--layers 2] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from awq_memory import make_mixtral  # noqa: E402

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})
import torch
import levante.cuda  # the modules a load imports, imported before the baseline: they are not the weights
import levante.formats.gguf
import levante.formats.hf
import levante.loader
if {loader!r} == "transformers":
    import transformers


def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


peak, done = [0], threading.Event()


def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)


base = anon()
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
with torch.inference_mode():
    if {loader!r} == "transformers":
        net = transformers.AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.bfloat16, device_map="cuda")
    elif {device!r} == "cuda":
        net = levante.loader.load({path!r}, dtype="bfloat16", device="cuda").model
    else:  # levante.loader.load's GPU path, onto the meta device
        from levante.cuda import to_device
        from levante.model import build_model

        ckpt = levante.loader.read_checkpoint(levante.loader.Path({path!r}), for_cpu=False)
        net = to_device(build_model(ckpt.config, ckpt.weights, torch.bfloat16).eval(), torch.device("meta"))
    if {device!r} == "cuda":
        torch.cuda.synchronize()
seconds = time.perf_counter() - t0
done.set()
peak[0] = max(peak[0], anon())
on_device = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
print("RESULT", json.dumps({{"peak": peak[0] - base, "after": anon() - base, "seconds": seconds,
                            "model_bytes": on_device}}))
"""


def measure(loader: str, path: Path, device: str) -> dict:
    code = CHILD.format(root=str(ROOT), loader=loader, path=str(path), device=device)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{loader} load of {path.name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.split("RESULT", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_memory.md"))
    args = ap.parse_args()
    import torch

    from levante.tools.quantize import quantize_model

    device = "cuda" if torch.cuda.is_available() else "meta"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="load_mem_"))
    src = work / "bf16"
    if not (src / "config.json").is_file():
        make_mixtral(src, args.layers, 4096, 14336, 8)
    gguf = work / "q4km.gguf"
    if not gguf.is_file():
        t = time.perf_counter()
        quantize_model(src, gguf, "Q4_K_M", progress=False)
        print(f"quantized in {time.perf_counter() - t:.0f} s", flush=True)
    files = {"bf16 safetensors": (src, sum(f.stat().st_size for f in src.glob("*.safetensors"))),
             "Q4_K_M GGUF": (gguf, gguf.stat().st_size)}
    runs = [("levante", name) for name in files]
    if device == "cuda":
        runs.append(("transformers", "bf16 safetensors"))
    rows = []
    for loader, name in runs:
        path, size = files[name]
        r = measure(loader, path, device)
        rows.append(f"| {loader} | {name} | {size / 2**30:.2f} | {r['model_bytes'] / 2**30:.2f} | "
                    f"{r['peak'] / 2**20:.0f} | {r['peak'] / size * 100:.1f} % | {r['after'] / 2**20:.0f} | "
                    f"{r['seconds']:.1f} |")
        print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"none: the meta device ({platform.node()})"
    text = "\n".join([
        "# Host memory of a GPU load (benchmarks/load_memory.py)",
        "",
        f"Mixtral-8x7B's shapes, {args.layers} layers (hidden 4096, 8 experts of 14336, vocab 32000), random "
        f"weights; device: {gpu}. Anonymous resident memory (RssAnon) of the loading process, sampled every "
        "2 ms, above what it held before the load: a second host copy of the weights would show here (the mapped "
        "files' pages are page cache, not counted).",
        "",
        "| loader | file | file GiB | model on the device, GiB | host peak MiB | peak / file | host after MiB "
        "| seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
