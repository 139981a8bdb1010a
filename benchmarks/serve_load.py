"""Load test of `levante serve` (and llama-cpp-python's server on the same GGUF, when available).

    python benchmarks/serve_load.py [-m MODEL.gguf] [--clients 8] [--max-tokens 64] [-t 2] [--prefix-tokens 1000]

Starts each server as a subprocess on a free port, then:
  * N concurrent streaming clients (/v1/completions, temperature 0, EOS suppressed with logit_bias so every
    client gets exactly --max-tokens tokens): total throughput (completion tok/s over the wall time),
    p50/p99 time to first token, p50/p99 inter-token latency (gap between streamed chunks);
  * prefix cache: TTFT of a request with a ~1,000-token prompt, then of a second request sharing that prefix
    (different last sentence), one at a time.
Writes benchmarks/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class ServerProc:
    def __init__(self, name: str, cmd: list[str], port: int, log: Path) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT.parent,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 600) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} did not start within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def stream_one(client: httpx.AsyncClient, prompt, max_tokens: int, bias: dict) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logit_bias": bias}
    t0 = time.perf_counter()
    stamps: list[float] = []
    n_chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                n_chunks += 1
    return {"ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": n_chunks, "end": time.perf_counter()}


async def load(url: str, clients: int, max_tokens: int, bias: dict) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600)) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream_one(c, f"Client {i}: write a story about the sea.", max_tokens, bias)
                                     for i in range(clients)))
        wall = max(r["end"] for r in res) - t0
    tokens = clients * max_tokens  # EOS suppressed: every client decodes max_tokens tokens
    ttft = [r["ttft"] for r in res]
    itl = [x for r in res for x in r["itl"]]
    return {"tok_s": tokens / wall, "wall": wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "chunks": sum(r["chunks"] for r in res)}


async def prefix(url: str, prefix_text: str, bias: dict) -> tuple[float, float]:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600)) as c:
        a = await stream_one(c, prefix_text + "\nQuestion one: what is the first word?", 1, bias)
        b = await stream_one(c, prefix_text + "\nQuestion two: what is the last word?", 1, bias)
    return a["ttft"], b["ttft"]


def make_prefix(tok, n: int) -> str:
    words = ("the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches "
             "and a curious sailor counts distant lighthouses along the northern coast ").split()
    out, i = [], 0
    while len(tok.encode(" ".join(out), add_bos=False)) < n:
        out.extend(words[i % len(words)] for _ in range(20))
        i += 1
    while len(tok.encode(" ".join(out), add_bos=False)) > n:
        out.pop()
    return " ".join(out)


def run_engine(name: str, cmd: list[str], port: int, args, bias: dict, prefix_text: str) -> dict:
    log = Path(tempfile.gettempdir()) / f"serve_load_{name}.log"
    srv = ServerProc(name, cmd, port, log)
    try:
        t0 = time.time()
        srv.wait_ready()
        startup = time.time() - t0
        asyncio.run(load(srv.url, 1, 2, bias))  # warm-up
        res = asyncio.run(load(srv.url, args.clients, args.max_tokens, bias))
        res["prefix_first"], res["prefix_second"] = asyncio.run(prefix(srv.url, prefix_text, bias))
        res["startup"] = startup
        return res
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "serve_load.md"))
    ap.add_argument("--url", default=None, help="only the clients, against this running server (model alias "
                    "'bench'): after one warm-up request, prints the load's result as one line of JSON")
    ap.add_argument("--suppress", type=int, nargs="*", default=[], help="with --url: token ids biased out (EOS)")
    args = ap.parse_args()
    if args.url:
        bias = {str(t): -100 for t in args.suppress}
        asyncio.run(load(args.url, 1, 2, bias))
        print(json.dumps(asyncio.run(load(args.url, args.clients, args.max_tokens, bias))))
        return 0

    sys.path.insert(0, str(ROOT.parent))
    from levante.loader import default_model_path, read_checkpoint
    from levante.tokenizer import load_tokenizer

    model = Path(args.model) if args.model else default_model_path()
    tok = read_checkpoint(model).tokenizer or load_tokenizer(model)  # a GGUF's own, or a directory's file
    bias = {str(t): -100 for t in sorted(tok.eos_ids)}
    prefix_text = make_prefix(tok, args.prefix_tokens)
    RESULTS.mkdir(parents=True, exist_ok=True)

    rows: list[tuple[str, dict | str]] = []
    port = free_port()
    cmd = [sys.executable, "-m", "levante", "serve", "-m", str(model), "--port", str(port), "--max-batch",
           str(max(args.clients, 2)), "--n-ctx", str(args.n_ctx), "-t", str(args.threads), "--log-level", "warning",
           "--model-alias", "bench"]
    print("levante:", " ".join(cmd), flush=True)
    try:
        rows.append(("levante", run_engine("levante", cmd, port, args, bias, prefix_text)))
    except Exception as e:  # noqa: BLE001 - reported in the table
        rows.append(("levante", f"failed: {e}"))
    print(rows[-1], flush=True)

    if args.skip_llamacpp:
        rows.append(("llama-cpp-python server", "skipped (--skip-llamacpp)"))
    else:
        try:
            import llama_cpp.server.app  # noqa: F401 - needs the [server] extra (sse-starlette, ...)

            available = None
        except Exception as e:  # noqa: BLE001
            available = f"not available: {type(e).__name__}: {e}"
        if available:
            rows.append(("llama-cpp-python server", available))
        else:
            port = free_port()
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port),
                   "--n_ctx", str(args.n_ctx), "--n_threads", str(args.threads), "--model_alias", "bench",
                   # by default a new request interrupts the running stream; queue them instead
                   "--interrupt_requests", "False"]
            print("llama.cpp:", " ".join(cmd), flush=True)
            try:
                rows.append(("llama-cpp-python server", run_engine("llamacpp", cmd, port, args, bias, prefix_text)))
            except Exception as e:  # noqa: BLE001
                rows.append(("llama-cpp-python server", f"failed: {e}"))
        print(rows[-1], flush=True)

    lines = [
        "# Server load test", "",
        f"`python benchmarks/serve_load.py --clients {args.clients} --max-tokens {args.max_tokens} -t {args.threads} "
        f"--prefix-tokens {args.prefix_tokens}`", "",
        f"Model `{model.name}`, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}. {args.clients} concurrent streaming clients x "
        f"{args.max_tokens} tokens (greedy, EOS suppressed); latencies in ms. Prefix: TTFT of a "
        f"{args.prefix_tokens}-token prompt, then of a 2nd prompt sharing it.", "",
        "| server | total tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | prefix TTFT 1st | prefix TTFT 2nd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        if isinstance(r, str):
            lines.append(f"| {name} | {r} | | | | | | |")
        else:
            ms = lambda x: f"{x * 1000:.0f}"  # noqa: E731
            lines.append(f"| {name} | {r['tok_s']:.1f} | {ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | "
                         f"{ms(r['itl_p50'])} | {ms(r['itl_p99'])} | {ms(r['prefix_first'])} | "
                         f"{ms(r['prefix_second'])} |")
    lines += ["", "ITL is the gap between streamed text chunks (a chunk may hold more than one token when a token "
              "completes no text on its own). llama-cpp-python's server runs one request at a time (no continuous "
              "batching), so its TTFT grows with the queue."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
