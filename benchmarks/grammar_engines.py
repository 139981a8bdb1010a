"""Constrained-decoding engines side by side: xgrammar, llguidance, outlines-core.

    python benchmarks/grammar_engines.py [--steps 300] [--samples 3] [--out benchmarks/results/grammar_engines.md]

For both vocabularies levante ships tokenizers for (Mixtral's SentencePiece, 32000 tokens; SmolLM2's
byte-level BPE, 49152), every schema of tests/data/json_schemas.json is compiled by each engine (time),
then sampled: a stand-in "model" (seeded Gumbel noise, a bonus for JSON closers and digits, a penalty per
byte, so outputs end) picks among the tokens the engine allows, the engine computes the next mask (timed)
and accepts the token, until the grammar ends or `--steps`. Every finished output is checked with json.loads
and jsonschema. Also times the mask of 8 matchers per step (batch 8: sequential fills vs the engine's own
parallel fill where it has one). One thread for everything (the 2-core dev box; the model uses the other).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import mistral_tokenizer_model, smollm2_gguf  # noqa: E402

from levante.loader import read_checkpoint  # noqa: E402
from levante.tokenizer import CONTROL, SentencePieceTokenizer  # noqa: E402

SCHEMAS = json.loads((ROOT / "tests" / "data" / "json_schemas.json").read_text())
CLOSERS = set(b'"}],: 0123456789')


def vocab_of(tok) -> list[bytes]:
    """Each token's output bytes; b"" for control / unknown tokens (never allowed inside a grammar)."""
    out = []
    for i in range(tok.vocab_size):
        out.append(b"" if tok.token_types[i] in (CONTROL, 2) else tok.token_bytes(i))
    return out


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


# ---------------------------------------------------------------------------------------------- engines
class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: list[bytes]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.V = tok.vocab_size
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.V, stop_token_ids=[tok.eos_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, cg):
        return self.xgr.GrammarMatcher(cg)

    def mask(self, m) -> torch.Tensor:
        bm = self.xgr.allocate_token_bitmask(1, self.V)
        m.fill_next_token_bitmask(bm, 0)
        return bm

    def masks(self, ms: list) -> torch.Tensor:
        bm = self.xgr.allocate_token_bitmask(len(ms), self.V)
        for i, m in enumerate(ms):
            m.fill_next_token_bitmask(bm, i)
        return bm

    def masks_par(self, ms: list):
        bm = self.xgr.allocate_token_bitmask(len(ms), self.V)
        self.batch = getattr(self, "batch", None) or self.xgr.BatchGrammarMatcher()
        self.batch.batch_fill_next_token_bitmask(ms, bm)
        return bm

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def done(self, m) -> bool:
        return m.is_terminated()


class XGrammarJSONVocab(XGrammar):
    """levante's setting for JSON grammars: tokens holding a raw control byte (< 0x20) are hidden. Compact JSON
    never contains one, and xgrammar's length-bounded string rule lets them through (invalid JSON)."""

    name = "xgrammar, JSON vocab"

    def __init__(self, tok, vocab: list[bytes]) -> None:
        super().__init__(tok, [b"" if any(c < 0x20 for c in b) else b for b in vocab])


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: list[bytes]) -> None:
        import llguidance
        import llguidance.torch as lt

        self.llg, self.lt = llguidance, lt
        specials = [i for i in range(tok.vocab_size) if tok.token_types[i] == CONTROL]

        class G:  # the guidance-style tokenizer llguidance wraps
            eos_token_id, bos_token_id = tok.eos_id, tok.bos_id
            tokens = [b"\xff" + tok.pieces[i].encode() if tok.token_types[i] == CONTROL else vocab[i]
                      for i in range(tok.vocab_size)]
            special_token_ids = specials

            def __call__(self, s: bytes) -> list[int]:  # forced text mid-output: no BOS, no dummy prefix
                return tok._encode_fragment(s.decode("utf-8", "replace"), False)

        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(G()), n_vocab=tok.vocab_size)
        self.V = tok.vocab_size
        self.executor = llguidance.LLExecutor(1)

    def compile(self, schema):
        g = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
        err = self.llg.LLMatcher.validate_grammar(g, self.tokenizer)
        if err:
            raise ValueError(err)
        return g

    def matcher(self, g):
        return self.llg.LLMatcher(self.tokenizer, g)

    def mask(self, m):
        bm = self.lt.allocate_token_bitmask(1, self.V)
        self.lt.fill_next_token_bitmask(m, bm, 0)
        return bm

    def masks(self, ms):
        bm = self.lt.allocate_token_bitmask(len(ms), self.V)
        for i, m in enumerate(ms):
            self.lt.fill_next_token_bitmask(m, bm, i)
        return bm

    def masks_par(self, ms):
        bm = self.lt.allocate_token_bitmask(len(ms), self.V)
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], bm)
        return bm

    def accept(self, m, t: int) -> bool:
        return m.consume_token(t)

    def done(self, m) -> bool:
        return m.is_stopped()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab: list[bytes]) -> None:
        import outlines_core

        self.oc = outlines_core
        self.V = tok.vocab_size
        self.eos = tok.eos_id
        groups: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if b and i != tok.eos_id:
                groups.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(tok.eos_id, groups)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, index):
        return self.oc.Guide(index)

    def mask(self, g):
        allowed = torch.zeros(self.V, dtype=torch.bool)
        allowed[torch.tensor(g.get_tokens(), dtype=torch.long)] = True
        return allowed

    def masks(self, gs):
        return torch.stack([self.mask(g) for g in gs])

    masks_par = None

    def accept(self, g, t: int) -> bool:
        if t == self.eos:
            return True
        g.advance(t)
        return True

    def done(self, g) -> bool:
        return g.is_finished()


