"""`LLM`: the llama-cpp-python-style Python API (OpenAI-shaped completion and chat dicts)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .chat import apply_chat, chat_plan
from .errors import ContextLengthError
from .generate import DEFAULT_N_CTX, TokenEvent, generate_stream
from .grammar import Grammar, GrammarCompiler, compiler_for, grammar_of
from .loader import LoadedModel, eager_attention, load
from .model import CausalLM, check_token_ids
from .sampling import SamplingParams
from .speculative import MAX_TOKENS, SpecConfig, cache_size
from .toolcalls import ChatOutput


def physical_cores() -> int:
    """Physical core count (what llama.cpp uses by default), falling back to the usable CPU count."""
    try:
        cores = set()
        for cpu in os.sched_getaffinity(0):
            topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        return max(1, len(cores))
    except (OSError, AttributeError):
        return max(1, os.cpu_count() or 1)


CACHE_TYPES: dict[str, torch.dtype | None] = {"auto": None, "f32": torch.float32, "f16": torch.float16}


class LLM:
    """A loaded causal language model with text in, text out.

    >>> llm = LLM()                      # the embedded default model (SmolLM2-135M-Instruct)
    >>> llm("The capital of France is", max_tokens=8)["choices"][0]["text"]
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        dtype: str | torch.dtype | None = None,
        n_batch: int = 512,
        seed: int | None = None,
        verbose: bool = False,
        model_alias: str | None = None,
        device: str = "cpu",
        cache_type: str = "auto",
        special_in_prompt: bool = True,
        speculative: str | None = None,
        draft_model: str | Path | LLM | None = None,
        num_speculative_tokens: int | None = None,
        ngram: int = 3,
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        _loaded: LoadedModel | None = None,
    ) -> None:
        """`special_in_prompt`: special-token strings in a text completion prompt become control tokens (as in
        llama.cpp); False encodes them as text. Chat messages are always encoded as text.

        Speculative decoding (levante.speculative; exact: greedy output unchanged, sampled output distributed as
        without it): `speculative="prompt_lookup"` (n-grams of up to `ngram` tokens looked up in the prompt and
        output), or `draft_model` (a path, or an LLM with the same vocabulary); `num_speculative_tokens` is the
        most proposed per step (default 8; fewer, or none, when they do not pay). Used for single-prompt
        generation.

        `tensor_parallel_size=N` (levante.parallel): the model split over N processes (this one is rank 0; N - 1
        workers are started, or torchrun's processes joined), `n_threads` each (default: the cores / N);
        `enable_expert_parallel`: whole experts per rank instead of slices of every expert."""
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"cache_type must be one of {', '.join(CACHE_TYPES)}, got {cache_type!r}")
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        # torch's thread pool is process-wide: this LLM's count (default: the physical cores, as llama.cpp) applies
        # while it computes (`using_threads`), and the caller's setting is back in between
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if enable_expert_parallel and tensor_parallel_size < 2:
            raise ValueError("enable_expert_parallel needs tensor_parallel_size >= 2 (the ranks the experts go to)")
        self.n_threads = n_threads or max(1, physical_cores() // tensor_parallel_size)
        with self.using_threads():
            if _loaded is not None:
                self.loaded = _loaded
            elif tensor_parallel_size > 1:
                from .parallel import launch

                self.loaded = launch(model_path, tensor_parallel_size, enable_expert_parallel, dtype, device,
                                     self.n_threads, progress=verbose)
            else:
                self.loaded = load(model_path, dtype=dtype, progress=verbose, device=device)
        self.model = self.loaded.model
        # on a GPU, generation runs levante.cuda's decoder: static cache, Triton attention, CUDA graphs
        self._decoder = gpu_decoder(self.model)
        # KV cache element type (this LLM's, not the model's: a loaded model may be shared): "auto" = the compute
        # dtype (exact), "f16" = llama.cpp's default (half the bytes a decode step reads from the cache, ~1e-3
        # relative rounding of keys and values)
        self.kv_dtype = CACHE_TYPES[cache_type]
        self.special_in_prompt = special_in_prompt
        self.config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.loaded.path}: no tokenizer found next to the model")
        limit = self.config.max_position_embeddings
        self.n_ctx = int(n_ctx) if n_ctx else min(limit, DEFAULT_N_CTX)
        if self.n_ctx < 2:
            raise ValueError(f"n_ctx must be >= 2, got {self.n_ctx}")
        self.n_batch = n_batch
        self.seed = seed
        self.model_name = model_alias or self.loaded.path.name
        self.verbose = verbose
        self.spec = self._spec_config(speculative, draft_model, num_speculative_tokens, ngram, dtype, device,
                                      cache_type)
        if self._decoder is not None:
            # single-prompt generation's cache and graph, made now rather than on first use; sized for speculative
            # decoding too (this LLM's, or as another's draft), whose one-row caches then fit it as they are
            verify = range(2, self.spec.k + 2) if self.spec is not None else ()  # the speculative steps' lengths
            max_tokens, slack = cache_size(self.n_ctx)
            self._decoder.warm_up(1, max_tokens, self.kv_dtype, verify=verify, slack=slack)

    @property
    def generation_model(self):
        """What generation runs on: on a GPU this LLM's decoder (static cache, CUDA graphs), else the model."""
        return self._decoder if self._decoder is not None else self.model

    def serving_model(self):
        """The model a serving engine should drive: on a GPU a decoder of its own (static cache, CUDA graphs; its
        cache apart from this LLM's; the engine warms it up for its batch), else the model itself."""
        return self.model if self._decoder is None else gpu_decoder(self.model)

    def _spec_config(self, method, draft, k, ngram, dtype, device, cache_type) -> SpecConfig | None:
        if draft is not None:
            method = method or "draft"
        if method is None:
            return None
        if method not in ("prompt_lookup", "draft"):
            raise ValueError(f"speculative must be 'prompt_lookup' or 'draft', got {method!r}")
        k = 8 if k is None else int(k)
        if not 1 <= k <= MAX_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in 1..{MAX_TOKENS}, got {k}")
        if method == "prompt_lookup":
            if ngram < 1:
                raise ValueError(f"ngram must be >= 1, got {ngram}")
            return SpecConfig("prompt_lookup", k, ngram)
        if draft is None:
            raise ValueError("speculative='draft' needs draft_model")
        d = draft if isinstance(draft, LLM) else LLM(draft, n_ctx=self.n_ctx, n_threads=self.n_threads, dtype=dtype,
                                                    device=device, cache_type=cache_type)
        if d.config.vocab_size != self.config.vocab_size or d.tokenizer.pieces[:1000] != self.tokenizer.pieces[:1000]:
            raise ValueError(f"the draft model {d.model_name} does not share the target's vocabulary "
                             f"({d.config.vocab_size} vs {self.config.vocab_size} tokens)")
        return SpecConfig("draft", k, ngram, d.generation_model)  # on a GPU its decoder: static cache, graphs

    def close(self) -> None:
        """Stop a parallel model's worker processes (also done when the LLM is collected, and at exit)."""
        close = getattr(self.model, "close", None)
        if close is not None:
            close()

    def speculative_stats(self) -> dict[str, float]:
        """Counters of the last speculative generation: proposed, accepted, acceptance, tokens per forward."""
        st = self.spec.last if self.spec is not None else None
        if st is None:
            return {}
        forwards = st.verifications + st.plain_steps
        emitted = st.accepted + forwards
        return {"proposed": st.proposed, "accepted": st.accepted, "acceptance": st.acceptance,
                "forwards": forwards, "tokens_per_forward": emitted / forwards if forwards else 1.0}

    @contextmanager
    def using_threads(self) -> Iterator[None]:
        """torch's thread count set to this LLM's `n_threads` inside the block, restored after."""
        old = torch.get_num_threads()
        if self.n_threads == old:
            yield
            return
        torch.set_num_threads(self.n_threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def _threaded(self, it: Iterator[Any]) -> Iterator[Any]:
        """A generator's steps run under `using_threads` (the caller's code between them does not)."""
        while True:
            with self.using_threads():
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str | bytes, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of `text` (BOS added by the tokenizer's default unless add_bos says otherwise)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position of `ids`: float32 tensor [len(ids), vocab]."""
        t = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
        if t.ndim != 1 or t.numel() == 0:
            raise ValueError("logits() takes a non-empty 1-D sequence of token ids")
        if t.numel() > self.n_ctx:
            raise ContextLengthError(f"{t.numel()} tokens exceed the context window n_ctx={self.n_ctx}")
        check_token_ids(t, self.config.vocab_size)
        device = self.model.model.device
        out = []
        with torch.inference_mode(), self.using_threads(), eager_attention(device):
            cache = self.model.new_cache(1, t.numel(), self.kv_dtype)
            for s in range(0, t.numel(), self.n_batch):
                out.append(self.model(t[None, s : s + self.n_batch].to(device), cache=cache)[0].cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ embeddings
    def embed(self, input: str | list[str] | list[int] | list[list[int]], pooling: str = "mean",
              normalize: bool = True, truncate: bool = False, batch_size: int = 16) -> list[float] | list[list[float]]:
        """Embeddings: the last hidden state (after the final norm) pooled over each input's tokens ("mean", or
        "last" token), L2-normalised unless `normalize=False`. A string gives one vector, a list a vector each
        (token-id lists are taken as they are). Inputs are batched (`batch_size` at a time, left-padded, pads
        masked). Longer than n_ctx: ContextLengthError, or the first n_ctx tokens with `truncate=True`."""
        single = isinstance(input, str) or (isinstance(input, list) and bool(input) and isinstance(input[0], int))
        vecs, _ = self._embed([input] if single else list(input), pooling, normalize, truncate, batch_size)
        return vecs[0] if single else vecs

    def _embed(self, items: list, pooling: str, normalize: bool, truncate: bool,
               batch_size: int) -> tuple[list[list[float]], int]:
        """(a vector per input, the number of tokens embedded)."""
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        if not items:
            raise ValueError("embed() needs at least one input")
        ids = []
        for i, x in enumerate(items):
            row = self.tokenize(x) if isinstance(x, str) else [int(t) for t in x]
            if not row or x == "":
                raise ValueError(f"input {i} is empty")
            if len(row) > self.n_ctx:
                if not truncate:
                    raise ContextLengthError(f"input {i} has {len(row)} tokens, more than the context window "
                                             f"n_ctx={self.n_ctx}")
                row = row[: self.n_ctx]
            check_token_ids(row, self.config.vocab_size, f"input {i} token")
            ids.append(row)
        vecs: list[torch.Tensor | None] = [None] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        device = self.model.model.device
        with torch.inference_mode(), self.using_threads(), eager_attention(device):
            for s in range(0, len(order), max(1, batch_size)):
                rows = order[s : s + batch_size]
                L = max(len(ids[i]) for i in rows)
                tokens = torch.zeros(len(rows), L, dtype=torch.long)
                positions = torch.full((len(rows), L), -1, dtype=torch.long)
                for j, i in enumerate(rows):
                    n = len(ids[i])
                    tokens[j, L - n :] = torch.tensor(ids[i])
                    positions[j, L - n :] = torch.arange(n)
                h = self.model.model(tokens.to(device), positions.to(device)).float().cpu()
                for j, i in enumerate(rows):  # select the real tokens (pad rows are never mixed in)
                    real = h[j, L - len(ids[i]) :]
                    vecs[i] = real.mean(0) if pooling == "mean" else real[-1]
        out = []
        for v in vecs:
            if normalize:
                v = v / v.norm().clamp_min(1e-12)
            out.append(v.tolist())
        return out, sum(len(r) for r in ids)

    def create_embedding(self, input: str | list[str] | list[int] | list[list[int]], model: str | None = None,
                         pooling: str = "mean", normalize: bool = True) -> dict[str, Any]:
        """OpenAI-shaped embeddings response (llama-cpp-python's `create_embedding`)."""
        single = isinstance(input, str) or (isinstance(input, list) and bool(input) and isinstance(input[0], int))
        vecs, n_tok = self._embed([input] if single else list(input), pooling, normalize, False, 16)
        return {"object": "list", "model": model or self.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}

    # ------------------------------------------------------------------ completion
    def _params(self, temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                presence_penalty, logit_bias, seed) -> SamplingParams:
        bias = {int(k): float(v) for k, v in logit_bias.items()} if logit_bias else None
        return SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
            repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, logit_bias=bias, seed=self.seed if seed is None else seed,
        )

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, special=self.special_in_prompt)
        ids = [int(t) for t in prompt]
        return ids

    def create_completion(
        self,
        prompt: str | list[int] | list[str] | list[list[int]],
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        echo: bool = False,
        logprobs: int | None = None,
        grammar: str | Grammar | None = None,
        json_schema: dict | str | None = None,
        regex: str | None = None,
        response_format: dict | None = None,
        _fresh_text: bool = False,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-style text completion. A list of prompts runs as one batch (one choice each).

        Structured output (at most one): `grammar` (GBNF text, as llama-cpp-python's LlamaGrammar, or a
        `levante.Grammar`), `json_schema`, `regex`, or an OpenAI `response_format`; every choice then matches
        it. GrammarError (a ValueError) names what cannot be compiled."""
        prompts = prompt if _is_batch(prompt) else [prompt]
        ids = [self._prompt_ids(p) for p in prompts]
        texts = [p if isinstance(p, str) else self.detokenize(i) for p, i in zip(prompts, ids)]
        params = self._params(temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                              presence_penalty, logit_bias, seed)
        g = grammar_of(grammar, json_schema, regex, response_format)
        events = self._events(ids, max_tokens, params, stop, logprobs, g, fresh_text=False)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if stream:
            return self._stream_completion(events, meta, texts if echo else None, logprobs)
        return self._collect_completion(events, meta, ids, texts if echo else None, logprobs)

    def _events(self, ids: list[list[int]], max_tokens: int | None, params: SamplingParams,
                stop: str | list[str] | None, logprobs: int | None, g: Grammar | None,
                fresh_text: bool) -> Iterator[TokenEvent]:
        """Token events of generating from every prompt of `ids` (a batch), under grammar `g` if any."""
        longest = max(len(i) for i in ids)
        if longest >= self.n_ctx:
            raise ContextLengthError(
                f"prompt has {longest} tokens, which does not fit in the context window n_ctx={self.n_ctx}"
            )
        n = self.n_ctx - longest if max_tokens is None or max_tokens <= 0 else max_tokens
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        constraints = [self.grammar_compiler().constraint(g) for _ in ids] if g is not None else None
        spec = self.spec.speculator(self.n_ctx, self.kv_dtype) if self.spec is not None and len(ids) == 1 else None
        net = self.generation_model  # speculation too: the target verifies on the decoder (static cache, graphs)
        events = generate_stream(net, self.tokenizer, ids, n, params, stops, None, logprobs, self.n_ctx,
                                 self.n_batch, fresh_text, self.kv_dtype, constraints, spec)
        if spec is not None:
            self.spec.last = spec.stats
        return self._threaded(events)

    __call__ = create_completion

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of grammars for this model's tokenizer and vocabulary (shared, cached)."""
        return compiler_for(self.tokenizer, self.config.vocab_size)

    def _lp_dict(self, evs: list[TokenEvent], offset: int) -> dict[str, Any]:
        toks = [self._token_str(e.token) for e in evs]
        offsets, pos = [], offset
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": toks,
            "text_offset": offsets,
            "token_logprobs": [e.logprob for e in evs],
            "top_logprobs": [
                {self._token_str(i): lp for i, lp in (e.top_logprobs or [])} for e in evs
            ],
        }

    def _token_str(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def _collect_completion(self, events, meta, ids, echo_texts, logprobs) -> dict[str, Any]:
        per_row: list[list[TokenEvent]] = [[] for _ in ids]
        for ev in events:
            per_row[ev.row].append(ev)
        choices = []
        n_out = 0
        for i, evs in enumerate(per_row):
            text = "".join(e.text for e in evs)
            counted = [e for e in evs if not e.stop_token]
            n_out += len(counted)
            prefix = echo_texts[i] if echo_texts else ""
            choices.append({
                "text": prefix + text,
                "index": i,
                "logprobs": self._lp_dict(counted, len(prefix)) if logprobs is not None else None,
                "finish_reason": evs[-1].finish_reason if evs else "length",
            })
        n_in = sum(len(i) for i in ids)
        return {**meta, "object": "text_completion", "choices": choices,
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    def _stream_completion(self, events, meta, echo_texts, logprobs) -> Iterator[dict[str, Any]]:
        if echo_texts:
            for i, t in enumerate(echo_texts):
                yield {**meta, "object": "text_completion",
                       "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": None}]}
        for ev in events:
            if not ev.text and ev.finish_reason is None:
                continue
            lp = self._lp_dict([ev], 0) if logprobs is not None and ev.text else None
            yield {**meta, "object": "text_completion",
                   "choices": [{"text": ev.text, "index": ev.row, "logprobs": lp,
                                "finish_reason": ev.finish_reason}]}

    # ------------------------------------------------------------------ chat
    def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list | None = None, tool_choice: Any = None) -> list[int]:
        """Token ids of a conversation in the model's chat format (template or Mistral instruct)."""
        return apply_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                          tool_choice=tool_choice)

    def create_chat_completion(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        response_format: dict | None = None,
        grammar: str | Grammar | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-style chat completion for one conversation; `response_format` ({"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}) or `grammar` constrain the reply.

        `tools` / `tool_choice` ("auto", "none", "required", {"type": "function", "function": {"name"}}) /
        `parallel_tool_calls`: OpenAI tool calling. The calls come back in `message.tool_calls` (streamed as
        `delta.tool_calls`) with finish_reason "tool_calls"; their arguments are generated under the function's
        parameters schema, so they parse and validate (levante.toolcalls)."""
        plan = chat_plan(self.tokenizer, messages, tools, tool_choice, parallel_tool_calls, grammar, response_format)
        params = self._params(temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                              presence_penalty, logit_bias, seed)
        n_lp = (top_logprobs or 0) if logprobs else None
        events = self._events([plan.ids], max_tokens, params, stop, n_lp, plan.grammar, fresh_text=True)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        out = ChatOutput(plan.parser())
        if stream:
            return self._stream_chat(events, meta, out, n_lp)
        evs = list(events)
        for ev in evs:
            out.push(ev)
        out.finish()
        counted = [e for e in evs if not e.stop_token]
        lp = chat_logprobs(self._lp_dict(counted, 0)) if n_lp is not None else None
        return {
            **meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": out.message(), "logprobs": lp,
                         "finish_reason": out.finish_reason(evs[-1].finish_reason if evs else "length")}],
            "usage": {"prompt_tokens": len(plan.ids), "completion_tokens": len(counted),
                      "total_tokens": len(plan.ids) + len(counted)},
        }

    def _stream_chat(self, events: Iterator[TokenEvent], meta: dict, out: ChatOutput,
                     n_lp: int | None) -> Iterator[dict[str, Any]]:
        base = {**meta, "object": "chat.completion.chunk"}

        def chunk(delta: dict, finish: str | None = None, lp: Any = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        yield chunk({"role": "assistant"})
        finish = "length"
        for ev in events:
            for delta in out.push(ev):
                lp = chat_logprobs(self._lp_dict([ev], 0)) if n_lp is not None and "content" in delta else None
                yield chunk(delta, lp=lp)
            finish = ev.finish_reason or finish
        for delta in out.finish():
            yield chunk(delta)
        yield chunk({}, out.finish_reason(finish))


def gpu_decoder(model) -> Any:
    """A new GPU decoder of `model` (levante.cuda.CudaDecoder; a parallel model's: one on every rank), or None
    when the model is not on a GPU."""
    if model.model.device.type != "cuda":
        return None
    if isinstance(model, CausalLM):
        from .cuda import CudaDecoder

        return CudaDecoder(model)
    decoder = getattr(model, "decoder", None)  # levante.parallel.ParallelLM
    return decoder() if decoder is not None else None


def _is_batch(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)


def chat_logprobs(lp: dict[str, Any] | None) -> dict[str, Any] | None:
    """Completion-style logprobs -> the chat API's {"content": [{token, logprob, top_logprobs}]} shape."""
    if lp is None:
        return None
    return {"content": [
        {"token": t, "logprob": l, "bytes": list(t.encode("utf-8")),
         "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode("utf-8"))} for k, v in top.items()]}
        for t, l, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])
    ]}
