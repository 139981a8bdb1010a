"""Low-rank compression of the MLP / expert matrices (`levante compress`); the SVD math is in
levante.quant.lowrank.

Each compressible matrix W [out, in] (Mixtral: every expert's w1 / w2 / w3; dense models: the MLP's
gate / up / down projections) is replaced by two factors from a truncated SVD, W ~= B @ A with
A = sqrt(S_r) V_r^T [r, in] and B = U_r sqrt(S_r) [out, r] (FORMATS.md "Low-rank Mixtral checkpoints").

Rank selection (`ratio`): remove `ratio` of the compressible parameters. All rank-one components of all
matrices are ranked by the energy they carry per parameter they cost, sigma_k^2 / (in + out), and dropped
greedily, cheapest first, until the budget is met. A matrix keeps its dense form while its rank is at or
above the break-even rank floor(in * out / (in + out)) (factors would be larger than W), so the parameters
removed are sum(in * out - r * (in + out)) over the factored matrices; the greedy stops at the first step
that reaches the budget, so it overshoots by less than one step.

`rank_multiple` (`levante compress --rank-multiple 32`): ranks are chosen in steps of that many components,
so that `levante quantize` can store the factors of a quantized GGUF without zero-padding the rank to a
multiple of 32 (the padding otherwise costs up to 31 * (in + out) parameters per matrix).

Activation-aware mode (`calib_ids`, SVD-LLM style): the input covariance C = X^T X / n of every matrix is
collected on calibration text (for experts, only the tokens routed to them), W is whitened by the Cholesky
factor L of C (+ damping): SVD(W L) = U S V^T, A = sqrt(S_r) V_r^T L^-1. Then sigma_k^2 is exactly the
output error ||(W - BA) x||^2 that dropping component k adds on the calibration inputs, so both the
truncation and the greedy budget allocation minimise output error instead of weight error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..api import LLM
from ..config import ModelConfig, read_json
from ..formats.hf import copy_tokenizer, hf_base_name, hf_config, natural_key
from ..formats.safetensors import save_safetensors
from ..loader import load, read_checkpoint, resolve_path
from ..model import build_model
from ..quant.base import QuantWeight
from ..quant.lowrank import Factorization, LowRankWeight, choose_ranks, factorize, saved_params
from .quality import compare, plot_report, report_markdown


def compressible_names(cfg: ModelConfig) -> list[str]:
    """Canonical names of the matrices `compress` factors: expert (MoE) or MLP (dense) w1 / w2 / w3."""
    names = []
    for i in range(cfg.num_layers):
        bases = [f"layers.{i}.ffn.experts.{e}." for e in range(cfg.num_experts)] if cfg.is_moe else [f"layers.{i}.ffn."]
        names += [b + w for b in bases for w in ("w1", "w2", "w3")]
    return names


def _float(w: Tensor | QuantWeight) -> Tensor:
    return w.dequantize(torch.float32) if isinstance(w, QuantWeight) else w.float()


# ---------------------------------------------------------------------------------------------- calibration
def collect_covariances(model: torch.nn.Module, cfg: ModelConfig, ids: list[int], n_ctx: int = 512,
                        progress: bool = False) -> dict[str, Tensor]:
    """Input covariances X^T X / n of every compressible matrix, from running `model` over `ids`."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    patched = []

    def hook(name: str, w: QuantWeight, key: str) -> None:
        orig = w.matmul

        def mm(x: Tensor) -> Tensor:
            x2 = x.reshape(-1, x.shape[-1]).double()
            sums[key] = sums.get(key, 0) + x2.T @ x2
            counts[key] = counts.get(key, 0) + x2.shape[0]
            return orig(x)

        w.matmul = mm  # instance attribute shadows the method; removed below
        patched.append(w)

    for i, block in enumerate(model.model.layers):
        ffn = block.ffn
        mlps = [(f"layers.{i}.ffn.experts.{e}.", m) for e, m in enumerate(ffn.experts)] if cfg.is_moe else \
            [(f"layers.{i}.ffn.", ffn)]
        for prefix, mlp in mlps:
            hook(prefix + "w1", mlp.w1, prefix + "w1")  # w1 and w3 see the same input
            hook(prefix + "w2", mlp.w2, prefix + "w2")
    chunks = [ids[s : s + n_ctx] for s in range(0, len(ids), n_ctx) if len(ids[s : s + n_ctx]) > 1]
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="calibration", unit="chunk")
    try:
        with torch.inference_mode():
            for c in chunks:
                model(torch.tensor([c]))
    finally:
        for w in patched:
            del w.matmul
    covs = {}
    for key, s in sums.items():
        covs[key] = s / counts[key]
        if key.endswith("w1"):
            covs[key[:-1] + "3"] = covs[key]
    return covs


