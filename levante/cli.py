"""The `levante` command line: run, chat, info, quantize (more subcommands arrive with their issues)."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence

from .errors import LevanteError


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="model: GGUF file, HF or Mistral directory, or HF repo id "
                        "(default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context window in tokens (default: min(model, 4096))")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype for float weights (auto: bfloat16 for bf16 checkpoints, else float32)")
    p.add_argument("-b", "--n-batch", type=int, default=512, help="prompt tokens per forward pass (prefill chunk)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("-ctk", "--cache-type", default="auto", choices=["auto", "f32", "f16"],
                   help="KV cache type: auto = the compute dtype (exact); f16 = llama.cpp's default, half the "
                        "cache memory and reads, keys/values rounded to f16")


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (this process is rank 0; under torchrun, torchrun's processes)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: split every layer over N processes (default: 1)")
    x.add_argument("--ep", type=int, default=0, metavar="N",
                   help="expert parallelism: whole experts on N processes, attention split over them")


def _add_speculative(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (exact: same output, fewer forward passes)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--lookup", action="store_true",
                   help="prompt lookup: propose the tokens that followed the last n-gram earlier in the text")
    x.add_argument("-md", "--draft-model", default=None,
                   help="draft model (same vocabulary) proposing tokens for the main model to verify")
    g.add_argument("--draft-max", "--spec-tokens", dest="spec_tokens", type=int, default=8,
                   help="most tokens proposed per step, 1-16 (default: 8; fewer or none when they do not pay)")
    g.add_argument("--lookup-ngram", type=int, default=3, help="longest n-gram prompt lookup matches (default: 3)")


def _add_sampling(p: argparse.ArgumentParser, temp: float) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=256, help="tokens to generate (default: 256)")
    p.add_argument("--temp", type=float, default=temp, help=f"temperature, 0 = greedy (default: {temp})")
    p.add_argument("--top-k", type=int, default=40, help="top-k filter, 0 = off (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p (nucleus) filter (default: 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p filter (default: 0.05)")
    p.add_argument("--typical-p", type=float, default=1.0, help="locally typical sampling, 1 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1 = off (default: 1.0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract count * value from the logits of recent tokens (default: 0)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract value from the logits of tokens seen recently (default: 0)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed (same seed -> same output)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="levante",
        description="levante: run Mixtral, Mistral and Llama-architecture models (GGUF, safetensors, consolidated).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="complete a prompt, streaming the output",
                       description="Complete PROMPT with the model and stream the text to stdout.")
    _add_model(p)
    p.add_argument("-p", "--prompt", default=None, help="the prompt (default: read from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="timings (first token, decode speed) and speculative decoding counters on stderr")
    _add_sampling(p, 0.8)
    _add_speculative(p)
    _add_parallel(p)

    p = sub.add_parser("chat", help="interactive chat in the model's chat format",
                       description="Interactive chat. Type a message, Enter to send; /reset clears, /exit quits.")
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p, 0.2)
    _add_speculative(p)
    _add_parallel(p)

    p = sub.add_parser("info", help="print architecture, sizes, quant types and tokenizer facts",
                       description="Describe a model file or directory without running it.")
    p.add_argument("model", nargs="?", default=None, help="model path or repo id (default: the embedded model)")
    p.add_argument("-m", "--model", dest="model_opt", default=None, help="same as the positional MODEL")

    p = sub.add_parser("bench", help="measure prefill and decode speed (like llama-bench)",
                       description="Time prefill of -p tokens and decode of -n tokens, -r times; print a table.")
    _add_model(p)
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens to prefill (default: 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="tokens to decode (default: 128)")
    p.add_argument("-r", "--reps", type=int, default=3, help="repetitions (default: 3)")
    p.add_argument("-o", "--output", choices=["md", "csv"], default="md", help="table format (default: md)")
    _add_parallel(p)

    p = sub.add_parser("quantize", help="write a GGUF file in a quantization type, or an AWQ checkpoint",
                       description="Convert a HF / Mistral directory or a GGUF file to GGUF of type TYPE, "
                                   "or (--awq -m IN -o OUT --calib TEXT) to an AWQ 4-bit HF directory.")
    p.add_argument("input", nargs="?", help="HF safetensors dir, Mistral consolidated dir, or GGUF file")
    p.add_argument("output", nargs="?", help="output .gguf path (or AWQ output directory)")
    p.add_argument("--type", help="F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.add_argument("--awq", action="store_true", help="AWQ 4-bit (AutoAWQ GEMM layout) with activation-aware "
                                                      "calibration; writes a Hugging Face directory")
    p.add_argument("-m", "--model", dest="awq_model", default=None, help="input model (same as INPUT)")
    p.add_argument("-o", "--output", dest="awq_output", default=None, help="output path (same as OUTPUT)")
    p.add_argument("--calib", default=None, help="AWQ calibration text, or @FILE to read it from a file")
    p.add_argument("--group-size", type=int, default=128, help="AWQ group size (default: 128)")
    p.add_argument("--expand-low-rank", action="store_true",
                   help="for a low-rank input (levante compress output): write B @ A as full matrices. By default "
                        "the factors are kept as separate quantized tensors (blk.L.ffn_gate[.E].lr_a / lr_b), which "
                        "keeps the savings but only levante can load: llama.cpp cannot load factorised tensors, so "
                        "use this flag for a file llama.cpp (or other GGUF readers) can run. With --awq: "
                        "quantize B @ A instead of the factors A and B (an AWQ checkpoint vLLM / transformers load)")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming)",
                       description="Serve the model over an OpenAI-compatible HTTP API with continuous batching.")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-batch", type=int, default=8, help="concurrent sequences in a batch (default: 8)")
    p.add_argument("--n-ctx", type=int, default=None, help="context window per sequence (same as -c)")
    p.add_argument("--model-alias", default=None, help="model id reported by /v1/models (default: file name)")
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens accepted (default: 4096)")
    p.add_argument("--max-n", type=int, default=8, help="largest n (choices per request) accepted (default: 8)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000,
                   help="largest request body in bytes (default: 1000000)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")
    p.add_argument("--no-special-in-prompt", action="store_true",
                   help="raw completions: encode special-token strings in the prompt as text (by default they "
                        "become control tokens, as in llama.cpp). Chat messages are always text.")
    _add_speculative(p)
    _add_parallel(p)

    p = sub.add_parser("perplexity", help="perplexity of a model on a text file (llama.cpp-compatible)",
                       description="Perplexity over non-overlapping chunks of -c tokens, scoring the second half of "
                                   "each (llama.cpp's method; BOS replaces each chunk's first token when the model "
                                   "adds BOS). --stride S: Hugging Face-style sliding windows instead.")
    _add_model(p)
    p.add_argument("-f", "--file", required=True, help="text file to evaluate")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window mode: windows of -c tokens every S tokens, each token scored once")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most N chunks / windows")

    p = sub.add_parser("compare", help="compare two models on a text: perplexity, KL, top-1 agreement",
                       description="Run BASE (-m) and OTHER (-m2) over the same chunks of TEXT; report perplexity "
                                   "of both, mean KL(base || other) per token and top-1 agreement.")
    _add_model(p)
    p.add_argument("-m2", "--model2", required=True, help="the other model (e.g. a quantized or compressed copy)")
    p.add_argument("-f", "--file", required=True, help="text file to evaluate")
    p.add_argument("--stride", type=int, default=None, help="sliding-window mode (see `levante perplexity`)")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most N chunks")
    p.add_argument("-o", "--output", default=None,
                   help="markdown report path (a PNG plot is written next to it, same name .png)")

    p = sub.add_parser("compress", help="low-rank (truncated SVD) compression of the MLP / expert matrices",
                       description="Replace each expert (MoE) or MLP (dense) matrix by two low-rank factors and "
                                   "write a HF directory (FORMATS.md 'Low-rank Mixtral checkpoints').")
    p.add_argument("-m", "--model", default=None, help="model to compress (GGUF file, HF or Mistral directory)")
    p.add_argument("-o", "--output", required=True, help="output HF directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="fraction of the compressible parameters to remove, e.g. 0.2")
    g.add_argument("--ranks", help="JSON object (inline or file) of ranks per matrix (HF names, canonical names "
                                   "or regexes), or one integer for all")
    p.add_argument("--calib", default=None,
                   help="calibration text: activation-aware (whitened) SVD instead of plain SVD; recommended "
                   "(SmolLM2, 20%% removed: PPL 69 vs 712,185 for plain SVD)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens used (default: 2048)")
    p.add_argument("--rank-multiple", type=int, default=1,
                   help="with --ratio: choose every rank as a multiple of N (e.g. 32, so that a quantized GGUF "
                        "from `levante quantize` stores the factors without rank padding) (default: 1)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write compression_report.md (perplexity, KL, top-1 vs the original) (default: on)")
    p.add_argument("--eval-text", default=None,
                   help="text for the report (default: the repository's data/ text, else --calib)")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="report chunk size in tokens (default: 512)")
    p.add_argument("--chunks", type=int, default=4, help="report chunks (default: 4)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUTPUT")

    p = sub.add_parser("kernels", help="build the C++ CPU kernels now and print what they have",
                       description="Compile levante/csrc for this machine (or load the cached build) and print the "
                                   "module, its cache directory and its instruction-set paths. Exit 1 if the build "
                                   "fails or cannot run here.")
    p.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands and output")
    return parser


def _llm(args):
    from .api import LLM

    spec = {}
    if getattr(args, "ep", 0) or getattr(args, "tp", 1) != 1:
        spec = dict(tensor_parallel_size=args.ep or args.tp, enable_expert_parallel=bool(args.ep))
    if getattr(args, "lookup", False) or getattr(args, "draft_model", None):
        spec |= dict(speculative="prompt_lookup" if args.lookup else "draft", draft_model=args.draft_model,
                     num_speculative_tokens=args.spec_tokens, ngram=args.lookup_ngram)
    return LLM(args.model, n_ctx=args.ctx_size, n_threads=args.threads, dtype=args.dtype, n_batch=args.n_batch,
               verbose=True, device=args.device, cache_type=args.cache_type, **spec)


def _sampling_kwargs(args) -> dict:
    return dict(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, typical_p=args.typical_p,
        repeat_penalty=args.repeat_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, seed=args.seed, stop=args.stop,
    )


def cmd_run(args) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = _llm(args)
    kw = _sampling_kwargs(args)
    t0 = time.perf_counter()
    n = 0
    if args.chat:
        stream = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=args.n_predict,
                                            stream=True, **kw)
        pieces = (c["choices"][0]["delta"].get("content", "") for c in stream)
    else:
        stream = llm.create_completion(prompt, max_tokens=args.n_predict, stream=True, echo=args.echo, **kw)
        pieces = (c["choices"][0]["text"] for c in stream)
    first = None
    for piece in pieces:
        if first is None:
            first = time.perf_counter()
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    end = time.perf_counter()
    print(f"[{n} chunks in {end - t0:.2f}s]", file=sys.stderr)
    if args.verbose and first is not None:
        rate = f", then {(n - 1) / (end - first):.1f} chunks/s" if n > 1 and end > first else ""
        print(f"[first chunk after {first - t0:.2f}s{rate}]", file=sys.stderr)
        if st := llm.speculative_stats():
            print(f"[speculative: {st['accepted']}/{st['proposed']} proposed tokens accepted ({st['acceptance']:.0%}), "
                  f"{st['tokens_per_forward']:.2f} tokens per forward pass]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    llm = _llm(args)
    kw = _sampling_kwargs(args)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"levante chat with {llm.model_name}. /reset clears the conversation, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for c in llm.create_chat_completion(messages, max_tokens=args.n_predict, stream=True, **kw):
                piece = c["choices"][0]["delta"].get("content", "")
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except LevanteError as e:  # e.g. the conversation outgrew the context: say so, keep the REPL
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args) -> int:
    from .config import expected_shapes
    from .loader import read_checkpoint, resolve_path
    from .quant.base import QuantWeight

    path = resolve_path(args.model_opt or args.model)
    ck = read_checkpoint(path)
    cfg = ck.config
    types: Counter[str] = Counter()
    n_params = 0
    for w in ck.weights.values():
        types[w.qtype if isinstance(w, QuantWeight) else str(w.dtype).replace("torch.", "")] += 1
        n_params += w.n_params if isinstance(w, QuantWeight) else w.numel()
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()) if f.is_file())
    active = n_params
    if cfg.is_moe:
        per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
        active -= cfg.num_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    lines = [
        ("path", str(path)),
        ("format", ck.format),
        ("architecture", f"{cfg.model_type}{' (MoE)' if cfg.is_moe else ''}"),
        ("parameters", f"{n_params / 1e9:.3f} B" + (f" ({active / 1e9:.3f} B active per token)" if cfg.is_moe else "")),
        ("size on disk", f"{size / 2**20:.1f} MiB"),
        ("layers", cfg.num_layers),
        ("hidden / ffn", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
        ("heads / kv heads / head_dim", f"{cfg.num_heads} / {cfg.num_kv_heads} / {cfg.head_dim}"),
        ("experts", f"{cfg.num_experts} (top-{cfg.num_experts_per_tok})" if cfg.is_moe else "dense"),
        ("context", cfg.max_position_embeddings),
        ("sliding window", cfg.sliding_window or "none"),
        ("rope theta", cfg.rope_theta),
        ("rms norm eps", cfg.rms_norm_eps),
        ("tied embeddings", "lm_head" not in ck.weights),
        ("vocab size", cfg.vocab_size),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in sorted(types.items()))),
    ]
    for k, v in ck.info.items():
        if k not in ("files",) and not isinstance(v, (dict, list)):
            lines.append((k, v))
    tok = ck.tokenizer
    if tok is None:
        from .tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(path if path.is_dir() else path.parent)
        except (FileNotFoundError, ValueError):
            tok = None
    if tok is not None:
        lines += [
            ("tokenizer", type(tok).__name__),
            ("bos / eos", f"{tok.bos_id} {tok.bos_token!r} / {tok.eos_id} {tok.eos_token!r}"),
            ("stop ids", sorted(tok.eos_ids)),
            ("chat format", "template" if tok.chat_template else "built-in (Mistral instruct / ChatML)"),
        ]
    else:
        lines.append(("tokenizer", "none found"))
    missing = set(expected_shapes(cfg)) - set(ck.weights) - {"lm_head"}
    if missing:
        lines.append(("missing tensors", ", ".join(sorted(missing)[:5])))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_bench(args) -> int:
    from .tools.bench import HEADER, markdown_table, run_bench

    if args.ctx_size is None:
        args.ctx_size = args.n_prompt + args.n_gen
    res = run_bench(_llm(args), args.n_prompt, args.n_gen, args.reps)
    if args.output == "csv":
        print(",".join(HEADER))
        print(",".join(res.row()))
    else:
        print(markdown_table([res.row()]))
    return 0


def cmd_quantize(args) -> int:
    src, dst = args.awq_model or args.input, args.awq_output or args.output
    if not src or not dst:
        raise ValueError("give the input and output paths (INPUT OUTPUT, or -m IN -o OUT)")
    if args.awq:
        from .tools.awq import awq_quantize

        calib = args.calib
        if not calib:
            raise ValueError("--awq needs --calib TEXT (or --calib @FILE)")
        if calib.startswith("@"):
            with open(calib[1:], encoding="utf-8") as f:
                calib = f.read()
        out = awq_quantize(src, dst, calib, group_size=args.group_size, force=args.force, progress=True,
                           expand_low_rank=args.expand_low_rank)
        print(f"wrote {out}")
        return 0
    if not args.type:
        raise ValueError("--type is required (or use --awq)")
    from .tools.quantize import quantize_model

    out = quantize_model(src, dst, args.type, force=args.force, progress=True,
                         expand_low_rank=getattr(args, "expand_low_rank", False))
    print(f"wrote {out}")
    return 0


def _is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server local (127.0.0.0/8, ::1, localhost)."""
    import ipaddress
    import socket

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: loopback only if every address it resolves to is
        try:
            addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def cmd_serve(args) -> int:
    from .server import serve

    if args.n_ctx is not None:
        args.ctx_size = args.n_ctx
    for name in ("max_batch", "max_tokens_cap", "max_n", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    llm = _llm(args)
    if args.model_alias:
        llm.model_name = args.model_alias
    print(f"levante serve: {llm.model_name} on http://{args.host}:{args.port}/v1 (n_ctx {llm.n_ctx}, "
          f"max batch {args.max_batch}{', API key required' if args.api_key else ''})", file=sys.stderr)
    if args.api_key is None and not _is_loopback(args.host):
        print(f"levante serve: warning: listening on {args.host}, reachable from other machines, without "
              "--api-key: anyone who can reach this port can use the model", file=sys.stderr)
    serve(llm, host=args.host, port=args.port, log_level=args.log_level, api_key=args.api_key,
          model_alias=args.model_alias, max_batch=args.max_batch, max_tokens_cap=args.max_tokens_cap,
          max_n=args.max_n, max_body_bytes=args.max_body_bytes, special_in_prompt=not args.no_special_in_prompt)
    return 0


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def cmd_perplexity(args) -> int:
    from .api import LLM
    from .tools.quality import perplexity

    n_ctx = args.ctx_size or 512
    llm = LLM(args.model, n_ctx=n_ctx, n_threads=args.threads, dtype=args.dtype, n_batch=args.n_batch,
              verbose=False, device=args.device, cache_type=args.cache_type)
    ids = llm.tokenize(_read_text(args.file))  # add_special like llama.cpp's common_tokenize(..., true)
    res = perplexity(llm, ids, n_ctx, stride=args.stride, n_chunks=args.chunks, progress=True)
    mode = f"stride {args.stride}" if args.stride else "second half of each chunk scored"
    print(f"{len(ids)} tokens, {len(res.chunks)} chunks of {n_ctx} ({mode}), {res.n_scored} tokens scored")
    print("".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(res.chunks)))
    print(f"Final estimate: {res}")
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from .api import LLM
    from .tools.quality import compare, plot_report, report_markdown

    n_ctx = args.ctx_size or 512
    kw = dict(n_ctx=n_ctx, n_threads=args.threads, dtype=args.dtype, n_batch=args.n_batch, device=args.device,
              cache_type=args.cache_type)
    base, other = LLM(args.model, **kw), LLM(args.model2, **kw)
    ids = base.tokenize(_read_text(args.file))
    rep = compare(base, other, ids, n_ctx, stride=args.stride, n_chunks=args.chunks, progress=True)
    names = (str(base.loaded.path), str(other.loaded.path))
    png = None
    if args.output:
        out = Path(args.output)
        png = out.with_suffix(".png")
        plot_report(rep, str(png), Path(names[0]).name, Path(names[1]).name)
    md = report_markdown(rep, *names, plot=png.name if png else None)
    if args.output:
        Path(args.output).write_text(md)
        print(f"wrote {args.output} and {png}", file=sys.stderr)
    print(md)
    return 0