def allowed_of(mask: torch.Tensor, V: int) -> torch.Tensor:
    """bool [V] from a packed int32 bitmask row (or a bool mask as is)."""
    if mask.dtype == torch.bool:
        return mask.reshape(-1)[:V]
    bits = mask.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64)
    return ((bits[:, None] >> shifts) & 1).reshape(-1)[:V].bool()


# ---------------------------------------------------------------------------------------------- the run
def model_logits(vocab: list[bytes], gen: torch.Generator) -> torch.Tensor:
    noise = -torch.log(-torch.log(torch.rand(len(vocab), generator=gen).clamp_min(1e-9)))
    return noise + BIAS


def sample(engine, cg, vocab, eos: int, steps: int, seed: int) -> tuple[str | None, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    m = engine.matcher(cg)
    out, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        mask = engine.mask(m)
        times.append(time.perf_counter() - t0)
        allowed = allowed_of(mask, len(vocab))
        logits = model_logits(vocab, gen).masked_fill(~allowed, -math.inf)
        if not torch.isfinite(logits).any():
            return None, times
        t = int(logits.argmax())
        if t == eos:
            engine.accept(m, t)
            return b"".join(out).decode("utf-8", "replace"), times
        if not engine.accept(m, t):
            return None, times
        out.append(vocab[t])
        if engine.done(m):
            return b"".join(out).decode("utf-8", "replace"), times
    return None, times


def validate(text: str | None, schema) -> str:
    import jsonschema

    if text is None:
        return "unfinished"
    try:
        jsonschema.validate(json.loads(text), schema)
    except json.JSONDecodeError:
        return "not JSON"
    except jsonschema.ValidationError as e:
        return f"invalid: {e.message[:60]}"
    return "ok"


def main() -> None:
    global BIAS
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--compile-timeout", type=int, default=120)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grammar_engines.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    tokenizers = {"Mixtral (SentencePiece, 32000)": SentencePieceTokenizer.from_model_file(mistral_tokenizer_model()),
                  "SmolLM2 (byte-level BPE, 49152)": read_checkpoint(smollm2_gguf()).tokenizer}
    lines = ["# Constrained-decoding engines: xgrammar, llguidance, outlines-core", "",
             f"`python benchmarks/grammar_engines.py` ({args.samples} samples per schema, at most {args.steps} tokens, "
             "1 thread). Mask = time to compute one token mask; compile = JSON schema -> engine grammar/index. "
             "Validity: finished outputs that parse and validate (jsonschema) / all samples.", ""]
    summary = ["| vocabulary | engine | compile ms (median / max) | mask us per token (median / p99) | "
               "batch 8 mask us per step (sequential / parallel) | valid / samples | failures |",
               "|---|---|---|---|---|---|---|"]
    for vname, tok in tokenizers.items():
        vocab = vocab_of(tok)
        BIAS = torch.tensor([(4.0 if b and all(c in CLOSERS for c in b) else 0.0) - 0.4 * len(b) for b in vocab])
        for cls in (XGrammar, XGrammarJSONVocab, LLGuidance, OutlinesCore):
            t0 = time.perf_counter()
            try:
                engine = cls(tok, vocab)
            except Exception as e:  # noqa: BLE001
                summary.append(f"| {vname} | {cls.name} | setup failed: {type(e).__name__}: {str(e)[:80]} | | | | |")
                continue
            setup = time.perf_counter() - t0
            comp, masks, batch_seq, batch_par, valid, total, fails = [], [], [], [], 0, 0, []
            for sname, schema in SCHEMAS.items():
                signal.alarm(args.compile_timeout)
                t0 = time.perf_counter()
                try:
                    cg = engine.compile(schema)
                    comp.append(time.perf_counter() - t0)
                except Timeout:
                    fails.append(f"{sname}: compile > {args.compile_timeout} s")
                    total += args.samples
                    continue
                except Exception as e:  # noqa: BLE001 - a schema the engine cannot compile
                    fails.append(f"{sname}: compile error {type(e).__name__}")
                    total += args.samples
                    continue
                finally:
                    signal.alarm(0)
                for s in range(args.samples):
                    text, times = sample(engine, cg, vocab, tok.eos_id, args.steps, seed=s)
                    masks += times
                    verdict = validate(text, schema)
                    total += 1
                    valid += verdict == "ok"
                    if verdict != "ok":
                        fails.append(f"{sname}: {verdict}")
                ms = [engine.matcher(cg) for _ in range(8)]
                for _ in range(5):
                    t0 = time.perf_counter()
                    engine.masks(ms)
                    batch_seq.append(time.perf_counter() - t0)
                    if engine.masks_par is not None:
                        t0 = time.perf_counter()
                        engine.masks_par(ms)
                        batch_par.append(time.perf_counter() - t0)
            q = sorted(masks)
            p99 = q[int(0.99 * (len(q) - 1))] if q else float("nan")
            par = f"{statistics.median(batch_par) * 1e6:.0f}" if batch_par else "-"
            summary.append(
                f"| {vname} | {cls.name} (setup {setup:.1f} s) | "
                f"{statistics.median(comp) * 1e3:.1f} / {max(comp) * 1e3:.1f} | "
                f"{statistics.median(masks) * 1e6:.0f} / {p99 * 1e6:.0f} | "
                f"{statistics.median(batch_seq) * 1e6:.0f} / {par} | {valid} / {total} | "
                f"{'; '.join(sorted(set(fails)))[:300] or '-'} |")
            print(summary[-1], flush=True)
    Path(args.out).write_text("\n".join(lines + summary) + "\n")
    print(f"wrote {args.out}")


BIAS = torch.zeros(1)

if __name__ == "__main__":
    main()