# ---------------------------------------------------------------------------------------------- compress
@dataclass
class CompressResult:
    weights: dict[str, Tensor | LowRankWeight]  # canonical names
    ranks: dict[str, int]  # canonical name -> rank, factored matrices only
    params_compressible: int
    params_removed: int
    params_total_before: int
    params_total_after: int
    info: dict[str, Any] = field(default_factory=dict)


def _n_params(w: Tensor | QuantWeight) -> int:
    if isinstance(w, LowRankWeight):
        return w.n_params
    shape = tuple(w.shape)
    n = 1
    for d in shape:
        n *= d
    return n


def compress_weights(cfg: ModelConfig, weights: dict[str, Tensor | QuantWeight], ratio: float | None = None,
                     ranks: dict[str, int] | None = None, covs: dict[str, Tensor] | None = None,
                     dtype: torch.dtype | None = None, progress: bool = False,
                     rank_multiple: int = 1) -> CompressResult:
    """Factor the compressible matrices of `weights` (canonical names) to meet `ratio` or explicit `ranks`.
    With `ratio`, `rank_multiple` makes every chosen rank a multiple of it (see `choose_ranks`).

    Non-compressible weights are returned as float tensors (quantized ones dequantized) in `dtype`
    (default: each tensor's own float dtype, float32 for quantized ones)."""
    if (ratio is None) == (ranks is None):
        raise ValueError("give exactly one of ratio or ranks")
    if ratio is not None and not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    names = [n for n in compressible_names(cfg) if n in weights]
    shapes = {n: tuple(weights[n].shape) for n in names}
    total = sum(o * i for o, i in shapes.values())
    facts: dict[str, Factorization] = {}
    it = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc="svd", unit="matrix")
    for n in it:
        facts[n] = factorize(_float(weights[n]), covs.get(n) if covs else None)
    if ratio is not None:
        target = round(ratio * total)
        chosen = choose_ranks({n: f.s for n, f in facts.items()}, shapes, target, rank_multiple)
    else:
        chosen = {}
        for n, r in ranks.items():
            if n not in facts:
                raise ValueError(f"{n!r} is not a compressible matrix of this model")
            if not 0 < int(r) <= min(shapes[n]):
                raise ValueError(f"rank {r} for {n} is outside 1..{min(shapes[n])}")
            chosen[n] = int(r)
    out: dict[str, Tensor | LowRankWeight] = {}
    for name, w in weights.items():
        wdtype = dtype or (w.dtype if isinstance(w, Tensor) and w.is_floating_point() else torch.float32)
        if name in chosen:
            a, b = facts[name].factors(chosen[name], wdtype)
            out[name] = LowRankWeight(a, b)
        else:
            out[name] = _float(w).to(wdtype) if isinstance(w, QuantWeight) or w.dtype != wdtype else w
    removed = sum(saved_params(shapes[n], r) for n, r in chosen.items())
    before = sum(_n_params(w) for w in weights.values())
    after = sum(_n_params(w) for w in out.values())
    return CompressResult(out, chosen, total, removed, before, after,
                          {"ratio": ratio, "activation_aware": covs is not None, "rank_multiple": rank_multiple})


