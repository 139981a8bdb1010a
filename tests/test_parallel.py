"""Tensor and expert parallelism on 2 CPU processes (gloo): logits and greedy generation equal the single
process's for every model shape and weight format; shapes that do not split are clear errors; a killed worker is a
clear error within seconds, in the API and in `levante serve --tp 2` (503, then exit non-zero)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from fixtures import hf_model, save_consolidated, save_hf

from levante import LLM
from levante.errors import WorkerError
from levante.shard import Shard, ShardError

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"

MODELS = {  # name -> (kind, overrides)
    "mixtral 8 experts top-2": ("mixtral_8x2", {}),
    "mixtral 6 experts top-3": ("mixtral_6x3", {}),
    "mistral sliding window": ("mistral_window", {}),
    "llama tied embeddings": ("llama_tied", {}),
}


def _dir(tmp_path_factory, kind: str, **overrides):
    d = tmp_path_factory.mktemp(kind)
    return save_hf(hf_model(kind, vocab_size=32000, **overrides), d / "m", tokenizer=True)


def _same(base: LLM, par: LLM, n: int = 24, atol: float = 1e-4) -> None:
    ids = base.tokenize(PROMPT)
    a, b = base.logits(ids), par.logits(ids)
    assert (a - b).abs().max().item() <= atol
    want = base(PROMPT, max_tokens=n, temperature=0)["choices"][0]["text"]
    assert par(PROMPT, max_tokens=n, temperature=0)["choices"][0]["text"] == want


CASES = [(name, False) for name in MODELS] + [(name, True) for name in MODELS if name.startswith("mixtral")]


@pytest.mark.parametrize(("name", "ep"), CASES, ids=[f"{n} {'ep2' if ep else 'tp2'}" for n, ep in CASES])
def test_two_ranks_equal_one(tmp_path_factory, name, ep):
    kind, over = MODELS[name]
    d = _dir(tmp_path_factory, kind, **over)
    base = LLM(str(d), n_ctx=128, n_threads=1)
    par = LLM(str(d), n_ctx=128, tensor_parallel_size=2, enable_expert_parallel=ep)
    try:
        _same(base, par)
        # the batched engine path (several rows, prefix cache swaps) runs on every rank too
        batch = par(["Hello there", "A much longer second prompt for the batch"], max_tokens=8, temperature=0)
        want = base(["Hello there", "A much longer second prompt for the batch"], max_tokens=8, temperature=0)
        assert [c["text"] for c in batch["choices"]] == [c["text"] for c in want["choices"]]
    finally:
        par.close()


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "ep2"])
def test_gpu_decoder_on_every_rank(tmp_path_factory, ep):
    """The GPU path of a parallel model (`ParallelLM.decoder()`: a CudaDecoder on each rank over its shard, with
    its static cache, Triton attention and fused MoE, the all-reduces run as hooks; here under the Triton
    interpreter): greedy tokens equal the single process's, batched with left padding and bucketed decode steps,
    pipelined as on a GPU, with speculation, and through the serving engine (rows joining and leaving, prefix
    reuse, two requests prefilled together)."""
    from levante.cuda import StaticCache
    from levante.engine import Engine
    from levante.generate import generate
    from levante.sampling import SamplingParams
    from levante.speculative import PromptLookup, Speculator

    greedy = SamplingParams.greedy()
    d = _dir(tmp_path_factory, "mixtral_8x2")
    base = LLM(str(d), n_ctx=64, n_threads=1)
    par = LLM(str(d), n_ctx=64, tensor_parallel_size=2, enable_expert_parallel=ep)
    try:
        tok = base.tokenizer
        prompts = [tok.encode(p) for p in (PROMPT, "Hello there", "A third, middling prompt")]
        with torch.inference_mode():
            want = [r.tokens for r in generate(base.model, tok, prompts, 6, greedy, stop_token_ids=set())]
            dec = par.model.decoder()
            got = [r.tokens for r in generate(dec, tok, prompts, 6, greedy, stop_token_ids=set())]
            assert got == want
            dec.pipelined = True  # each step sent before the last one's tokens are read back
            assert [r.tokens for r in generate(dec, tok, prompts, 6, greedy, stop_token_ids=set())] == want
            # speculation (an LLM's on a GPU): multi-token verifications and take-backs on every rank's cache
            loop = tok.encode("one two three four one two three four one two")
            spec = Speculator(PromptLookup(2), 3)
            solo = [r.tokens for r in generate(base.model, tok, [loop], 8, greedy, stop_token_ids=set())]
            assert [r.tokens for r in generate(dec, tok, [loop], 8, greedy, stop_token_ids=set(),
                                               speculator=spec)] == solo
            assert spec.stats.verifications > 0
        eng = Engine(par.model.decoder(), tok, n_ctx=64, max_batch=2).start()
        try:
            assert isinstance(eng.cache.local, StaticCache)
            assert eng.cache.local is eng.model.local._cache  # rank 0's warm-up kept the cache it was given
            calls = []
            eng.model.local.register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape)))
            with eng._cv:  # the first two wait together: one packed prefill on every rank; the third waits for a row
                reqs = [eng.submit(p, 6, greedy, stop_ids=set()) for p in prompts]
            assert [[ev.token for ev in r] for r in reqs] == want
            assert calls[0] == (2, max(len(p) for p in prompts[:2]))
            again = eng.submit(prompts[0], 6, greedy, stop_ids=set())
            assert [ev.token for ev in again] == want[0] and again.cached_tokens > 0
        finally:
            eng.shutdown()
    finally:
        par.close()


@pytest.mark.gpu
def test_two_gpus(tmp_path_factory):
    """With 2 GPUs: `LLM(..., device="cuda", tensor_parallel_size=2)` generates with the GPU decoder on both ranks
    (NCCL), tensor- and expert-parallel, giving one GPU's tokens."""
    from levante.parallel import ParallelDecoder

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    d = _dir(tmp_path_factory, "mixtral_8x2")
    one = LLM(str(d), n_ctx=128, device="cuda", dtype="float32")
    prompts = [PROMPT, "Hello there"]
    want = [c["text"] for c in one(prompts, max_tokens=12, temperature=0)["choices"]]
    for ep in (False, True):
        two = LLM(str(d), n_ctx=128, device="cuda", dtype="float32", tensor_parallel_size=2,
                  enable_expert_parallel=ep)
        try:
            assert isinstance(two.generation_model, ParallelDecoder)
            assert [c["text"] for c in two(prompts, max_tokens=12, temperature=0)["choices"]] == want
        finally:
            two.close()


