"""Train a tiny Mixtral on Genesis so compression / quantization benchmarks have meaningful perplexities.

Random weights give a perplexity of ~vocab size whatever is done to them; a model that has learned
something shows how much a compression method destroys. This script builds a small
MixtralForCausalLM (transformers, plain PyTorch training loop), trains it on the book of Genesis from
`data/kjv_genesis_exodus.txt` (everything before the "The Second Book of Moses" header) and saves a HF
directory levante loads: config.json + model.safetensors + tokenizer.model (the Mistral v1
SentencePiece model shipped by mistral-common, vocab 32000).

Model: hidden 256, 4 layers, 8 experts (top-2, router aux loss 0.02), intermediate 512, 8 heads / 2 KV
heads (head_dim 32), vocab 32000, untied embeddings (~29.7M parameters, ~12M active per token).
Training: sequences of 256 tokens (BOS + 255 text tokens, random windows of Genesis), batch 8,
AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1, 20 warmup steps, cosine to 10%), grad clip 1.0,
float32, one CPU thread, a fixed number of steps (default 330: 676K tokens, ~13 epochs of Genesis'
52.8K tokens; 17 minutes on one thread of the 2-core development machine while it was shared with
other jobs, ~3.2 s per step). Everything is seeded and single-threaded, so a rerun regenerates the
same weights (up to the CPU's float arithmetic). The size was not shrunk: this budget and the AWQ /
SVD calibration of the benchmarks are fast enough at this size.

Result of the default run: training loss 2.4-2.7 at the end (it fits Genesis closely: 53K tokens
cannot feed 29.6M parameters), held-out perplexity on Exodus 203.8 (a random model: ~18,600). That
is a model that has learned the language of the KJV, far from a good one, but with perplexities
that respond to damage, which is what the compression tables need.

The held-out perplexity on Exodus (all of it, non-overlapping 256-token chunks, BOS first, every
position scored) is printed and written to `train_info.json` next to the weights.

    OMP_NUM_THREADS=1 python benchmarks/train_tiny_mixtral.py [--steps 330] [--out benchmarks/cache/tiny-mixtral-kjv]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "cache" / "tiny-mixtral-kjv"
EXODUS_HEADER = "The Second Book of Moses"


def tokenizer_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"


def split_text() -> tuple[str, str]:
    """(Genesis, Exodus) of data/kjv_genesis_exodus.txt."""
    text = (ROOT / "data" / "kjv_genesis_exodus.txt").read_text()
    i = text.index(EXODUS_HEADER)
    return text[:i], text[i:]


def build_config():
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, output_router_logits=True, router_aux_loss_coef=0.02,
        initializer_range=0.02, sliding_window=None,
    )
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def exodus_ppl(model, ids: list[int], seq: int, bos: int) -> float:
    """Perplexity over non-overlapping chunks: [BOS] + seq-1 tokens, every next token scored."""
    model.eval()
    nll, n = 0.0, 0
    step = seq - 1
    for s in range(0, len(ids) - 1, step):
        chunk = ids[s : s + step]
        if len(chunk) < 2:
            break
        x = torch.tensor([[bos, *chunk]])
        logits = model(input_ids=x).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)
        tgt = x[0, 1:]
        nll -= lp.gather(-1, tgt[:, None]).sum().item()
        n += tgt.numel()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=330)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    import sentencepiece as spm
    import transformers

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model()))
    genesis, exodus = split_text()
    train_ids = torch.tensor(sp.encode(genesis), dtype=torch.long)
    eval_ids = sp.encode(exodus)
    print(f"Genesis {len(train_ids)} tokens (train), Exodus {len(eval_ids)} tokens (held out)", flush=True)

    cfg = build_config()
    model = transformers.MixtralForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warm = 20

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    bos = sp.bos_id()
    span = args.seq - 1
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - span, (args.batch,), generator=gen)
        x = torch.stack([torch.cat([torch.tensor([bos]), train_ids[s : s + span]]) for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            el = time.perf_counter() - t0
            print(f"step {step:4d}  loss {out.loss.item():.4f}  lr {lr_at(step):.2e}  {el:.0f}s", flush=True)
    train_secs = time.perf_counter() - t0
    ppl = exodus_ppl(model, eval_ids, args.seq, bos)
    print(f"held-out perplexity on Exodus (seq {args.seq}): {ppl:.3f}", flush=True)

    out_dir = Path(args.out)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.config.output_router_logits = False
    model.save_pretrained(out_dir)
    shutil.copy(tokenizer_model(), out_dir / "tokenizer.model")
    info = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
            "params": n_params, "train_tokens": args.steps * args.batch * args.seq,
            "train_seconds": round(train_secs, 1), "exodus_ppl": ppl, "exodus_tokens": len(eval_ids)}
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")

    # levante must load what was saved and agree with transformers
    sys.path.insert(0, str(ROOT))
    from levante import LLM

    llm = LLM(str(out_dir), n_ctx=args.seq, dtype="float32", n_threads=1)
    ids = [bos, *eval_ids[:64]]
    ref = model.eval()(input_ids=torch.tensor([ids])).logits[0].float()
    got = llm.logits(ids).float()
    diff = (got - ref).abs().max().item()
    print(f"saved {out_dir} (levante vs transformers max |logit diff| {diff:.2e})", flush=True)
    if diff > 1e-3:
        raise SystemExit(f"levante disagrees with transformers on the saved model: {diff}")


if __name__ == "__main__":
    main()
