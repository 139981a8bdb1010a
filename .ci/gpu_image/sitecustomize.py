"""The lent GPU machine's image, as far as imports go: packages it lacks (/work/.library/device/KINDS.md's list)
fail to import, as they would there. .ci/gpu_stack puts this folder on PYTHONPATH for benchmarks/cuda_bench.py's
smoke run, so a benchmark section that needs one of them fails here, not in the one run a GPU session gets.
fastapi, uvicorn and pydantic are not listed: the run carries their wheels (`make gpu-files`)."""

import sys

LACKING = {"gguf", "xgrammar", "mistral_common", "jsonschema", "openai", "langchain_openai", "llama_cpp", "awq",
           "outlines_core", "llguidance", "ruff", "clang_format"}


class _Lacking:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in LACKING:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine's image)", name=name)
        return None


sys.meta_path.insert(0, _Lacking())