def test_consolidated_and_f16_cache(tmp_path):
    d = save_consolidated(hf_model("mixtral_8x2", vocab_size=32000), tmp_path / "c")
    from fixtures import mistral_tokenizer_model

    (d / "tokenizer.model").write_bytes(mistral_tokenizer_model().read_bytes())
    base = LLM(str(d), n_ctx=128, n_threads=1, cache_type="f16")
    par = LLM(str(d), n_ctx=128, tensor_parallel_size=2, cache_type="f16")
    try:
        _same(base, par)
    finally:
        par.close()


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "ep2"])
def test_gguf_q4_k_m(tmp_path, ep):
    """K-quant rows split on whole 256-blocks; the rank's slices are the file's bytes, so the result equals the
    single process within the float32 rounding of a different summation order (the 1e-3 rule)."""
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model("mixtral_8x2", vocab_size=32000, hidden_size=512, intermediate_size=1024,
                           num_attention_heads=4, num_key_value_heads=2), tmp_path / "m", tokenizer=True)
    path = quantize_model(src, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M", progress=False)
    base = LLM(str(path), n_ctx=128, n_threads=1)
    par = LLM(str(path), n_ctx=128, tensor_parallel_size=2, enable_expert_parallel=ep)
    try:
        ids = base.tokenize(PROMPT)
        a, b = base.logits(ids), par.logits(ids)
        assert (a - b).abs().max().item() <= 1e-3 * a.abs().max().item()
        want = base(PROMPT, max_tokens=16, temperature=0)["choices"][0]["text"]
        assert par(PROMPT, max_tokens=16, temperature=0)["choices"][0]["text"] == want
    finally:
        par.close()


def test_awq(tmp_path):
    from levante.tools.awq import awq_quantize

    src = save_hf(hf_model("mistral_dense", vocab_size=32000, intermediate_size=128), tmp_path / "m", tokenizer=True)
    out = awq_quantize(src, tmp_path / "awq", PROMPT * 20, group_size=32, n_grid=4)
    base = LLM(str(out), n_ctx=128, n_threads=1)
    par = LLM(str(out), n_ctx=128, tensor_parallel_size=2)
    try:
        _same(base, par, atol=1e-3)
    finally:
        par.close()


def test_shapes_that_do_not_split(tmp_path):
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model("mistral_dense", vocab_size=32000, hidden_size=256, intermediate_size=512,
                           num_attention_heads=2, num_key_value_heads=1), tmp_path / "m", tokenizer=True)
    with pytest.raises(ShardError, match=r"kv heads \(1\) do not divide by the 2 ranks"):
        LLM(str(src), tensor_parallel_size=2)
    src = save_hf(hf_model("mistral_dense", vocab_size=32000, hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2), tmp_path / "k", tokenizer=True)
    path = quantize_model(src, tmp_path / "k.Q4_K_M.gguf", "Q4_K_M", progress=False)
    # wo is [256, 256]: 128 columns per rank cut a 256-value K-quant block
    msg = r"attn_output.weight: its 256 columns over 2 ranks are 128 each, not whole 256-value quantization blocks"
    with pytest.raises(ShardError, match=msg):
        LLM(str(path), tensor_parallel_size=2)
    with pytest.raises(ShardError, match="needs a mixture-of-experts model"):
        LLM(str(src), tensor_parallel_size=2, enable_expert_parallel=True)


