"""levante.quant.extension: the C++ kernels are built on CI with this CPU's instruction sets, a compile error is
loud, and the pure-torch fallback (no compiler, LEVANTE_NO_EXT=1) runs a model to the same numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from levante.errors import KernelBuildError
from levante.quant import extension as ex

# /proc/cpuinfo flag -> the name `isa()` reports when the build uses it
ISA = {"f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512_vnni": "avx512vnni",
       "avx512_bf16": "avx512bf16"}


def test_extension_is_built_with_this_cpus_instruction_sets():
    """Fails (never skips) when the extension is missing, unless LEVANTE_NO_EXT=1 asked for the torch path."""
    if ex.disabled():
        pytest.skip("LEVANTE_NO_EXT=1: the pure-torch path was asked for")
    assert not ex.missing_tools(), f"CI must be able to build the kernels; missing {ex.missing_tools()}"
    ext = ex.extension()
    assert ext is not None
    isa = set(ext.isa())
    flags = ex.cpu_flags()
    for flag, name in ISA.items():
        assert (flag in flags) == (name in isa), f"{name}: cpu {'has' if flag in flags else 'lacks'} it, build differs"
    int_path = all(f in flags for f in ("avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"))
    assert ("path:int_kernels" in isa) == int_path
    assert ext.decode_ops() == int_path
    assert ("path:avx512_dequant" in isa) == ("avx512f" in flags)
    info = ex.describe()
    assert info["built"] and info["module"] == ex.module_name() and set(info["isa"]) == isa


def test_module_name_follows_every_source_file(tmp_path, monkeypatch):
    """The cache key covers the headers too, so an edited header never loads a stale binary."""
    src = tmp_path / "csrc"
    src.mkdir()
    for p in ex.sources():
        (src / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(ex, "CSRC", src)
    before = ex.module_name()
    (src / "common.h").write_text((src / "common.h").read_text() + "\n// edited\n")
    assert ex.module_name() != before


def test_compile_error_raises_with_the_compiler_output(tmp_path, monkeypatch):
    if ex.missing_tools():
        pytest.skip(f"no build tools: {ex.missing_tools()}")
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "ext.cpp").write_text("int levante_broken( {\n")  # a syntax error: fails fast, no torch headers parsed
    monkeypatch.setattr(ex, "CSRC", src)
    monkeypatch.setenv("LEVANTE_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(ex, "_EXT", None)
    monkeypatch.setattr(ex, "_ERROR", None)
    monkeypatch.setattr(ex, "_TRIED", False)
    with pytest.raises(KernelBuildError, match="levante_broken") as err:
        ex.extension()
    assert "LEVANTE_NO_EXT=1" in str(err.value)
    with pytest.raises(KernelBuildError) as again:  # remembered: the same error, no second build
        ex.extension()
    assert again.value is err.value


def test_a_killed_builds_lock_file_does_not_hang_the_next_build(tmp_path):
    """torch's build baton (`lock`) outlives a killed build; the next build clears it instead of waiting forever."""
    if ex.missing_tools():
        pytest.skip(f"no build tools: {ex.missing_tools()}")
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "ext.cpp").write_text("int levante_broken( {\n")
    code = textwrap.dedent(f"""
        from pathlib import Path
        from levante.errors import KernelBuildError
        from levante.quant import extension as ex
        ex.CSRC = Path({str(src)!r})
        d = ex.build_dir() / ex.module_name()
        d.mkdir(parents=True)
        (d / "lock").touch()  # what a build killed mid-compile leaves
        try:
            ex.build()
        except KernelBuildError as e:
            assert "levante_broken" in str(e)
            print("compiled, failed as expected")
    """)
    env = dict(os.environ, LEVANTE_EXTENSIONS_DIR=str(tmp_path / "build"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "compiled, failed as expected" in out.stdout


def test_missing_compiler_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(ex, "missing_tools", lambda: ["a C++ compiler (c++)"])
    monkeypatch.setattr(ex, "_EXT", None)
    monkeypatch.setattr(ex, "_ERROR", None)
    monkeypatch.setattr(ex, "_TRIED", False)
    with pytest.warns(UserWarning, match="C\\+\\+ compiler"):
        assert ex.extension() is None
    assert ex.describe() == {"built": False, "reason": "missing a C++ compiler (c++)"}


def test_torch_fallback_runs_a_gguf_model_to_the_same_logits(tmp_path):
    """A whole model through LEVANTE_NO_EXT=1 (the path of machines without a compiler) in a fresh process."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from fixtures import hf_model
    from gguf_fixtures import write_gguf_from_hf

    path = tmp_path / "tiny.Q4_K.gguf"
    write_gguf_from_hf(hf_model("mixtral_8x2", hidden_size=256, intermediate_size=256), path, qtype="Q4_K")
    code = textwrap.dedent(f"""
        import torch
        from levante import load
        from levante.quant import extension
        model = load({str(path)!r}).model
        ids = torch.tensor([[1, 5, 9, 17, 33, 2, 40]])
        with torch.no_grad():
            full = model(ids)[0]  # prefill path
            cache = model.new_cache(1, 16)
            steps = torch.cat([model(ids[:, i : i + 1], cache=cache)[0] for i in range(ids.shape[1])])  # decode path
        torch.save((extension.extension() is None, full, steps), {str(tmp_path / "OUT")!r})
    """)
    results = []
    for no_ext in ("1", "0"):
        out = tmp_path / "OUT"
        env = dict(os.environ, LEVANTE_NO_EXT=no_ext)
        subprocess.run([sys.executable, "-c", code.replace("OUT", f"out{no_ext}.pt")], env=env, check=True)
        import torch

        results.append(torch.load(out.with_name(f"out{no_ext}.pt")))
    (torch_only, ref_full, ref_steps), (ext_missing, full, steps) = results
    assert torch_only and not ext_missing
    for a, b in ((ref_full, full), (ref_steps, steps), (ref_full, ref_steps)):
        err = float((a - b).abs().max() / a.abs().max())
        assert err < 1e-3, err
