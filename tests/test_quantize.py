"""`levante quantize`: GGUF output that llama.cpp loads, with llama.cpp's mixes and metadata."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from levante.config import ModelConfig
from levante.tools.quantize import quantize_model, tensor_types

IDS = [1, 415, 2936, 9060, 285, 1142, 28705, 16]


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    mistral_common = pytest.importorskip("mistral_common")
    d = tmp_path_factory.mktemp("quant") / "tiny-mixtral"
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(d)
    spm = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(spm, d / "tokenizer.model")
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].float().numpy()
    return d, logits


@pytest.fixture(scope="module")
def f16_file(mixtral_dir):
    d, _ = mixtral_dir
    return quantize_model(d, d.parent / "tiny-F16.gguf", "F16", progress=False)


@pytest.fixture(scope="module")
def q4km_file(mixtral_dir):
    d, _ = mixtral_dir
    return quantize_model(d, d.parent / "tiny-Q4_K_M.gguf", "Q4_K_M", progress=False)


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


# ------------------------------------------------------------------------------- type rules


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8, num_experts=8)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def _shapes(cfg: ModelConfig, tied: bool = False) -> dict[str, tuple[int, ...]]:
    h, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    kv = cfg.num_kv_heads * cfg.head_dim
    s: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.vocab_size, h), "output_norm.weight": (h,)}
    if not tied:
        s["output.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        s.update(
            {
                b + "attn_norm.weight": (h,),
                b + "ffn_norm.weight": (h,),
                b + "attn_q.weight": (h, h),
                b + "attn_k.weight": (kv, h),
                b + "attn_v.weight": (kv, h),
                b + "attn_output.weight": (h, h),
            }
        )
        if e:
            s.update(
                {
                    b + "ffn_gate_inp.weight": (e, h),
                    b + "ffn_gate_exps.weight": (e, f, h),
                    b + "ffn_up_exps.weight": (e, f, h),
                    b + "ffn_down_exps.weight": (e, h, f),
                }
            )
        else:
            s.update({b + "ffn_gate.weight": (f, h), b + "ffn_up.weight": (f, h), b + "ffn_down.weight": (h, f)})
    return s


def test_q4_k_m_rules_mixtral_8x7b():
    cfg = _cfg()
    t = tensor_types(_shapes(cfg), cfg, "Q4_K_M")
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    assert t["output_norm.weight"] == "F32" and t["blk.0.ffn_gate_inp.weight"] == "F32"
    assert {t[f"blk.{i}.attn_v.weight"] for i in range(32)} == {"Q8_0"}
    assert {t[f"blk.{i}.attn_k.weight"] for i in range(32)} == {"Q8_0"}
    assert {t[f"blk.{i}.attn_output.weight"] for i in range(32)} == {"Q5_K"}
    more = [i for i in range(32) if t[f"blk.{i}.ffn_down_exps.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert t["blk.5.ffn_up_exps.weight"] == "Q4_K"


def test_mix_rules_dense_and_fallback():
    cfg = _cfg(num_experts=0)
    t = tensor_types(_shapes(cfg), cfg, "Q4_K_M")
    more = [i for i in range(32) if t[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert t["blk.4.attn_v.weight"] == "Q4_K" and t["blk.4.attn_output.weight"] == "Q4_K"
    t = tensor_types(_shapes(cfg), cfg, "Q3_K_M")
    assert [t[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert t["blk.0.ffn_down.weight"] == "Q5_K" and t["blk.5.ffn_down.weight"] == "Q4_K"
    assert t["blk.5.attn_output.weight"] == "Q4_K" and t["blk.5.attn_q.weight"] == "Q3_K"
    t = tensor_types(_shapes(cfg), cfg, "Q2_K")
    assert t["blk.3.attn_v.weight"] == "Q4_K" and t["blk.3.ffn_down.weight"] == "Q3_K"
    # tied embeddings: token_embd takes the output tensor's type
    assert tensor_types(_shapes(cfg, tied=True), cfg, "Q4_0")["token_embd.weight"] == "Q6_K"
    assert tensor_types(_shapes(cfg), cfg, "Q4_0")["output.weight"] == "Q6_K"
    assert tensor_types(_shapes(cfg), cfg, "Q8_0")["output.weight"] == "Q8_0"
    # rows that are not a whole number of 256-blocks fall back like llama.cpp
    small = _cfg(num_experts=0, hidden_size=320, num_heads=4, num_kv_heads=4, intermediate_size=640, num_layers=2)
    t = tensor_types(_shapes(small), small, "Q4_K_M")
    assert t["blk.0.attn_q.weight"] == "Q5_0" and t["output.weight"] == "Q8_0"
    assert tensor_types(_shapes(small), small, "Q6_K")["blk.0.attn_q.weight"] == "Q8_0"
    assert tensor_types(_shapes(small), small, "Q3_K_S")["blk.0.attn_q.weight"] == "Q4_0"
    assert set(tensor_types(_shapes(small), small, "F16").values()) == {"F16", "F32"}


# ----------------------------------------------------------------------------- the writer


def test_f16_file_reads_back(mixtral_dir, f16_file):
    from levante.loader import read_checkpoint

    d, _ = mixtral_dir
    src, out = read_checkpoint(d), read_checkpoint(f16_file)
    assert out.config.num_experts == 8 and out.config.num_kv_heads == 2
    for name in ("layers.1.attn.wq", "layers.0.attn.wk", "layers.1.ffn.experts.7.w2", "lm_head", "embed"):
        a = src.weights[name].float()
        b = out.weights[name]
        b = b.dequantize() if hasattr(b, "dequantize") else b.float()
        torch.testing.assert_close(b, a.half().float())
    r = gguf.GGUFReader(f16_file)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == 1 and _field(r, "general.quantization_version") == 2
    assert _field(r, "llama.expert_count") == 8 and _field(r, "llama.expert_used_count") == 2
    assert _field(r, "tokenizer.ggml.model") == "llama" and len(_field(r, "tokenizer.ggml.tokens")) == 32000
    assert _field(r, "tokenizer.ggml.bos_token_id") == 1 and _field(r, "tokenizer.ggml.eos_token_id") == 2
    types = _types(f16_file)
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.ffn_down_exps.weight"] == "F16"


def test_q4_k_m_file(q4km_file):
    types = _types(q4km_file)
    assert set(types.values()) == {"F32", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}
    assert types["output.weight"] == "Q6_K" and types["blk.1.ffn_down_exps.weight"] == "Q6_K"
    r = gguf.GGUFReader(q4km_file)
    assert _field(r, "general.file_type") == 15


def test_refuses_overwrite_and_cleans_up(mixtral_dir, tmp_path, monkeypatch):
    d, _ = mixtral_dir
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        quantize_model(d, out, "Q8_0", progress=False)
    assert out.read_bytes() == b"keep me"

    import levante.tools.quantize as lq

    calls = {"n": 0}
    real = lq.quantize

    def failing(x, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return real(x, t)

    monkeypatch.setattr(lq, "quantize", failing)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_model(d, out, "Q8_0", force=True, progress=False)
    assert out.read_bytes() == b"keep me"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]  # no temp file left
    monkeypatch.undo()
    quantize_model(d, out, "Q8_0", force=True, progress=False)
    assert _types(out)["blk.0.attn_q.weight"] == "Q8_0"
    with pytest.raises(ValueError, match="unknown quantization type"):
        quantize_model(d, tmp_path / "x.gguf", "Q9_K")


def test_requantize_gguf_copies_tokenizer(f16_file, tmp_path):
    out = quantize_model(f16_file, tmp_path / "re-Q6_K.gguf", "Q6_K", progress=False)
    src, dst = gguf.GGUFReader(f16_file), gguf.GGUFReader(out)
    for key in src.fields:
        if key.startswith("tokenizer."):
            assert _field(dst, key) == _field(src, key), key
            assert [int(t) for t in dst.fields[key].types] == [int(t) for t in src.fields[key].types], key
    assert _field(dst, "general.file_type") == 18
    types = _types(out)
    assert types["blk.0.attn_q.weight"] == "Q6_K" and types["blk.0.attn_v.weight"] == "Q8_0"


# ------------------------------------------------------------------------ llama.cpp oracle


def _llama_logits(path: Path) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, logits_all=True)
    try:
        assert llm.tokenize(b"Hello world") == [1, 22557, 1526]
        llm.eval(IDS)
        return np.array(llm.scores[: len(IDS)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.oracle
def test_llama_cpp_f16_logits_match_transformers(mixtral_dir, f16_file):
    _, ref = mixtral_dir
    got = _llama_logits(f16_file)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()


@pytest.mark.oracle
def test_llama_cpp_q4_k_m_close(mixtral_dir, q4km_file):
    _, ref = mixtral_dir
    got = _llama_logits(q4km_file)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.95


@pytest.mark.oracle
def test_same_types_and_bytes_as_llama_quantize(mixtral_dir, q4km_file, tmp_path):
    """llama.cpp's own Q4_K_M of levante's F32 file equals levante's Q4_K_M, tensor types and bytes."""
    llama_cpp = pytest.importorskip("llama_cpp")
    d, _ = mixtral_dir
    f32 = quantize_model(d, tmp_path / "tiny-F32.gguf", "F32", progress=False)
    ref = tmp_path / "llama-Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(ref).encode(), ctypes.byref(params)) == 0
    ours = {t.name: t for t in gguf.GGUFReader(q4km_file).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(ref).tensors}
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    for name, t in theirs.items():
        a = np.asarray(ours[name].data).view(np.uint8)
        b = np.asarray(t.data).view(np.uint8)
        assert np.array_equal(a, b), f"{name} ({t.tensor_type.name}) differs from llama.cpp"


def test_output_has_normal_permissions(q4km_file):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(q4km_file.stat().st_mode) == 0o666 & ~umask