def test_shard_memory_is_the_rank_share(tmp_path):
    """Each rank holds its slices: about half of the layers' weights (norms and router are replicated)."""
    from levante.loader import load

    d = save_hf(hf_model("mixtral_8x2", vocab_size=32000, hidden_size=128, intermediate_size=256), tmp_path / "m")

    def nbytes(m):
        return sum(b.numel() * b.element_size() for n, b in m.named_buffers() if n.startswith("model.layers."))

    whole = load(d).model
    for ep in (False, True):
        parts = [load(d, shard=Shard(r, 2, ep)).model for r in range(2)]
        for p in parts:
            assert nbytes(p) < 0.56 * nbytes(whole)
        assert [p.model.layers[0].ffn.expert_ids for p in parts] == (
            [[0, 1, 2, 3], [4, 5, 6, 7]] if ep else [list(range(8))] * 2)


def _kill_worker(llm: LLM) -> int:
    pid = llm.model._workers.procs[0].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_worker_is_a_clear_error(tmp_path_factory):
    d = _dir(tmp_path_factory, "mixtral_8x2")
    par = LLM(str(d), n_ctx=128, tensor_parallel_size=2)
    par(PROMPT, max_tokens=2, temperature=0)
    pid = _kill_worker(par)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=rf"rank 1 \(pid {pid}\) was killed by signal 9"):
        par(PROMPT, max_tokens=4, temperature=0)
    assert time.monotonic() - t0 < 10
    with pytest.raises(WorkerError):  # and stays an error
        par.logits(par.tokenize("x"))
    par.close()