def cmd_compress(args) -> int:
    from pathlib import Path

    from .tools.compress import compress_model, quality_report

    calib_ids = None
    if args.calib:
        from .loader import load

        tok = load(args.model).tokenizer
        if tok is None:
            raise ValueError("--calib needs the model's tokenizer")
        calib_ids = tok.encode(_read_text(args.calib))[: args.calib_tokens]
    res, notes = compress_model(args.model, args.output, ratio=args.ratio, ranks=args.ranks, calib_ids=calib_ids,
                                progress=True, force=args.force, rank_multiple=args.rank_multiple)
    for n in notes:
        print(n, file=sys.stderr)
    print(f"wrote {args.output}: {len(res.ranks)} matrices factored, {res.params_removed:,} of "
          f"{res.params_compressible:,} compressible parameters removed "
          f"({100 * res.params_removed / max(1, res.params_compressible):.2f}%)")
    if args.report:
        default = Path(__file__).resolve().parent.parent / "data" / "kjv_genesis_exodus.txt"
        text_path = args.eval_text or (str(default) if default.is_file() else args.calib)
        if text_path is None:
            print("no --eval-text (and no data/ text found): report skipped", file=sys.stderr)
            return 0
        from .loader import resolve_path

        quality_report(resolve_path(args.model), Path(args.output), res, _read_text(text_path), args.ctx_size,
                       args.chunks, args.threads)
        print(f"wrote {Path(args.output) / 'compression_report.md'}")
    return 0


def cmd_kernels(args) -> int:
    from .quant import extension

    if args.verbose and not extension.missing_tools() and not extension.disabled():
        extension.build(verbose=True)
    info = extension.describe()
    if not info["built"]:
        print(f"levante kernels: not built ({info['reason']}); the pure-torch path runs instead", file=sys.stderr)
        return 1
    print(f"module {info['module']}\npath   {info['path']}\nisa    {' '.join(info['isa'])}")
    return 0


COMMANDS = {"run": cmd_run, "chat": cmd_chat, "info": cmd_info, "bench": cmd_bench, "quantize": cmd_quantize,
            "serve": cmd_serve, "perplexity": cmd_perplexity, "compare": cmd_compare, "compress": cmd_compress,
            "kernels": cmd_kernels}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (LevanteError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"levante {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
