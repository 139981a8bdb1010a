"""The lent GPU machine's image, as far as imports go: packages it lacks (/work/.library/device/KINDS.md's list)
are absent, as they would be there. .ci/gpu_stack puts this folder on PYTHONPATH for benchmarks/cuda_bench.py's
smoke run, so a benchmark section that needs one of them fails here, not in the one run a GPU session gets.
fastapi, uvicorn and pydantic are not listed: the run carries their wheels (`make gpu-files`).

A None in sys.modules makes `import x` raise ModuleNotFoundError and `importlib.util.find_spec(x)` return None (how
libraries such as transformers probe for an optional package), as a package that is not installed does."""

import sys

LACKING = ("gguf", "xgrammar", "mistral_common", "jsonschema", "openai", "langchain_openai", "llama_cpp", "awq",
           "outlines_core", "llguidance", "ruff", "clang_format")

for _name in LACKING:
    sys.modules.setdefault(_name, None)
