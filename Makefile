# vlpost — the commands a new user runs. `make setup && make demo`, then `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 2

.PHONY: setup test test-fast lint demo demo-smoke clean

setup: $(BIN)/vlpost

$(BIN)/vlpost: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=24" >/dev/null
	# torch/torchvision are pinned in pyproject.toml (wheels that lie on this disk; a CUDA build that runs on CPU)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(BIN)/vlpost

test: setup
	$(BIN)/python -m pytest tests -q

test-fast: setup
	$(BIN)/python -m pytest tests -q -m "not slow"

lint: setup
	$(BIN)/ruff check vlpost stages scripts tests

demo: setup
	$(BIN)/python scripts/demo.py --out runs/demo

demo-smoke: setup
	$(BIN)/python scripts/demo.py --out runs/demo-smoke --smoke --overwrite

clean:
	rm -rf runs .pytest_cache .ruff_cache
