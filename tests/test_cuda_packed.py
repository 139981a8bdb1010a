"""The CUDA backend's quantized weights: the packed layout holds exactly the file's values, and the Triton kernel
(run on CPU by Triton's interpreter here, on the GPU where there is one) equals x @ W^T of the dequantized weight,
for every GGUF type of the layout and AWQ, at decode and prefill shapes, alone and inside a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import hf_model, save_hf

from levante.cuda import PackedWeight, pack_weight, pack_weights
from levante.cuda.packed import LAYOUTS
from levante.quant.awq import AWQWeight
from levante.quant.base import QuantWeight
from levante.quant.ggml import dequantize
from levante.quant.kquants import quantize

N, K = 40, 512  # 40 rows: not a multiple of the 64-row tile


def _raw(qtype: str, n: int = N, k: int = K, seed: int = 0) -> torch.Tensor:
    w = np.random.default_rng(seed).normal(0, 0.1, (n, k)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(quantize(w, qtype))).reshape(n, -1)


@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_packed_values_are_the_files(qtype):
    raw = _raw(qtype)
    pw = PackedWeight.from_ggml(raw, qtype, N, K)
    ref = dequantize(raw, qtype).reshape(N, K)
    assert torch.equal(pw.dequantize(), ref)
    ids = torch.tensor([[7, 0], [39, 7]])
    assert torch.equal(pw.rows(ids, torch.float32), ref[ids])


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_blocks_unpacked_on_the_target_device(qtype):
    """GGUF blocks go to the device first and are unpacked there (a GPU does it at its speed; the host's torch
    ops would take minutes for a 26 GB model): on the meta device every plane is made there."""
    from levante.quant.ggml import GGMLWeight

    pw = pack_weight(GGMLWeight(_raw(qtype), qtype, (N, K)), "meta")
    assert all(t.device.type == "meta" for t in (pw.lo, pw.d) + ((pw.hi,) if qtype == "Q6_K" else ()))


def test_awq_packed():
    g = 64
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    zeros = torch.randint(0, 16, (N, K // g), dtype=torch.uint8)
    scales = (torch.rand(N, K // g) * 0.02 + 0.001).half().float()
    awq = AWQWeight.from_codes(codes, zeros, scales, g)
    pw = pack_weight(awq)
    ref = awq.dequantize()
    assert (pw.dequantize() - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_kernel_equals_dequantized_matmul(qtype, m):
    from levante.cuda.triton_matmul import packed_matmul

    pw = PackedWeight.from_ggml(_raw(qtype, seed=m), qtype, N, K)
    x = torch.randn(m, K)
    ref = x @ pw.dequantize().T
    got = packed_matmul(x, pw)
    assert got.shape == (m, N) and (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    x16 = x.half()  # the GPU's path: weights rounded to x's dtype, products accumulated in float32
    ref16 = x16.float() @ pw.dequantize().half().float().T
    assert (packed_matmul(x16, pw).float() - ref16).abs().max() <= 2e-3 * ref16.abs().max()


@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_gemv_equals_float_math(qtype):
    """A decode step's rows (up to GEMV_ROWS) run the GEMV: one row scales sums of codes times x per run of shared
    scales, more rows dequantize each value once and multiply it with each row. Both equal the float32 math of the
    dequantized weight, for float32 and bfloat16 x, on whole and partial slices and blocks of rows."""
    from levante.cuda.triton_matmul import GEMV, GEMV_ROWS, GEMV_WIDE, WIDE_N, gemv_launch, packed_matmul, use_gemv

    assert use_gemv(1, packed=True) and use_gemv(GEMV_ROWS, packed=True) and not use_gemv(GEMV_ROWS + 1, True)
    assert not use_gemv(1, packed=False) and gemv_launch(1) == GEMV and gemv_launch(3).bm == 4
    assert gemv_launch(1, 2, 4096) == GEMV and gemv_launch(1, 2, WIDE_N) == GEMV_WIDE and GEMV_WIDE.bn > GEMV.bn
    # 2 and 4 rows load a slice ahead on a weight of few programs: one block of 4096 rows, not two, nor WIDE_N rows
    assert [gemv_launch(r, 2, 4096, 32, 4096).ahead for r in (2, 3, 4, 5)] == [1, 1, 1, 0]
    assert gemv_launch(2, 2, 4096, 32, 4096, blocks=2).ahead == gemv_launch(2, 2, WIDE_N, 32, 4096).ahead == 0
    k = K if qtype.endswith("_K") else 160  # 160: five 32-value blocks, not a whole slice
    pw = PackedWeight.from_ggml(_raw(qtype, k=k, seed=3), qtype, N, k)
    w = pw.dequantize()
    for m in (1, 3):  # one row; three, by a program of four rows
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dt)
            ref = x.float() @ w.T
            got = packed_matmul(x, pw).float()
            tol = 1e-5 if dt == torch.float32 else 8e-3  # bf16: the output's rounding (the interpreter truncates)
            assert (got - ref).abs().max() <= tol * ref.abs().max()
    x = torch.randn(7, k)  # a program of one row forced on more rows; programs of 2 and 8 rows: 4 blocks, one part
    ref = x @ w.T
    for launch in (GEMV, GEMV_WIDE, gemv_launch(2), gemv_launch(8)):
        assert (packed_matmul(x, pw, launch) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_gemv_loads_ahead_change_no_value(qtype):
    """The GEMV may issue the loads of the next 1 or 3 slices before it multiplies one (Launch.ahead, its loop
    unrolled by 2 or 4): the slices are summed in the same order, so the result is bit for bit the same, also where
    the slices do not fill the unrolled loop (5 slices, the last one partial for 32-value blocks); one row (16- and
    32-row slices of W) and a program of 4 rows (3 of them real)."""
    from dataclasses import replace

    from levante.cuda.triton_matmul import GEMV, GEMV_WIDE, gemv_launch, packed_matmul

    k = 5 * 256 if qtype.endswith("_K") else 4 * 256 + 160
    pw = PackedWeight.from_ggml(_raw(qtype, k=k, seed=5), qtype, N, k)
    for rows, bases in ((1, (GEMV, GEMV_WIDE)), (3, (gemv_launch(3),))):
        x = torch.randn(rows, k)
        ref = x @ pw.dequantize().T
        for dt in (torch.float32, torch.bfloat16):
            for base in bases:
                got = [packed_matmul(x.to(dt), pw, replace(base, ahead=a)) for a in (0, 1, 3)]
                assert all(torch.equal(got[0], g) for g in got[1:])
                tol = 1e-5 if dt == torch.float32 else 8e-3
                assert (got[0].float() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("m", [1, 20, 40, 100, 200])
def test_every_tiled_launch(m):
    """Each configuration of the tiled kernel's table (decode to prefill tiles), on a Q5_K and a Q8_0 weight."""
    from levante.cuda.triton_matmul import dot_launch, packed_matmul

    for qtype in ("Q5_K", "Q8_0"):
        pw = PackedWeight.from_ggml(_raw(qtype, n=136, seed=m), qtype, 136, K)
        x = torch.randn(m, K)
        ref = x @ pw.dequantize().T
        assert (packed_matmul(x, pw, dot_launch(m, dense=False)) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_launch_too_big_for_the_gpu_is_retried_with_fewer_stages():
    """A configuration the GPU cannot hold (Triton's OutOfResources) runs with fewer pipeline stages, remembered;
    one that fails at a single stage still raises."""
    from triton.runtime.errors import OutOfResources

    from levante.cuda.triton_matmul import Launch, run

    calls = []

    class Kernel:
        def __init__(self, fits: int) -> None:
            self.fits = fits

        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **kwargs):
                calls.append(num_stages)
                if num_stages > self.fits:
                    raise OutOfResources(num_stages * 1000, self.fits * 1000, "shared memory")
            return launch

    k = Kernel(fits=2)
    run(k, (1,), Launch(16, 128, 128, 4, 5), BM=16)
    run(k, (1,), Launch(16, 128, 128, 4, 5), BM=16)
    assert calls == [5, 4, 3, 2, 2]
    with pytest.raises(OutOfResources):
        run(Kernel(fits=0), (1,), Launch(16, 128, 128, 4, 2), BM=16)