def test_killed_worker_during_generation(tmp_path_factory):
    d = _dir(tmp_path_factory, "mixtral_8x2")
    par = LLM(str(d), n_ctx=256, tensor_parallel_size=2)
    stream = par(PROMPT, max_tokens=200, temperature=0, stream=True)
    next(stream)
    _kill_worker(par)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 10
    par.close()


def test_serve_tp2(tmp_path_factory):
    """`levante serve --tp 2` answers the openai client; a killed worker gives 503 and the server exits non-zero."""
    import httpx
    import openai
    from conftest import _free_port

    d = _dir(tmp_path_factory, "mixtral_8x2")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "levante", "serve", "-m", str(d), "--tp", "2", "--port",
                                 str(port), "-c", "256", "--log-level", "warning"], stdout=subprocess.DEVNULL,
                                stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "levante serve --tp 2 did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                           temperature=0)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens > 0
        workers = _children(proc.pid)
        assert len(workers) == 1
        body = {"model": "m", "prompt": "Hi", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            os.kill(workers[0], signal.SIGKILL)
            t0 = time.monotonic()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert time.monotonic() - t0 < 10
        err = events[-1]["error"]
        assert err["code"] == "unavailable" and "rank 1" in err["message"], err
        try:  # until it has stopped: 503
            resp = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=10)
            assert resp.status_code == 503, resp.text
        except httpx.HTTPError:  # already stopped
            pass
        assert proc.wait(30) != 0
        assert "rank 1" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_ep_needs_experts_and_sizes():
    with pytest.raises(ValueError, match="enable_expert_parallel needs tensor_parallel_size >= 2"):
        LLM(None, enable_expert_parallel=True)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        LLM(None, tensor_parallel_size=0)
    assert torch.distributed.is_available()


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "ep2"])
def test_gguf_per_expert_layout_q8_0(tmp_path, ep):
    from gguf_fixtures import write_gguf_from_hf

    path = write_gguf_from_hf(hf_model("mixtral_6x3", vocab_size=320, hidden_size=128, intermediate_size=128),
                              tmp_path / "old.gguf", "Q8_0", layout="per_expert")
    from levante.loader import load
    from levante.parallel import launch

    ids = torch.arange(5, 40)[None]
    want = load(path).model(ids)
    par = launch(str(path), 2, ep).model  # no tokenizer in this file: the model alone
    try:
        assert (par(ids) - want).abs().max().item() <= 1e-3 * want.abs().max().item()  # the 1e-3 rule
    finally:
        par.close()


def test_torchrun(tmp_path_factory):
    """Under torchrun each process joins torchrun's group: rank 0 prints, the other rank serves and exits 0."""
    d = _dir(tmp_path_factory, "mixtral_8x2")
    cmd = ["-m", "levante", "run", "-m", str(d), "-p", "Hello", "--temp", "0", "-n", "12"]
    want = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120, check=True).stdout
    got = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *cmd, "--tp", "2"],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout == want


@pytest.mark.parametrize("fmt", ["hf", "gguf Q8_0"])
def test_low_rank(tmp_path, fmt):
    """A compressed model's factors are split as their product would be (B by rows, A by columns)."""
    from levante.tools.compress import compress_model
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model("mixtral_8x2", vocab_size=32000, intermediate_size=128), tmp_path / "m", tokenizer=True)
    path = tmp_path / "low"
    compress_model(src, path, ratio=0.25)
    if fmt != "hf":
        path = quantize_model(path, tmp_path / "low.Q8_0.gguf", "Q8_0", progress=False)
    base = LLM(str(path), n_ctx=128, n_threads=1)
    for ep in (False, True):
        par = LLM(str(path), n_ctx=128, tensor_parallel_size=2, enable_expert_parallel=ep)
        try:
            ids = base.tokenize(PROMPT)
            a, b = base.logits(ids), par.logits(ids)
            assert (a - b).abs().max().item() <= (1e-4 if fmt == "hf" else 1e-3 * a.abs().max().item())
        finally:
            par.close()