def save_compressed(res: CompressResult, cfg: ModelConfig, out_dir: Path, src: Path,
                    raw_config: dict[str, Any] | None = None, max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write an HF directory: config.json (+ `ranks`), model.safetensors, tokenizer files. Returns notes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, w in res.weights.items():
        base = hf_base_name(name)
        if isinstance(w, LowRankWeight):
            tensors[base + ".0.weight"] = w.a
            tensors[base + ".1.weight"] = w.b
        else:
            tensors[base + ".weight"] = w
    save_safetensors(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    conf = dict(raw_config) if raw_config is not None else hf_config(cfg)
    conf.pop("quantization_config", None)
    conf["ranks"] = {hf_base_name(n): r for n, r in sorted(res.ranks.items(), key=lambda kv: natural_key(kv[0]))}
    (out_dir / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return copy_tokenizer(src, out_dir)


def parse_ranks(spec: str, cfg: ModelConfig) -> dict[str, int]:
    """--ranks: a JSON object (inline or a file) mapping HF module names, canonical names or regexes to ranks
    (e.g. {"model.layers.0.block_sparse_moe.experts.3.w1": 16} or {".*w2": 32}), or a bare integer for all."""
    p = Path(spec)
    text = p.read_text() if p.is_file() else spec
    data = json.loads(text)
    names = compressible_names(cfg)
    if isinstance(data, int):
        return {n: data for n in names}
    if not isinstance(data, dict):
        raise ValueError("--ranks must be a JSON object or an integer")
    if "ranks" in data and isinstance(data["ranks"], dict):  # a compressed model's config.json
        data = data["ranks"]
    out: dict[str, int] = {}
    by_hf = {hf_base_name(n): n for n in names}
    for key, r in data.items():
        key = key.removesuffix(".weight")
        if key in by_hf:
            out[by_hf[key]] = int(r)
        elif key in names:
            out[key] = int(r)
        else:
            hits = [n for n in names if re.fullmatch(key, hf_base_name(n)) or re.fullmatch(key, n)]
            if not hits:
                raise ValueError(f"--ranks: {key!r} matches no compressible matrix")
            for n in hits:
                out[n] = int(r)
    return out


def compress_model(src: str | Path, dst: str | Path, ratio: float | None = None, ranks: str | dict | None = None,
                   calib_ids: list[int] | None = None, calib_ctx: int = 512, progress: bool = False,
                   force: bool = False, rank_multiple: int = 1) -> tuple[CompressResult, list[str]]:
    """Read `src` (any format levante reads), compress, write the HF directory `dst`."""
    src_path = resolve_path(src)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not force:
        raise FileExistsError(f"{dst} exists and is not empty (use --force)")
    ckpt = read_checkpoint(src_path)
    cfg = ckpt.config
    weights = ckpt.weights
    if any(isinstance(w, LowRankWeight) for w in weights.values()):
        raise ValueError(f"{src_path} is already low-rank compressed")
    covs = None
    if calib_ids:
        model = build_model(cfg, {k: _float(v) for k, v in weights.items()}, torch.float32).eval()
        covs = collect_covariances(model, cfg, calib_ids, calib_ctx, progress)
        del model
    rk = parse_ranks(ranks, cfg) if isinstance(ranks, str) else ranks
    res = compress_weights(cfg, weights, ratio=ratio, ranks=rk, covs=covs, progress=progress,
                           rank_multiple=rank_multiple)
    raw = read_json(src_path / "config.json", "config.json") if src_path.is_dir() and \
        (src_path / "config.json").is_file() else None
    notes = save_compressed(res, cfg, dst, src_path, raw)
    res.info["source"] = str(src_path)
    return res, notes


def dir_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quality_report(src: Path, dst: Path, res: CompressResult, ids_text: str, n_ctx: int = 512,
                   n_chunks: int = 4, threads: int | None = None, progress: bool = True) -> str:
    """Markdown quality report of the compressed model vs the original (written by `levante compress`)."""
    base = LLM(str(src), n_ctx=n_ctx, n_threads=threads)
    other = LLM(str(dst), n_ctx=n_ctx, n_threads=threads, _loaded=None) if (dst / "tokenizer.json").is_file() or \
        (dst / "tokenizer.model").is_file() else _with_tokenizer(dst, base, n_ctx, threads)
    ids = base.tokenize(ids_text)
    n_chunks = min(n_chunks, max(1, len(ids) // n_ctx))
    rep = compare(base, other, ids, n_ctx, progress=progress, n_chunks=n_chunks)
    png = dst / "compression_report.png"
    plot_report(rep, str(png), src.name, dst.name)
    md = report_markdown(rep, str(src), str(dst), plot=png.name, title="Low-rank compression report")
    mode = "activation-aware (whitened SVD)" if res.info.get("activation_aware") else "plain SVD"
    head = [
        "## Compression", "",
        "| | value |", "|---|---|",
        f"| method | low-rank, {mode} |",
        f"| matrices factored | {len(res.ranks)} |",
        f"| compressible parameters | {res.params_compressible:,} |",
        f"| parameters removed | {res.params_removed:,} "
        f"({100 * res.params_removed / max(1, res.params_compressible):.2f}% of compressible, "
        f"{100 * res.params_removed / max(1, res.params_total_before):.2f}% of all) |",
        f"| parameters before / after | {res.params_total_before:,} / {res.params_total_after:,} |",
        f"| size on disk before / after | {dir_size(src) / 2**20:.1f} MiB / {dir_size(dst) / 2**20:.1f} MiB |",
        "",
    ]
    text = md.replace("\n| metric |", "\n" + "\n".join(head) + "\n## Quality\n\n| metric |", 1)
    (dst / "compression_report.md").write_text(text)
    (dst / "compression_report.json").write_text(json.dumps(rep, indent=2))
    return text


def _with_tokenizer(dst: Path, base: Any, n_ctx: int, threads: int | None) -> Any:
    """The compressed model with the source model's tokenizer (when none could be written next to it)."""
    loaded = load(str(dst))
    loaded.tokenizer = base.tokenizer
    return LLM(n_ctx=n_ctx, n_threads=threads, _loaded=loaded)