@pytest.mark.parametrize(("g", "m"), [(64, 1), (128, 1), (128, 3), (128, 12)])
def test_awq_kernel(g, m):
    """AWQ's 4-bit layout by the GEMV (one row, three) and the tiled kernel (twelve rows)."""
    from levante.cuda.triton_matmul import packed_matmul

    awq = AWQWeight.from_codes(torch.randint(0, 16, (N, K), dtype=torch.uint8),
                               torch.randint(0, 16, (N, K // g), dtype=torch.uint8),
                               (torch.rand(N, K // g) * 0.02 + 0.001).half().float(), g)
    x = torch.randn(m, K)
    ref = x @ awq.dequantize().T
    assert (packed_matmul(x, pack_weight(awq)) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_int8_rows():
    """load_in_8bit's weights (int8, one float32 scale per row): packed exactly, multiplied by the kernel."""
    from levante.cuda.triton_matmul import packed_matmul
    from levante.quant.int8 import Int8Weight

    w8 = Int8Weight.from_float(torch.randn(N, K) * 0.1)
    pw = pack_weight(w8)
    assert pw.qtype == "INT8" and torch.equal(pw.dequantize(), w8.dequantize())
    # tiled; the GEMV of one row and of several, with rows of 96 (one scale per row) and of 98 (codes read one by
    # one: not whole int32 units)
    for m, k in ((12, K), (1, K), (1, 96), (3, 96), (1, 98), (3, 98)):
        w8 = Int8Weight.from_float(torch.randn(N, k) * 0.1)
        pw = pack_weight(w8)
        x = torch.randn(m, k)
        ref = x @ w8.dequantize().T
        assert (packed_matmul(x, pw) - ref).abs().max() <= 1e-5 * ref.abs().max()
    xb = x.bfloat16()  # the GPU's dtype: weights rounded to bf16, float32 accumulation
    refb = xb.float() @ w8.dequantize().bfloat16().float().T
    assert (packed_matmul(xb, pw).float() - refb).abs().max() <= 1e-2 * refb.abs().max()


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0"])
def test_model_with_packed_weights(tmp_path, qtype):
    """Every quantized weight of a GGUF model packed (embedding and tied head included): same logits."""
    from levante.loader import load
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model("mixtral_8x2", vocab_size=320, hidden_size=256, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2), tmp_path / "m")
    path = quantize_model(src, tmp_path / f"m.{qtype}.gguf", qtype, progress=False)
    net = load(path).model
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        want = net(ids)
        assert pack_weights(net) > 0
        assert any(isinstance(m, PackedWeight) for m in net.modules())
        got = net(ids)
    # the CPU kernels round activations to 8 bits as llama.cpp does, the packed path is float math: the 1e-3 rule
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


@pytest.mark.gpu
def test_gpu_gguf_model_equals_cpu(tmp_path):
    from levante.loader import load
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model("mixtral_8x2", vocab_size=320, hidden_size=256, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2), tmp_path / "m")
    path = quantize_model(src, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M", progress=False)
    ids = torch.arange(3, 40)[None]
    want = load(path).model(ids)
    net = load(path, device="cuda").model
    assert any(isinstance(m, PackedWeight) for m in net.modules())
    got = net(ids.cuda()).cpu()
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_to_device_streams_from_the_mapped_file(tmp_path, monkeypatch):
    """The GPU load path, run to the CPU: read without CPU regrouping (every quantized weight a view of the mapped
    file, no host copy of the model), then packed weight by weight and the MoE fused: the model's logits."""
    from levante.cuda import FusedMoE, to_device
    from levante.loader import load, read_checkpoint
    from levante.model import build_model
    from levante.quant.kernels import GGMLKernelWeight, Grouped16Weight
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model("mixtral_8x2", vocab_size=320, hidden_size=256, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2), tmp_path / "m")
    path = quantize_model(src, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M", progress=False)
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        want = load(path).model(ids)  # the CPU load (Q4_K / Q6_K regrouped for the C++ kernels)

    def no_regrouping(*a, **k):
        raise AssertionError("a weight was copied into the CPU kernels' layout")

    monkeypatch.setattr(Grouped16Weight, "__init__", no_regrouping)
    ckpt = read_checkpoint(path, for_cpu=False)
    quant = [w for w in ckpt.weights.values() if isinstance(w, QuantWeight)]
    assert quant and all(isinstance(w, GGMLKernelWeight) for w in quant)
    with torch.inference_mode():
        net = to_device(build_model(ckpt.config, ckpt.weights).eval(), torch.device("cpu"), progress=True)
        assert all(isinstance(layer.ffn, FusedMoE) for layer in net.model.layers)
        assert not any(isinstance(m, GGMLKernelWeight) for m in net.modules())  # every one packed
        got = net(ids)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_move_shows_the_bytes_and_keeps_shared_weights_shared(tmp_path, capsys):
    """to_device's copy to the device goes module by module with a progress bar of bytes (a large model's long
    step: the mapped file is read there); every tensor lands on the device, a tied embedding stays one tensor."""
    import copy

    from levante.cuda import move
    from levante.loader import load

    net = load(save_hf(hf_model("llama_tied", vocab_size=320), tmp_path / "m")).model
    size = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    want = copy.deepcopy(net).to("meta")
    move(net, "meta", progress=True)
    assert all(t.device.type == "meta" for t in (*net.parameters(), *net.buffers()))
    assert len({id(t) for t in net.buffers()}) == len({id(t) for t in want.buffers()})
    from tqdm import tqdm

    shown = capsys.readouterr().err
    assert "copying to meta" in shown and f"/{tqdm.format_sizeof(size)} " in shown  # the model's bytes in total
