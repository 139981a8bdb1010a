"""CMAKE_ARGS for the llama-cpp-python oracle wheel (`make llama-cpp`): this CPU's instruction sets, without AMX.

llama.cpp's AMX kernels (ggml-cpu/amx, chosen by -march=native on AMX Xeons) crash with SIGSEGV in
ggml_backend_amx_mul_mat on the small models of this test suite (llama-cpp-python 0.3.36, seen on a
Sapphire-Rapids-class VM), and -march=native cannot be combined with -mno-amx-*: GGML_NATIVE is off and
each extension this CPU has is switched on by name instead.
"""

from pathlib import Path

try:
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
except (OSError, IndexError):
    flags = set()
args = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
for opt, need in [("AVX", {"avx"}), ("AVX2", {"avx2"}), ("FMA", {"fma"}), ("F16C", {"f16c"}), ("BMI2", {"bmi2"}),
                  ("AVX_VNNI", {"avx_vnni"}), ("AVX512", {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}),
                  ("AVX512_VBMI", {"avx512vbmi"}), ("AVX512_VNNI", {"avx512_vnni"}), ("AVX512_BF16", {"avx512_bf16"})]:
    args.append(f"-DGGML_{opt}={'ON' if need <= flags else 'OFF'}")
print(" ".join(args))
