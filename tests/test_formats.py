"""Weight readers: HF single/sharded safetensors, Mistral consolidated (.safetensors, .pth), bad input."""

import json
import struct

import pytest
import torch
from fixtures import hf_model, save_consolidated, save_hf

from levante.errors import ConfigError, MissingConfigError, WeightsError
from levante.formats.safetensors import SafetensorsFile, save_safetensors
from levante.loader import load, read_checkpoint, resolve_dtype
from levante.model import build_model


def _logits(ck, ids, dtype=torch.float32):
    with torch.no_grad():
        return build_model(ck.config, ck.weights, dtype)(ids)


def test_sharded_safetensors(tmp_path):
    ref = hf_model("mixtral_8x2")
    d = save_hf(ref, tmp_path / "sharded", max_shard_size="200KB")
    assert (d / "model.safetensors.index.json").exists()
    ck = read_checkpoint(d)
    assert len(ck.info["files"]) > 1
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert (_logits(ck, ids) - ref(ids).logits).abs().max() <= 1e-4


def test_weights_are_memory_mapped(tmp_path):
    save_hf(hf_model("mistral_dense"), tmp_path / "m")
    ck = read_checkpoint(tmp_path / "m")
    t = ck.weights["layers.0.attn.wq"]
    # A view into the file mapping, not a copy: its memory lies in a mapping of the file.
    addr = t.data_ptr()
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= addr < hi:
            assert rest[-1].endswith("model.safetensors")
            break
    else:
        raise AssertionError("address not mapped")


def test_auto_dtype_per_device():
    """'auto': a bf16 checkpoint stays bf16; otherwise float32 on CPU (exact) and 16-bit on a GPU."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, {"BF16"}, cpu) == resolve_dtype("auto", {"BF16"}, gpu) == torch.bfloat16
    assert resolve_dtype(None, {"F32"}, cpu) == resolve_dtype(None, {"Q4_K", "F32"}, cpu) == torch.float32
    assert resolve_dtype(None, {"Q4_K", "Q6_K", "F32"}, gpu) == resolve_dtype(None, {"F32"}, gpu) == torch.bfloat16
    assert resolve_dtype(None, {"F16"}, gpu) == torch.float16
    assert resolve_dtype("float32", {"Q4_K"}, gpu) == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_selectable(tmp_path, dtype):
    ref = hf_model("mixtral_8x2")
    save_hf(ref, tmp_path / "m")
    lm = load(tmp_path / "m", dtype=dtype)
    assert lm.model.model.embed.weight.dtype == resolve_dtype(dtype)
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        diff = (lm.model(ids) - ref(ids).logits).abs().max().item()
    assert diff <= (1e-4 if dtype == "float32" else 0.2)


@pytest.mark.parametrize(
    "kind,layout",
    [("mixtral_8x2", "experts"), ("mixtral_8x2", "stacked"), ("mixtral_6x3", "experts"),
     ("mixtral_6x3", "stacked"), ("mistral_window", "experts"), ("odd_head_dim", "experts")],
)
def test_consolidated_equals_hf(tmp_path, kind, layout):
    ref = hf_model(kind)
    ck = read_checkpoint(save_consolidated(ref, tmp_path / "c", layout=layout))
    assert ck.format == "mistral-consolidated"
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        assert (_logits(ck, ids) - ref(ids).logits).abs().max() <= 1e-4


def test_consolidated_pth(tmp_path):
    ref = hf_model("mixtral_8x2")
    ck = read_checkpoint(save_consolidated(ref, tmp_path / "p", use_pth=True))
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        assert (_logits(ck, ids) - ref(ids).logits).abs().max() <= 1e-4


def test_pth_with_code_is_refused(tmp_path):
    d = save_consolidated(hf_model("mistral_dense"), tmp_path / "p", use_pth=True)
    (d / "consolidated.00.pth").unlink()
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "consolidated.00.pth", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(WeightsError, match="consolidated.00.pth"):
        read_checkpoint(d)


# ----------------------------------------------------------------------------- bad input
def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingConfigError, match="missing config"):
        read_checkpoint(tmp_path / "empty")


def test_unknown_model_type(tmp_path):
    d = save_hf(hf_model("mistral_dense"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model_type 'gpt_neox'"):
        read_checkpoint(d)


def test_corrupt_config_json(tmp_path):
    d = save_hf(hf_model("mistral_dense"), tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        read_checkpoint(d)


def test_missing_tensor(tmp_path):
    d = save_hf(hf_model("mixtral_8x2"), tmp_path / "m")
    f = SafetensorsFile(d / "model.safetensors")
    tensors = {k: f.get(k).clone() for k in f.keys() if "experts.3.w2" not in k or "layers.1" not in k}
    save_safetensors(tensors, d / "model.safetensors")
    ck = read_checkpoint(d)
    with pytest.raises(WeightsError, match=r"missing tensor 'layers\.1\.ffn\.experts\.3\.w2'"):
        build_model(ck.config, ck.weights)


def test_misshaped_tensor(tmp_path):
    d = save_hf(hf_model("mistral_dense"), tmp_path / "m")
    f = SafetensorsFile(d / "model.safetensors")
    tensors = {k: f.get(k).clone() for k in f.keys()}
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_safetensors(tensors, d / "model.safetensors")
    ck = read_checkpoint(d)
    with pytest.raises(WeightsError, match=r"attn\.wk.*model.safetensors:model.layers.0.self_attn.k_proj.weight.*"
                       r"shape \(8, 64\), expected \(32, 64\)"):
        build_model(ck.config, ck.weights, sources=ck.sources)


def test_truncated_safetensors(tmp_path):
    d = save_hf(hf_model("mistral_dense"), tmp_path / "m")
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated file"):
        read_checkpoint(d)


def test_corrupt_safetensors_header(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 10) + b"{garbage!!" + b"\0" * 20)
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        SafetensorsFile(p)
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        SafetensorsFile(p)
    p.write_bytes(b"abc")
    with pytest.raises(WeightsError, match="truncated"):
        SafetensorsFile(p)


def test_missing_shard(tmp_path):
    d = save_hf(hf_model("mixtral_8x2"), tmp_path / "s", max_shard_size="200KB")
    next(d.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(WeightsError, match="lists shard"):
        read_checkpoint(d)


def test_params_json_missing_key(tmp_path):
    d = save_consolidated(hf_model("mistral_dense"), tmp_path / "c")
    params = json.loads((d / "params.json").read_text())
    del params["n_layers"]
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="missing required key 'n_layers'"):
        read_checkpoint(d)


def test_model_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        load(str(tmp_path / "nope" / "x"))
